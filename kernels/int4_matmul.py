"""int4 weight-only matmul: y = x @ W^T with W in gemmaquant's Int4Group layout (gemmaquant/formats/int_group.py).

    qdata uint8 [N, K // 2]   k = 2j in the LOW nibble, k = 2j + 1 in the HIGH nibble, u in [0, 15]
    scale       [N, K // g]   bf16 / fp16 / fp32;  w[n, k] = scale[n, k // g] * (u[n, k] - zero[n, k // g])
    zero  uint8 [N, K // g]   asymmetric; None for symmetric, meaning zero = 8

`int4_matmul_ref` (bottom of the file) defines the semantics: dequantize to x's dtype, then torch's matmul.

The kernel is the Triton tutorial's tiled GEMM (03-matrix-multiplication.py) with the weight tile dequantized in
registers. Each program owns a BLOCK_M x BLOCK_N tile of y and walks its share of K in BLOCK_K steps; BLOCK_K
divides the group size, so a K-tile lies inside one group and has one scale per output column. The tile's integer
codes (u - zero, exact in bf16/fp16) go through the tensor cores and the group scale multiplies the fp32 partial
product afterwards, so the weight is never rounded to the activation dtype (the reference rounds it).

Two launch shapes of the same kernel:
  * decode (M <= 16): GEMV-like, one 16-row M tile, and split-K: SPLIT_K programs share an output tile, each
    writing an fp32 partial sum that the wrapper adds up. Decode is bound by reading the weights once, so the
    split only has to put enough programs on the GPU to keep every SM loading.
  * prefill (M > 16): the GEMM tiling, SPLIT_K = 1, the result stored directly in x's dtype.
A third variant for decode, config kernel="gemv" (`_int4_gemv_kernel`): fp32 multiply-adds instead of a 16-row
tensor-core tile, the split nibbles, and the zero point factored out of the dot. It is the candidate for int4
decode at the bandwidth (issue 32), still to be timed on a GPU; the default stays "mma" until it is.
Launch configs come from `_config` (heuristics, timed on an H200 but not tuned there: see docs/kernels.md).

Unpacking the nibbles (config "unpack"): "interleave" (the default) rebuilds the [BLOCK_N, BLOCK_K] tile of codes
with tl.interleave; "split" keeps the low and high nibbles apart and takes two dots per K-tile, the even columns
of x against the low nibbles and the odd columns against the high ones, so that no register shuffle rebuilds the
tile. Same products, summed in another fp32 order. On the H200 the interleaving kernel streams int4 weights at a
third of int8's rate per byte; "split" is the candidate for that, still to be timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rn, check_device, emulate_bf16, mma


@triton.jit
def group_scale_zero(s_ptr, z_ptr, rn, nmask, g, stride_sn, stride_zn, HAS_ZERO: tl.constexpr):
    """Group g's scale and zero point of rows rn, as fp32 [BLOCK_N] (zero 8 when symmetric)."""
    s = tl.load(s_ptr + rn * stride_sn + g, mask=nmask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + rn * stride_zn + g, mask=nmask, other=0).to(tl.float32)
    else:
        z = tl.zeros_like(s) + 8.0
    return s, z


