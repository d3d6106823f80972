"""int8 matmuls: y = x @ W^T with W in gemmaquant's Int8Channel layout (gemmaquant/formats/int_group.py).

    qdata int8 [N, K]   q in [-127, 127]
    scale      [N]      bf16 / fp16 / fp32;  w[n, k] = scale[n] * q[n, k]

Two modes of one kernel (`act_quant`):
  * W8A16: x stays fp16/bf16; the int8 tile is converted to x's dtype (exact) for the tensor cores and the channel
    scale multiplies the fp32 accumulator once, in the epilogue.
  * W8A8 with dynamic per-token activation quantization fused in: each program first reads its BLOCK_M rows of x
    over the whole of K for their absmax, then quantizes x tile by tile on the fly and runs int8 x int8 -> int32 dots.
    Nothing int8 goes through global memory; the price is that every N-tile program re-reads its rows of x (from L2).
    Per-token quantization (the semantics, `quantize_per_token_ref`):
        s_x[m] = max_k |x[m, k]| / 127 (fp32);  xq = clamp(round_half_away(x / s_x), -127, 127);  xq = 0 if s_x = 0
        y[m, n] = fp32(sum_k xq[m, k] q[n, k]) * s_x[m] * scale[n]    (the integer sum is exact)
`int8_matmul_ref` defines both modes. Decode (M <= 16) uses split-K as in int4_matmul.py; K may be any length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rn, check_device, emulate_bf16, mma
from .int4_matmul import _num_sms


@triton.jit
def int8_tile(q_ptr, rn, k0, N, K, stride_qn, BLOCK_K: tl.constexpr):
    """The int8 [BLOCK_N, BLOCK_K] weight tile at rows `rn`, columns k0 ..; out-of-range rows/columns read as 0."""
    rk = k0 + tl.arange(0, BLOCK_K)
    return tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)


@triton.jit
def row_absmax(x_ptr, rm, M, K, stride_xm, BLOCK_K: tl.constexpr):
    """max_k |x[m, k]| over the whole row for the rows `rm` (fp32 [BLOCK_M])."""
    amax = tl.zeros((rm.shape[0],), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    return amax


@triton.jit
def quantize_tile(x, s_safe):
    """int8 codes of an activation tile for per-row scales s_safe [BLOCK_M] (> 0): round half away from zero."""
    v = tl.math.div_rn(x.to(tl.float32), s_safe[:, None])  # IEEE division, as torch's
    r = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))
    return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)


@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, sw_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_ym, stride_ysplit,
                        ACT_QUANT: tl.constexpr, SPLIT_K: tl.constexpr, EMULATE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(n_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per + per, n_tiles)
    if ACT_QUANT:
        amax = row_absmax(x_ptr, rm, M, K, stride_xm, BLOCK_K)  # pass 1: the per-token scales
        sx = tl.math.div_rn(amax, tl.zeros_like(amax) + 127.0)
        s_safe = tl.where(amax > 0, sx, 1.0)  # an all-zero row quantizes to zeros
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per, t_end):  # pass 2 (the only pass for W8A16)
        k0 = t * BLOCK_K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        w = int8_tile(q_ptr, rn, k0, N, K, stride_qn, BLOCK_K)
        if ACT_QUANT:
            acc = tl.dot(quantize_tile(x, s_safe), tl.trans(w), acc, out_dtype=tl.int32)
        else:
            acc = mma(x, tl.trans(w.to(tl.float32).to(x.dtype)), acc, EMULATE)  # int8 -> x's dtype: exact
    out = acc.to(tl.float32)
    if ACT_QUANT:
        out = out * sx[:, None]
    out = out * tl.load(sw_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ysplit + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, cast_rn(out, y_ptr.dtype.element_ty, EMULATE), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Launch heuristics, as int4_matmul._config (not tuned on a GPU yet)."""
    if M <= 16:
        bn, bk = 64, 128
        split = max(1, min(triton.cdiv(K, bk), triton.cdiv(2 * _num_sms(device), triton.cdiv(N, bn)), 16))
        return dict(block_m=16, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=4)
    bm = min(128, triton.next_power_of_2(M))
    return dict(block_m=bm, block_n=128, block_k=64, split_k=1, num_warps=8 if bm >= 128 else 4, num_stages=3)


def int8_matmul(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, act_quant: bool = False,
                config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T for W in the int8 channel layout (see the module docstring for both modes).

    x [M, K] fp16 / bf16 (fp32 also works), qdata int8 [N, K], scale [N]. act_quant: W8A8 with per-token dynamic
    activation quantization, else W8A16. Returns y [M, N] in x's dtype.
    """
    if x.dim() != 2:
        raise ValueError(f"int8_matmul: x must be [M, K], got {list(x.shape)}")
    M, K = x.shape
    N = qdata.shape[0]
    if qdata.dtype != torch.int8 or qdata.shape != (N, K) or scale.shape != (N,):
        raise ValueError(f"int8_matmul: x {list(x.shape)}, qdata {qdata.dtype} {list(qdata.shape)}, scale "
                         f"{list(scale.shape)} do not fit")
    check_device(x, qdata, scale)
    cfg = {**_config(M, N, K, x.device), **(config or {})}
    x = x if x.stride(1) == 1 else x.contiguous()
    qdata, scale = qdata.contiguous(), scale.contiguous()
    split = cfg["split_k"]
    y = torch.empty((split, M, N) if split > 1 else (1, M, N), dtype=torch.float32 if split > 1 else x.dtype,
                    device=x.device)
    grid = (triton.cdiv(M, cfg["block_m"]), triton.cdiv(N, cfg["block_n"]), split)
    _int8_matmul_kernel[grid](
        x, qdata, scale, y, M, N, K, x.stride(0), qdata.stride(0), y.stride(1), y.stride(0), ACT_QUANT=act_quant,
        SPLIT_K=split, EMULATE=emulate_bf16(x), BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.sum(0).to(x.dtype) if split > 1 else y[0]


# ------------------------------------------------------------------------------------------------ reference


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8: (xq int8 [.., K], s_x fp32 [..]) with x ~ s_x * xq (module docstring)."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    sx = amax / 127
    v = xf / torch.where(amax > 0, sx, torch.ones_like(sx))[..., None]
    r = torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5))
    return r.clamp(-127, 127).to(torch.int8), sx


def int8_matmul_ref(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
    """The semantics. W8A16: dequantize W to x's dtype, then torch's matmul. W8A8: quantize x per token, exact
    integer matmul (in fp64, exact for any K < 2^38), then fp32 scales, then x's dtype."""
    if not act_quant:
        return x @ (scale.float()[:, None] * qdata.float()).to(x.dtype).T
    xq, sx = quantize_per_token_ref(x)
    acc = (xq.double() @ qdata.double().T).float()
    return (acc * sx[..., None] * scale.float()).to(x.dtype)
