"""GPTQ for a stack of same-shape matrices at once: the experts of one MoE tensor (26B-A4B: 128 experts of
[1408, 2816] gate_up and [2816, 704] down per layer), each with its own Hessian. `gptq_experts` computes what
`gptq(w[e], H[e], fmt)` computes for every e, with the per-expert Python loop of small problems replaced by
batched operations over a chunk of B experts:

    H      [B, K, K] fp64   dead columns (H_ii = 0) get H_ii = 1; act-order permutation per expert (argsort of
                            each row of diag H, stable, as `HessianFactor`), applied with two gathers
    L      [B, K, K]        one batched damped Cholesky of the reversed H (`damped_inverse_cholesky`'s identity
                            U = P L^-1 P), a batched blocked triangular inverse
    sweep  W^T [B, K, N]    sweep position i holds column perm[e, i] of expert e; every column's rounding, error
                            and in-block rank-1 update is one batched op over the chunk, and each block's update of
                            the later columns one baddbmm

Per-expert exceptions run exactly as the loop runs them: an expert whose damped H is not positive definite at
`damp` goes through `damped_inverse_cholesky` alone (the same retries, the same warning, the same error); the
block parameters are fit per expert (`fmt.fit` on [N, K], as `gptq` does), so every expert stores on the grid
the loop would have chosen; formats that override `encode` and dynamic groups fall back to the loop.

Numerics: the same operations in the same precisions as `gptq`, the in-block rank-1 update fused (one rounding)
as the loop's `addr_` (BLAS ger) is. On the CPU every batched matrix product and factorization is the per-matrix
LAPACK / BLAS call of the loop, so the bytes equal the loop's (tests/algorithms/test_gptq_batched.py) and the
CPU pipeline batches too; on a GPU the batched kernels may sum in another order, so a result agrees with the
loop's to fp32 rounding (a code can differ where a value sits within rounding of a grid midpoint).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemmaquant.algorithms.gptq import _fit_unit, damped_inverse_cholesky, gptq
from gemmaquant.algorithms.rtn import check_finite
from gemmaquant.formats.base import QuantFormat, nearest_level

CHUNK_BYTES = 1 << 30  # default working memory of one chunk of experts on the CPU (a quarter of free on a GPU)


def _chunk_experts(E: int, N: int, K: int, device: torch.device, chunk_bytes: int | None) -> int:
    """Experts per chunk: H, its reversed copy, L and L^-1 in fp64 (4 x 8 K^2), U in fp32, and the sweep's
    W^T, codes, errors and per-position grid in fp32 (about 6 x 4 N K) per expert."""
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES
        if device.type == "cuda" and torch.cuda.is_available():
            chunk_bytes = torch.cuda.mem_get_info(device)[0] // 4
    per_expert = 36 * K * K + 24 * N * K
    return max(1, min(E, chunk_bytes // per_expert))


def _lower_triangular_inverse(L: Tensor, block: int = 512) -> Tensor:
    """`gptq.lower_triangular_inverse` over a batch [B, K, K]."""
    B, K, _ = L.shape
    Linv = torch.zeros_like(L)
    for c0 in range(0, K, block):
        c1 = min(c0 + block, K)
        rhs = torch.eye(K - c0, c1 - c0, dtype=L.dtype, device=L.device).expand(B, K - c0, c1 - c0)
        Linv[:, c0:, c0:c1] = torch.linalg.solve_triangular(L[:, c0:, c0:], rhs, upper=False)
    return Linv


def _factor(H: Tensor, damp: float, act_order: bool):
    """H [B, K, K] fp32 Hessians -> (dead [B, K], diag [B, K] fp32, perm [B, K], U [B, K, K] fp32), each expert's
    as `HessianFactor(H[e], damp, act_order)` gives them."""
    B, K, _ = H.shape
    H = H.to(torch.float64, copy=True)
    diagonal = H.diagonal(dim1=1, dim2=2)  # [B, K] view
    dead = diagonal == 0
    diagonal.masked_fill_(dead, 1.0)
    diag = diagonal.float().clone()
    if act_order:
        perm = torch.argsort(diagonal, dim=1, descending=True, stable=True)  # [B, K] position -> column
        H = H.gather(1, perm[:, :, None].expand(B, K, K)).gather(2, perm[:, None, :].expand(B, K, K))
    else:
        perm = torch.arange(K, device=H.device).expand(B, K)
    mean_diag = H.diagonal(dim1=1, dim2=2).mean(1)  # [B]
    Hd = H.flip(1, 2)
    Hd.diagonal(dim1=1, dim2=2).add_(damp * mean_diag[:, None])
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd
    U = _lower_triangular_inverse(L).flip(1, 2)
    del L
    ok = (info == 0) & torch.isfinite(U).flatten(1).all(1) & (U.diagonal(dim1=1, dim2=2) > 0).all(1)
    for e in (~ok).nonzero().flatten().tolist():  # not PD at `damp`: the loop's retries, one expert at a time
        U[e], _ = damped_inverse_cholesky(H[e], damp)
    return dead, diag, perm, U.float()


@torch.no_grad()
def gptq_experts(w: Tensor, H: Tensor, fmt, *, damp: float = 0.01, block_size: int = 128, act_order: bool = True,
                 static_groups: bool = True, importance_params: bool = False,
                 chunk_bytes: int | None = None) -> list:
    """GPTQ-quantize each w[e] [N, K] with its Hessian H[e] [K, K] onto `fmt` -> [Packed per expert], what
    `[gptq(w[e], H[e], fmt, ...) for e]` returns (see the module docstring for how it is batched).

    w: [E, N, K] any float dtype. H: [E, K, K], or a list of E [K, K] tensors or of functions that return one
    (called one chunk of experts at a time, so that only a chunk's Hessians need exist at once).
    chunk_bytes: working memory for one chunk of experts (default 1 GiB on the CPU, a quarter of the free memory
    on a GPU). Raises ValueError as `gptq` does (non-finite w or H, bad shapes, an unusable H)."""
    if w.ndim != 3:
        raise ValueError(f"w must be a 3-D [E, N, K] stack, got shape {tuple(w.shape)}")
    E, N, K = w.shape
    if len(H) != E:
        raise ValueError(f"H must hold one [K, K] Hessian per expert: {E} for w of shape {tuple(w.shape)}, "
                         f"got {len(H)}")
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    dynamic = not static_groups and _fit_unit(fmt, K) < K
    if dynamic or type(fmt).encode is not QuantFormat.encode or block_size <= 0:
        return [gptq(w[e], _hessians(H[e:e + 1], K)[0], fmt, damp=damp, block_size=block_size,
                     act_order=act_order, static_groups=static_groups, importance_params=importance_params)
                for e in range(E)]
    B = _chunk_experts(E, N, K, w.device, chunk_bytes)
    out = []
    for e0 in range(0, E, B):
        e1 = min(E, e0 + B)
        H_chunk = _hessians(H[e0:e1], K).to(w.device)
        out += _sweep(w[e0:e1], H_chunk, fmt, damp, block_size, act_order, importance_params)
    return out


def _hessians(H, K: int) -> Tensor:
    """A slice of the Hessians (a tensor, or a list of tensors / functions returning one) -> [b, K, K]."""
    if isinstance(H, Tensor):
        stack = H
    else:
        stack = torch.stack([h() if callable(h) else h for h in H])
    if tuple(stack.shape[1:]) != (K, K):
        raise ValueError(f"H must be [K, K] = [{K}, {K}] per expert, got {tuple(stack.shape[1:])}")
    return stack


def _sweep(w: Tensor, H: Tensor, fmt, damp: float, block_size: int, act_order: bool,
           importance_params: bool) -> list:
    B, N, K = w.shape
    if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(H).all())):  # one device sync, then the
        for e in range(B):                                                     # loop's checks in its order
            check_finite(w[e], "w")
            check_finite(H[e], "H")
    dead, diag, perm, U = _factor(H, damp, act_order)
    dev = w.device
    W = w.detach().to(dev, torch.float32, copy=True)  # [B, N, K]
    W.masked_fill_(dead[:, None, :], 0.0)
    params = [fmt.fit(W[e], importance=diag[e] if importance_params else None) for e in range(B)]
    grids = [fmt.grid(p) for p in params]  # (scale [N, G], offset [N, G], qmin, qmax) per expert
    qmin, qmax = grids[0][2], grids[0][3]
    G = grids[0][0].shape[1]
    gsize = K // G
    scale = torch.stack([g[0].float().T for g in grids])  # [B, G, N]
    offset = torch.stack([g[1].float().T for g in grids])
    group_at = (perm // gsize)[:, :, None].expand(B, K, N)  # [B, K, N] the group of the column at each position
    S, O = scale.gather(1, group_at), offset.gather(1, group_at)  # [B, K, N] each position's grid
    zero_at = (scale == 0).any(2).gather(1, perm // gsize)  # [B, K] an all-zero block somewhere in that group
    zero_any = zero_at.any(0).tolist()  # [K] host flags: the rare positions that need fmt.encode
    cols = perm.tolist() if any(zero_any) else None
    levels = getattr(fmt, "levels", None)  # a codebook grid (IQ4_NL, IQ4_XS): w_hat = s * levels[q] + o
    levels = None if levels is None else levels.to(dev)
    WT = W.transpose(1, 2).gather(1, perm[:, :, None].expand(B, K, N))  # [B, K, N] in each expert's sweep order
    del W
    codes_sweep = torch.empty(B, K, N, dtype=torch.float32, device=dev)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = WT[:, i1:i2]  # [B, b, N] view, updated in place
        E1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = i1 + i
            x, s, o = W1[:, i], S[:, p], O[:, p]  # [B, N]
            y = (x - o) / s
            if levels is not None:  # as gptq's _Grid.round: the nearest level, not the nearest integer
                q = nearest_level(y, levels).float()
            else:
                q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp_(qmin, qmax)
            if zero_any[p]:  # rows whose block has scale 0 take the format's code, as _Grid.round does
                for e in zero_at[:, p].nonzero().flatten().tolist():
                    j = cols[e][p]
                    enc = fmt.encode(x[e][:, None], params[e], col_start=j)[:, 0].to(q.dtype)
                    q[e] = torch.where(s[e] == 0, enc, q[e])
            x_hat = s * (q if levels is None else levels[q.long()]) + o
            codes_sweep[:, p] = q
            err = (x - x_hat) / U1[:, i, i, None]  # [B, N]
            # later columns of the block: w -= u * err in one rounding (fused), as the loop's addr_ (BLAS ger)
            W1[:, i + 1:].addcmul_(U1[:, i, i + 1:, None], err[:, None, :], value=-1.0)
            E1[:, i] = err
        WT[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), E1, alpha=-1.0)  # the block's errors onward
    codesT = torch.empty_like(codes_sweep).scatter_(1, perm[:, :, None].expand(B, K, N), codes_sweep)
    codes = codesT.transpose(1, 2)  # [B, N, K] in original column order
    dtype = fmt.encode(w[0, :, :1].float(), params[0]).dtype
    return [fmt.pack(codes[e].to(dtype).contiguous(), params[e]) for e in range(B)]