@triton.jit
def int4_tile(q_ptr, s_ptr, z_ptr, rn, k0, N, stride_qn, stride_sn, stride_zn,
              GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile at rows `rn`, columns k0 .. k0 + BLOCK_K (inside one group), as fp32
    integers u - zero in [-15, 15], and the group scale of each row (fp32 [BLOCK_N]). Rows >= N read as zero."""
    nmask = rn < N
    if BLOCK_K >= 32:
        rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns
        byte = tl.load(q_ptr + rn[:, None] * stride_qn + rj[None, :], mask=nmask[:, None], other=0)  # [BN, BK/2]
        u = tl.interleave(byte & 0xF, byte >> 4)  # [BN, BK]: column 2j = low nibble, 2j + 1 = high nibble
    else:
        # BLOCK_K = 16 (group 16): the interleave above gave wrong sums at this width on an H200 (Triton 3.6), so
        # each byte is loaded for both of its columns instead. Correct at every width, but 10x slower at 128 there
        # (docs/kernels.md), so it is kept to the width that needs it.
        rk = k0 + tl.arange(0, BLOCK_K)
        byte = tl.load(q_ptr + rn[:, None] * stride_qn + (rk // 2)[None, :], mask=nmask[:, None], other=0)
        u = (byte >> ((rk % 2) * 4).to(tl.uint8)[None, :]) & 0xF  # [BN, BK]: even k low nibble, odd k high
    s, z = group_scale_zero(s_ptr, z_ptr, rn, nmask, k0 // GROUP, stride_sn, stride_zn, HAS_ZERO)
    return u.to(tl.float32) - z[:, None], s


@triton.jit
def int4_tile_halves(q_ptr, s_ptr, z_ptr, rn, k0, N, stride_qn, stride_sn, stride_zn,
                     GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same tile as int4_tile without the interleave: (lo, hi, scale), lo / hi [BLOCK_N, BLOCK_K // 2] holding
    u - zero of the even columns k0 + 2j (low nibbles) and of the odd columns k0 + 2j + 1 (high nibbles)."""
    nmask = rn < N
    rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(q_ptr + rn[:, None] * stride_qn + rj[None, :], mask=nmask[:, None], other=0)  # [BN, BK/2]
    s, z = group_scale_zero(s_ptr, z_ptr, rn, nmask, k0 // GROUP, stride_sn, stride_zn, HAS_ZERO)
    return (byte & 0xF).to(tl.float32) - z[:, None], (byte >> 4).to(tl.float32) - z[:, None], s


@triton.jit
def _int4_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                        stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, stride_ysplit,
                        GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SPLIT_K: tl.constexpr, EMULATE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_NIBBLES: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # this program's K-tiles: split s gets tiles [s * per, min((s + 1) * per, n_tiles)); K % BLOCK_K == 0
    n_tiles = K // BLOCK_K
    per = tl.cdiv(n_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per + per, n_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per, t_end):
        k0 = t * BLOCK_K
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SPLIT_NIBBLES:  # two dots, the even columns of x with the low nibbles and the odd with the high ones
            rh = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + rh[None, :], mask=rm[:, None] < M, other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + (rh + 1)[None, :], mask=rm[:, None] < M, other=0.0)
            lo, hi, s = int4_tile_halves(q_ptr, s_ptr, z_ptr, rn, k0, N, stride_qn, stride_sn, stride_zn, GROUP,
                                         HAS_ZERO, BLOCK_K)
            part = mma(x_even, tl.trans(lo.to(x_even.dtype)), zero, EMULATE)
            part = mma(x_odd, tl.trans(hi.to(x_odd.dtype)), part, EMULATE)
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            w, s = int4_tile(q_ptr, s_ptr, z_ptr, rn, k0, N, stride_qn, stride_sn, stride_zn, GROUP, HAS_ZERO,
                             BLOCK_K)
            part = mma(x, tl.trans(w.to(x.dtype)), zero, EMULATE)
        acc += part * s[None, :]  # the group scale, applied to the fp32 partial product
    ymask = (rm[:, None] < M) & (rn[None, :] < N)
    y_ptrs = y_ptr + pid_k * stride_ysplit + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, cast_rn(acc, y_ptr.dtype.element_ty, EMULATE), mask=ymask)


