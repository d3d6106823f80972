"""docs/qat-fsdp.md's program under torchrun (slow): 2 CPU processes (gloo, FSDP2) train for two steps on halves of
each batch and gather, convert and export the result; a 1-process run of the same file must end at the same
weights (to float rounding, but for the rare element AdamW moves on a gradient at rounding level: the ranks'
gradients are averaged in another order) and both write the GGUF."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DOC = Path(__file__).resolve().parents[2] / "docs" / "qat-fsdp.md"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")]


def _program(tmp_path) -> Path:
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    code, n = re.subn(r"^STEPS, BATCH, SEQ, LR = .*$", "STEPS, BATCH, SEQ, LR = 2, 4, 32, 1e-4", code, flags=re.M)
    assert n == 1, "the program's size line changed; update this test"
    path = tmp_path / "qat_fsdp.py"
    path.write_text(code)
    return path


def _run(program: Path, nproc: int, out: Path) -> None:
    env = {**os.environ, "QAT_OUT": str(out), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(program)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert (out / "model-Q4_0.gguf").is_file()


def test_fsdp2_program_under_torchrun_equals_one_process(tmp_path):
    program = _program(tmp_path)
    _run(program, 2, tmp_path / "two")
    _run(program, 1, tmp_path / "one")
    two, one = load_file(str(tmp_path / "two" / "student.safetensors")), load_file(str(tmp_path / "one" /
                                                                                        "student.safetensors"))
    assert set(two) == set(one) and any(k.endswith("_qat_scale") for k in one)
    # AdamW moves an element by about lr per step whatever its gradient's size, so an element whose averaged
    # gradient is at rounding level (summed in another order over 2 ranks) can move differently: at most
    # 2 lr x steps apart, and rare; every other element agrees to float rounding
    lr, steps = 1e-4, 2
    off, total = 0, 0
    for k, v in one.items():
        diff = (two[k] - v).abs()
        assert float(diff.max()) <= 2 * lr * steps, k
        off += int((diff > 1e-6 + 1e-5 * v.abs()).sum())
        total += v.numel()
    assert off <= 1e-4 * total, f"{off} of {total} elements differ beyond float rounding"
