"""int4 weight-only matmul: y = x @ W^T with W in gemmaquant's Int4Group layout (formats/int_group.py).

    qdata uint8 [N, K // 2]   k = 2j in the LOW nibble, k = 2j + 1 in the HIGH nibble, u in [0, 15]
    scale       [N, K // g]   w[n, k] = scale[n, k // g] * (u[n, k] - zero[n, k // g])
    zero  uint8 [N, K // g]   or None for symmetric (zero = 8)

The kernel is the Triton tutorial's tiled GEMM (03-matrix-multiplication.py) with the weight tile dequantized in
registers: each program owns a BLOCK_M x BLOCK_N tile of y, walks K in BLOCK_K steps, unpacks the nibbles of a
[BLOCK_K, BLOCK_N] weight tile, applies its group scales and zero points, and accumulates in fp32.
`int4_matmul_ref` defines the semantics: dequantize to the activation dtype, then torch's matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                        stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
                        GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, FP32_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wmask = (rn[None, :] < N) & (rk[:, None] < K)
        byte = tl.load(q_ptr + rn[None, :] * stride_qn + (rk // 2)[:, None], mask=wmask, other=0)  # [BK, BN]
        u = ((byte >> ((rk % 2) * 4)[:, None]) & 0xF).to(tl.float32)
        g = rk // GROUP
        s = tl.load(s_ptr + rn[None, :] * stride_sn + g[:, None], mask=wmask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rn[None, :] * stride_zn + g[:, None], mask=wmask, other=0).to(tl.float32)
        else:
            z = 8.0
        w = (u - z) * s
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _interpreted() -> bool:
    # the interpreter's numpy dot has no bf16: there both operands go to fp32 (accumulation is fp32 either way)
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def int4_matmul(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                group_size: int, block_m: int = 16, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """x [M, K] (fp32 / fp16 / bf16) -> y [M, N] in x's dtype."""
    M, K = x.shape
    N = qdata.shape[0]
    if qdata.shape != (N, K // 2) or K % group_size or scale.shape != (N, K // group_size):
        raise ValueError(f"int4_matmul: shapes x {list(x.shape)}, qdata {list(qdata.shape)}, scale "
                         f"{list(scale.shape)} do not fit group {group_size}")
    if zero is not None and zero.shape != scale.shape:
        raise ValueError("int4_matmul: zero must have scale's shape")
    x, qdata, scale = x.contiguous(), qdata.contiguous(), scale.contiguous()
    # the interpreter stores bf16 by truncation (numpy has no bf16); there the kernel stores fp32 and torch rounds
    store_fp32 = _interpreted() and x.dtype == torch.bfloat16
    y = torch.empty(M, N, dtype=torch.float32 if store_fp32 else x.dtype, device=x.device)
    z = zero.contiguous() if zero is not None else scale  # unused when HAS_ZERO is False
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _int4_matmul_kernel[grid](x, qdata, scale, z, y, M, N, K, x.stride(0), qdata.stride(0), scale.stride(0),
                              z.stride(0), y.stride(0), GROUP=group_size, HAS_ZERO=zero is not None,
                              FP32_DOT=x.dtype == torch.float32 or _interpreted(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.to(x.dtype)


def int4_dequantize_ref(qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int):
    u = torch.stack([qdata & 0xF, qdata >> 4], dim=-1).reshape(qdata.shape[0], -1).float()
    z = zero.float() if zero is not None else torch.full_like(scale, 8, dtype=torch.float32)
    return (u - z.repeat_interleave(group_size, 1)) * scale.float().repeat_interleave(group_size, 1)


def int4_matmul_ref(x, qdata, scale, zero, group_size):
    """The semantics: dequantize to x's dtype, then torch's matmul."""
    return x @ int4_dequantize_ref(qdata, scale, zero, group_size).to(x.dtype).T