@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                      stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, stride_ysplit,
                      GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SPLIT_K: tl.constexpr, EMULATE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """config kernel="gemv" (M <= 16): no tensor cores and no 16-row M tile. The nibbles are never interleaved:
    the low ones multiply the even columns of x, the high ones the odd columns, and the zero point is factored out
    of the dot, sum_k (u - z) x_k = sum_k u x_k - z sum_k x_k, so the unpack is a mask and a shift per byte."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    rj = tl.arange(0, BLOCK_K // 2)
    n_tiles = K // BLOCK_K
    per = tl.cdiv(n_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per + per, n_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per, t_end):
        k0 = t * BLOCK_K
        byte = tl.load(q_ptr + rn[:, None] * stride_qn + (k0 // 2 + rj)[None, :], mask=nmask[:, None], other=0)
        lo, hi = (byte & 0xF).to(tl.float32), (byte >> 4).to(tl.float32)  # [BN, BK/2] codes u of k0+2j, k0+2j+1
        xk = x_ptr + rm[:, None] * stride_xm + (k0 + 2 * rj)[None, :]
        x_even = tl.load(xk, mask=mmask[:, None], other=0.0).to(tl.float32)  # [BM, BK/2]
        x_odd = tl.load(xk + 1, mask=mmask[:, None], other=0.0).to(tl.float32)
        dot = tl.sum(lo[None, :, :] * x_even[:, None, :] + hi[None, :, :] * x_odd[:, None, :], axis=2)  # [BM, BN]
        s, z = group_scale_zero(s_ptr, z_ptr, rn, nmask, k0 // GROUP, stride_sn, stride_zn, HAS_ZERO)
        x_sum = tl.sum(x_even + x_odd, axis=1)  # [BM]
        acc += (dot - x_sum[:, None] * z[None, :]) * s[None, :]
    y_ptrs = y_ptr + pid_k * stride_ysplit + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, cast_rn(acc, y_ptr.dtype.element_ty, EMULATE), mask=mmask[:, None] & nmask[None, :])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so that the test shapes exercise split-K


def _config(M: int, N: int, K: int, group: int, device: torch.device) -> dict:
    """Launch heuristics (block sizes, split-K, warps). BLOCK_K always divides the group size."""
    if M <= 16:  # decode: memory bound; enough (N-tile, K-split) programs to keep every SM streaming weights
        bn, bk = 64, min(group, 128)
        n_tiles = K // bk
        split = max(1, min(n_tiles, triton.cdiv(2 * _num_sms(device), triton.cdiv(N, bn)), 16))
        return dict(block_m=16, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=4, unpack="interleave")
    bm = min(128, triton.next_power_of_2(M))
    return dict(block_m=bm, block_n=128, block_k=min(group, 64), split_k=1,
                num_warps=8 if bm >= 128 else 4, num_stages=3, unpack="interleave")


def int4_matmul(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                group_size: int, config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T for W in the int4 group layout above.

    x      [M, K] fp16 / bf16 (fp32 also works: IEEE fp32 dots), K-contiguous rows
    qdata  uint8 [N, K // 2], scale [N, K // group_size], zero uint8 [N, K // group_size] or None (symmetric)
    group_size: a power of two >= 16 dividing K.  config: overrides of `_config`'s launch parameters.
    Returns y [M, N] in x's dtype (fp32 accumulation).
    """
    if x.dim() != 2:
        raise ValueError(f"int4_matmul: x must be [M, K], got {list(x.shape)}")
    M, K = x.shape
    N = qdata.shape[0]
    if group_size < 16 or group_size & (group_size - 1) or K % group_size:
        raise ValueError(f"int4_matmul: group_size {group_size} must be a power of two >= 16 dividing K = {K}")
    if qdata.dtype != torch.uint8 or qdata.shape != (N, K // 2) or scale.shape != (N, K // group_size):
        raise ValueError(f"int4_matmul: x {list(x.shape)}, qdata {qdata.dtype} {list(qdata.shape)}, scale "
                         f"{list(scale.shape)} do not fit group {group_size}")
    if zero is not None and (zero.shape != scale.shape or zero.dtype != torch.uint8):
        raise ValueError("int4_matmul: zero must be uint8 with scale's shape")
    check_device(x, qdata, scale, zero)
    cfg = {**_config(M, N, K, group_size, x.device), **(config or {})}
    if group_size % cfg["block_k"]:
        raise ValueError(f"int4_matmul: block_k {cfg['block_k']} must divide group_size {group_size}")
    if cfg["unpack"] not in ("interleave", "split") or (cfg["unpack"] == "split" and cfg["block_k"] < 32):
        raise ValueError(f"int4_matmul: unpack {cfg['unpack']!r} must be 'interleave' or 'split' (block_k >= 32)")
    gemv = cfg.get("kernel", "mma") == "gemv"
    if cfg.get("kernel", "mma") not in ("mma", "gemv") or (gemv and (M > 16 or cfg["block_k"] < 32)):
        raise ValueError(f"int4_matmul: kernel {cfg.get('kernel')!r} must be 'mma' or 'gemv' (M <= 16, block_k >= 32)")
    x = x if x.stride(1) == 1 else x.contiguous()
    qdata, scale = qdata.contiguous(), scale.contiguous()
    z = zero.contiguous() if zero is not None else scale  # a placeholder pointer when HAS_ZERO is False
    split = cfg["split_k"]
    # split-K programs write fp32 partial sums [split, M, N], added up below; otherwise y directly
    y = torch.empty((split, M, N) if split > 1 else (1, M, N), dtype=torch.float32 if split > 1 else x.dtype,
                    device=x.device)
    if gemv:
        bm = cfg.get("gemv_block_m", min(4, triton.next_power_of_2(M)))  # rows per program: [BM, BN, BK/2] products
        _int4_gemv_kernel[(triton.cdiv(M, bm), triton.cdiv(N, cfg["block_n"]), split)](
            x, qdata, scale, z, y, M, N, K, x.stride(0), qdata.stride(0), scale.stride(0), z.stride(0),
            y.stride(1), y.stride(0), GROUP=group_size, HAS_ZERO=zero is not None, SPLIT_K=split,
            EMULATE=emulate_bf16(x), BLOCK_M=bm, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return y.sum(0).to(x.dtype) if split > 1 else y[0]
    grid = (triton.cdiv(M, cfg["block_m"]), triton.cdiv(N, cfg["block_n"]), split)
    _int4_matmul_kernel[grid](
        x, qdata, scale, z, y, M, N, K, x.stride(0), qdata.stride(0), scale.stride(0), z.stride(0),
        y.stride(1), y.stride(0), GROUP=group_size, HAS_ZERO=zero is not None, SPLIT_K=split,
        EMULATE=emulate_bf16(x), BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        SPLIT_NIBBLES=cfg["unpack"] == "split", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.sum(0).to(x.dtype) if split > 1 else y[0]


# ------------------------------------------------------------------------------------------------ reference


def int4_dequantize_ref(qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        group_size: int) -> torch.Tensor:
    """W [N, K] in fp32 from the packed layout (same values as Int4Group.dequantize)."""
    u = torch.stack([qdata & 0xF, qdata >> 4], dim=-1).reshape(*qdata.shape[:-1], -1).float()  # [.., N, K]
    z = zero.float() if zero is not None else torch.full_like(scale, 8, dtype=torch.float32)
    return (u - z.repeat_interleave(group_size, -1)) * scale.float().repeat_interleave(group_size, -1)


def int4_matmul_ref(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    """The semantics: dequantize W to x's dtype, then torch's matmul (x [..., K] -> [..., N])."""
    return x @ int4_dequantize_ref(qdata, scale, zero, group_size).to(x.dtype).T
