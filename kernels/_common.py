"""Small @triton.jit helpers shared by the kernels in this package, and how they run under the interpreter.

Under `TRITON_INTERPRET=1` (CPU tensors) Triton executes kernels with numpy, which has no bfloat16:
  * `tl.dot` on bf16 operands returns garbage, so `mma` upcasts bf16 operands to fp32 there. That is exact (a bf16
    value is an fp32 value, and a product of two bf16 values is exact in fp32), so the interpreter computes what a
    tensor core computes: exact products, fp32 accumulation.
  * fp32 -> bf16 casts truncate instead of rounding to nearest even, so `cast_rn` rounds the fp32 bits first; the
    truncating cast that follows is then exact. (Subnormal results still flush to zero there, 1e-40 -> 0 where
    torch keeps a bf16 subnormal: irrelevant at activation scales, and the GPU path is the hardware cast.)
fp16 is native in numpy, so fp16 runs exactly the GPU code path under the interpreter. On a GPU (`EMULATE=False`)
both helpers are the plain Triton operations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def emulate_bf16(t: torch.Tensor) -> bool:
    """True when a kernel launched on `t` runs in the Triton interpreter (a CPU tensor), decided per call."""
    return t.device.type == "cpu"


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; anything else is a clear error."""
    import os

    dev = tensors[0].device
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels need a CUDA device; on CPU set TRITON_INTERPRET=1 before importing triton "
                           "or use the *_ref reference (gemmaquant.ops picks it automatically)")


@triton.jit
def mma(a, b, acc, EMULATE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. fp32 operands use IEEE fp32 (no TF32); see the module docstring."""
    if (a.dtype == tl.float32) or (b.dtype == tl.float32):
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif EMULATE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def cast_rn(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 `x` cast to `dtype`, rounding to nearest even (also under the interpreter, where bf16 casts truncate)."""
    if EMULATE and (dtype == tl.bfloat16):
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000  # round the low 16 bits away, ties to even
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
