"""The kernels' CUDA launch configs compile for sm_90 (H100 / H200) and fit its shared memory, checked without a
GPU: scripts/compile_kernels_sm90.py compiles every kernel at the configs its wrapper picks on Gemma 4 shapes with
the ptxas that ships in Triton's wheel. A config over 227 KiB of shared memory would otherwise only fail on the GPU
(Triton's OutOfResources at launch)."""

import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason=f"no ptxas in this Triton install ({PTXAS})")
def test_cuda_configs_compile_and_fit_sm90():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels_sm90.py")], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("ok", "OVER", "FAIL"))]
    kernels = {line.split()[1] for line in lines}
    assert kernels == {"_int4_matmul_kernel", "_int8_matmul_kernel", "_moe_gate_up_kernel", "_moe_down_kernel",
                       "_swa_fwd_kernel", "_swa_decode_kernel", "_merge_splits_kernel",
                       "_moe_gate_up_gemv_kernel", "_moe_down_gemv_kernel", "_int4_gemv_kernel"}, kernels
    assert all(line.startswith("ok") for line in lines) and "all fit sm_90" in done.stdout


@pytest.mark.skipif(not PTXAS.exists(), reason=f"no ptxas in this Triton install ({PTXAS})")
def test_the_check_fails_when_a_config_does_not_fit():
    """The same script with a limit every kernel exceeds: it must say so and exit 1."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels_sm90.py"), "--max-shared", "1024",
                           "--only", "int8_matmul M=1 W8A16"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 1 and "OVER" in done.stdout, done.stdout + done.stderr
