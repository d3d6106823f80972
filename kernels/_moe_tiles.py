"""The pieces both MoE kernel families share (moe_grouped_gemm.py: block-aligned tokens through the tensor cores;
moe_decode.py: one program per (token, expert) pair and output tile): the GELU and an expert's weight tile in any of
the three expert layouts (float, int8 per channel, int4 per group; see moe_grouped_gemm.py's docstring)."""

from __future__ import annotations

import triton
import triton.language as tl

from .int4_matmul import int4_tile
from .int8_matmul import int8_tile

FLOAT, INT8, INT4 = 0, 1, 2  # weight formats (WFMT)


@triton.jit
def gelu_tanh(g):
    """0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) written as g * sigmoid(2 * ...): no tanh, no cancellation."""
    return g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))


@triton.jit
def expert_tile(w_ptr, s_ptr, z_ptr, rn, k0, N, K, stride_wn, stride_sn, stride_zn, dtype: tl.constexpr,
                WFMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """One expert's [BLOCK_N, BLOCK_K] weight tile in `dtype` (values for FLOAT, integer codes for INT8 / INT4) and,
    for INT4, the tile's group scales [BLOCK_N] (ones otherwise; INT8's channel scale goes on in the epilogue)."""
    if WFMT == 2:
        w, s = int4_tile(w_ptr, s_ptr, z_ptr, rn, k0, N, stride_wn, stride_sn, stride_zn, GROUP, HAS_ZERO, BLOCK_K)
        w = w.to(dtype)
    elif WFMT == 1:
        w = int8_tile(w_ptr, rn, k0, N, K, stride_wn, BLOCK_K).to(tl.float32).to(dtype)
        s = tl.zeros((BLOCK_K,), dtype=tl.float32)  # unused
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                    other=0.0).to(dtype)
        s = tl.zeros((BLOCK_K,), dtype=tl.float32)  # unused
    return w, s
