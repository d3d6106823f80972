"""Compile every Triton kernel, at the launch configs it uses on Gemma 4 shapes, for a GPU this machine does not have.

No GPU is needed: Triton's own ptxas (shipped in its wheel) compiles for the target named here, and the kernels'
wrappers are called on CPU tensors with the CUDA launch heuristics, so the same (signature, constexprs, num_warps,
num_stages) reach the compiler as on the GPU. Nothing is launched. For each kernel it prints the resources that
decide whether it can run and how well: shared memory (Triton refuses a launch over the device's limit with
OutOfResources), registers per thread, and local memory (spills). Exit status 1 when a config does not fit.

    .venv/bin/python scripts/compile_kernels_sm90.py            # sm_90 (H100 / H200), 227 KiB shared per block
    .venv/bin/python scripts/compile_kernels_sm90.py --arch 89 --max-shared 101376    # sm_89 (L4, L40S, RTX 4090)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402  (the DriverConfig whose .active Triton uses)
from triton.runtime.jit import JITFunction  # noqa: E402


class CompileOnlyDriver:
    """Enough of Triton's CUDA driver for JITFunction.run(warmup=True): a device, a stream and a target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


def cases(sms: int):
    """(label, thunk) for every kernel at the configs its wrapper picks on a CUDA device for Gemma 4 shapes."""
    from gemmaquant.config import get_variant
    from gemmaquant.kernels import int4_matmul as i4, int8_matmul as i8, moe_grouped_gemm as moe, swa_attention as at

    a = get_variant("26b-a4b")
    bf16, cuda = torch.bfloat16, torch.device("cuda")
    i4._num_sms = i8._num_sms = lambda device: sms
    H, I, Ie, E = a.hidden_size, a.intermediate_size, a.moe_intermediate_size, a.num_experts
    for M in (1, 16, 256):
        for g, sym in ((128, False), (32, True), (16, True)):  # group 16: BLOCK_K 16, the byte-per-column unpack
            x = torch.empty(M, H, dtype=bf16)
            q = torch.empty(I, H // 2, dtype=torch.uint8)
            s = torch.empty(I, H // g, dtype=bf16)
            z = None if sym else torch.empty(I, H // g, dtype=torch.uint8)
            cfg = i4._config(M, I, H, g, cuda)
            yield f"int4_matmul M={M} g{g}{' sym' if sym else ''} {cfg}", lambda: i4.int4_matmul(x, q, s, z, g, cfg)
            if g >= 32:  # the split-nibble unpack, a candidate not yet timed
                cfg_split = {**cfg, "unpack": "split"}
                yield (f"int4_matmul M={M} g{g}{' sym' if sym else ''} {cfg_split}",
                       lambda: i4.int4_matmul(x, q, s, z, g, cfg_split))
            if g >= 32 and M <= 16:  # the GEMV kernel, a decode candidate not yet timed
                cfg_gemv = {**cfg, "kernel": "gemv"}
                yield (f"int4_matmul M={M} g{g}{' sym' if sym else ''} {cfg_gemv}",
                       lambda: i4.int4_matmul(x, q, s, z, g, cfg_gemv))
        for act in (False, True):
            x = torch.empty(M, H, dtype=bf16)
            q = torch.empty(I, H, dtype=torch.int8)
            s = torch.empty(I, dtype=bf16)
            cfg = i8._config(M, I, H, cuda)
            yield (f"int8_matmul M={M} {'W8A8' if act else 'W8A16'} {cfg}",
                   lambda: i8.int8_matmul(x, q, s, act, cfg))
    for T in (1, 256):
        for fmt in ("bf16", "int8", "int4"):
            x = torch.empty(T, H, dtype=bf16)
            ids = torch.randint(0, E, (T, a.top_k_experts))
            tw = torch.rand(T, a.top_k_experts)
            if fmt == "bf16":
                w = (torch.empty(E, 2 * Ie, H, dtype=bf16), torch.empty(E, H, Ie, dtype=bf16),
                     None, None, None, None, 0)
            elif fmt == "int8":
                w = (torch.empty(E, 2 * Ie, H, dtype=torch.int8), torch.empty(E, H, Ie, dtype=torch.int8),
                     torch.empty(E, 2 * Ie, dtype=bf16), torch.empty(E, H, dtype=bf16), None, None, 0)
            else:
                w = (torch.empty(E, 2 * Ie, H // 2, dtype=torch.uint8), torch.empty(E, H, Ie // 2, dtype=torch.uint8),
                     torch.empty(E, 2 * Ie, H // 64, dtype=bf16), torch.empty(E, H, Ie // 64, dtype=bf16),
                     torch.empty(E, 2 * Ie, H // 64, dtype=torch.uint8), torch.empty(E, H, Ie // 64, dtype=torch.uint8),
                     64)
            yield f"moe_experts T={T} {fmt}", lambda: moe.moe_experts(x, ids, tw, *w)
    for D, hkv, window in ((a.head_dim, a.num_key_value_heads, a.sliding_window),
                           (a.global_head_dim, a.num_global_key_value_heads, None)):
        L = 256
        q = torch.empty(1, a.num_attention_heads, L, D, dtype=bf16)
        k = torch.empty(1, hkv, L, D, dtype=bf16)
        for cfg in (at.prefill_config(D, cuda=True), at.H200_TIMED_PREFILL[D]):
            yield (f"swa_attention D={D} window={window} {cfg}",
                   lambda cfg=cfg: at.swa_attention(q, k, k, window, 1.0, config=cfg))
        for B in (1, 64):
            q1 = torch.empty(B, a.num_attention_heads, 1, D, dtype=bf16)
            kc = torch.empty(B, hkv, 1024, D, dtype=bf16)
            n = torch.full((B,), 1024, dtype=torch.int32)
            G = a.num_attention_heads // hkv
            cfg = at.decode_config(G, 1, D, cuda=True)
            yield (f"swa_decode B={B} D={D} window={window} {cfg}",
                   lambda: at.swa_decode(q1, kc, kc, n, window, 1.0, num_splits=4, config=cfg))


@contextlib.contextmanager
def compile_only(target: GPUTarget):
    """JIT launches compile for `target` and stop there; yields the list the compiled kernels are appended to."""
    compiled = []
    saved_run, saved_active = JITFunction.run, driver._active

    def run(self, *args, grid, warmup, **kwargs):
        kernel = saved_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    JITFunction.run = run
    driver.set_active(CompileOnlyDriver(target))

    modules = [m for name, m in sys.modules.items() if name.startswith("gemmaquant.kernels")]
    saved = [(m, m.__dict__.get("check_device"), m.__dict__.get("emulate_bf16")) for m in modules]
    for m, _, _ in saved:  # CPU tensors stand in for CUDA ones: no device check, no interpreter emulation
        if hasattr(m, "check_device"):
            m.check_device = lambda *t: None
            m.emulate_bf16 = lambda t: False
    try:
        yield compiled
    finally:
        JITFunction.run = saved_run
        driver._active = saved_active
        for m, cd, eb in saved:
            if cd is not None:
                m.check_device, m.emulate_bf16 = cd, eb


def resource_usage(kernel) -> dict:
    """Registers, stack and local memory per thread from the cubin (Triton's cuobjdump), shared memory from Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = dict(shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
               num_stages=kernel.metadata.num_stages)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        out[key.lower()] = int(m.group(1)) if m else None
    ptx = kernel.asm["ptx"]  # which tensor-core instructions: Hopper's warpgroup wgmma, or the older mma.sync
    out["mma"] = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    ap.add_argument("--max-shared", type=int, default=232448, help="shared memory per block in bytes (sm_90: 227 KiB)")
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors, for the split-K heuristics (H100 SXM: 132)")
    ap.add_argument("--only", default="", help="substring of the case labels to compile")
    args = ap.parse_args(argv)
    import gemmaquant.kernels.moe_grouped_gemm  # noqa: F401  (import the kernel modules before patching them)
    import gemmaquant.kernels.swa_attention  # noqa: F401

    bad = 0
    with compile_only(GPUTarget("cuda", args.arch, 32)) as compiled:
        for label, thunk in cases(args.sms):
            if args.only not in label:
                continue
            compiled.clear()
            try:
                thunk()
            except Exception as e:
                print(f"FAIL {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                bad += 1
                continue
            for kernel in compiled:
                r = resource_usage(kernel)
                fits = r["shared"] <= args.max_shared
                bad += not fits
                print(f"{'ok  ' if fits else 'OVER'} {kernel.name:24s} shared {r['shared']:6d} B  regs {r['reg']}  "
                      f"local {r['local']}  {r['mma']:8s}  warps {r['num_warps']} stages {r['num_stages']}  | {label}",
                      flush=True)
    print(f"{bad} config(s) do not compile or do not fit sm_{args.arch}" if bad else f"all fit sm_{args.arch}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
