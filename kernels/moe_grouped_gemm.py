"""MoE experts as two grouped GEMMs (Gemma 4 26B-A4B: E = 128 experts, top-8, expert width Ie = 704, H = 2816).

Semantics (GEMMA4_SPEC.md §2.6; `moe_experts_ref` at the bottom defines them):
    x [T, H] (already normed, fp16/bf16), topk_ids [T, k] int, topk_weights [T, k] fp32
    for each token t and slot j, with e = topk_ids[t, j]:
        gu = x[t] @ gate_up[e].T                     gate_up [E, 2*Ie, H]; gate = rows [0, Ie), up = rows [Ie, 2*Ie)
        h  = gelu_tanh(gu[:Ie]) * gu[Ie:]
        y[t] += topk_weights[t, j] * per_expert_scale[e] * (h @ down[e].T)      down [E, H, Ie]
The routing weights are taken as given (renormalised over the top k). `per_expert_scale` [E] is optional: pass the
router's per-expert scale here, or fold it into topk_weights beforehand and pass None; both give the same y.

Weights per expert, stacked on a leading E dim, each of gate_up / down independently:
    float  [E, N, K] (bf16 / fp16 / fp32)
    int8   qdata int8 [E, N, K], scale [E, N]                       (Int8Channel per expert)
    int4   qdata uint8 [E, N, K // 2], scale [E, N, K // g], zero uint8 [E, N, K // g] or None  (Int4Group)

How (vLLM's fused_moe design, two kernels plus a torch sum):
  1. `moe_align` (torch, no host sync): sort the T*k (token, slot) assignments by expert and pad every expert's run
     to a multiple of BLOCK_M; each BLOCK_M block of the sorted list belongs to one expert. An expert with no tokens
     owns no block, so its weights are never read: it costs nothing. Programs past the last block return at once.
  2. gate_up kernel: per (block, N-tile of Ie) the gate and up tiles are accumulated side by side in fp32, then
     gelu_tanh(gate) * up is written once, in x's dtype, to h [T*k, Ie] at the assignment's row.
  3. down kernel: per (block, N-tile of H) h @ down[e].T, times the routing weight and per-expert scale (fp32),
     written to an fp32 buffer [T*k, H] at the assignment's row; y = buffer.view(T, k, H).sum(1) in fp32 scatters
     the assignments back to token order deterministically (no atomics).
At decode (T <= DECODE_MAX_TOKENS, or config decode=True) `moe_experts` runs moe_decode.py's kernels instead: one
program per (token, expert) pair and N tile, which spreads the few experts a token touches over the whole GPU.
Quantized tiles are dequantized in registers as in int4_matmul.py / int8_matmul.py (integer codes through the
tensor cores, scales on the fp32 partial products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rn, check_device, emulate_bf16, mma
from ._moe_tiles import FLOAT, INT4, INT8, expert_tile, gelu_tanh
from .int4_matmul import int4_dequantize_ref
from .moe_decode import decode_config, launch_moe_decode

DECODE_MAX_TOKENS = 16  # up to this many tokens, moe_decode.py's per-(token, expert) kernels (config decode=)


@triton.jit
def _moe_gate_up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, h_ptr, sorted_ptr, block_expert_ptr, A, I, K,
                        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_hm,
                        TOPK: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                        EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + blk).to(tl.int64)
    if e < 0:  # past the last block: no work
        return
    a = tl.load(sorted_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))  # assignment ids t * k + j; A = padding
    amask = a < A
    tok = a // TOPK
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of h = gate rows rn, up rows I + rn
    rk = tl.arange(0, BLOCK_K)
    we, se, ze = w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_ze
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + tok[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=amask[:, None] & ((k0 + rk)[None, :] < K), other=0.0)
        wg, sg = expert_tile(we, se, ze, rn, k0, 2 * I, K, stride_wn, stride_sn, stride_zn, x.dtype,
                              WFMT, GROUP, HAS_ZERO, BLOCK_K)
        wu, su = expert_tile(we, se, ze, I + rn, k0, 2 * I, K, stride_wn, stride_sn, stride_zn, x.dtype,
                              WFMT, GROUP, HAS_ZERO, BLOCK_K)
        if WFMT == 2:
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_g += mma(x, tl.trans(wg), zero, EMULATE) * sg[None, :]
            acc_u += mma(x, tl.trans(wu), zero, EMULATE) * su[None, :]
        else:
            acc_g = mma(x, tl.trans(wg), acc_g, EMULATE)
            acc_u = mma(x, tl.trans(wu), acc_u, EMULATE)
    if WFMT == 1:  # int8 channel scales
        acc_g *= tl.load(se + rn * stride_sn, mask=rn < I, other=0.0).to(tl.float32)[None, :]
        acc_u *= tl.load(se + (I + rn) * stride_sn, mask=rn < I, other=0.0).to(tl.float32)[None, :]
    h = gelu_tanh(acc_g) * acc_u
    tl.store(h_ptr + a[:, None] * stride_hm + rn[None, :], cast_rn(h, h_ptr.dtype.element_ty, EMULATE),
             mask=amask[:, None] & (rn[None, :] < I))


@triton.jit
def _moe_down_kernel(h_ptr, w_ptr, s_ptr, z_ptr, out_ptr, sorted_ptr, block_expert_ptr, tw_ptr, pes_ptr, A, N, K,
                     stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_om,
                     HAS_PES: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                     EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + blk).to(tl.int64)
    if e < 0:
        return
    a = tl.load(sorted_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
    amask = a < A
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns (H)
    rk = tl.arange(0, BLOCK_K)
    we, se, ze = w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_ze
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        h = tl.load(h_ptr + a[:, None] * stride_hm + (k0 + rk)[None, :],
                    mask=amask[:, None] & ((k0 + rk)[None, :] < K), other=0.0)
        w, s = expert_tile(we, se, ze, rn, k0, N, K, stride_wn, stride_sn, stride_zn, h.dtype,
                            WFMT, GROUP, HAS_ZERO, BLOCK_K)
        if WFMT == 2:
            acc += mma(h, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), EMULATE) * s[None, :]
        else:
            acc = mma(h, tl.trans(w), acc, EMULATE)
    if WFMT == 1:
        acc *= tl.load(se + rn * stride_sn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    wt = tl.load(tw_ptr + a, mask=amask, other=0.0).to(tl.float32)  # routing weight of each assignment
    if HAS_PES:
        wt = wt * tl.load(pes_ptr + e).to(tl.float32)
    acc = acc * wt[:, None]
    tl.store(out_ptr + a[:, None] * stride_om + rn[None, :], acc, mask=amask[:, None] & (rn[None, :] < N))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the T*k assignments by expert, each expert's run padded to a multiple of block_m (no host sync).

    Returns sorted_ids int32 [max_blocks * block_m] (assignment id t * k + j, or T * k for padding) and
    block_expert int32 [max_blocks] (the expert of each block, -1 past the last one). Experts with no tokens own no
    block. max_blocks = cdiv(T*k, block_m) + min(E, T*k) bounds sum_e cdiv(count_e, block_m) from above.
    """
    A = topk_ids.numel()
    flat = topk_ids.reshape(-1).long()
    # scatter_add rather than bincount: bincount on CUDA reads the largest id back to the host (a sync per call)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # end of each expert's padded run
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order inside
    fe = flat[order]
    rank = torch.arange(A, device=flat.device) - (counts.cumsum(0) - counts)[fe]  # position inside its expert
    max_blocks = triton.cdiv(A, block_m) + min(num_experts, A)
    sorted_ids = torch.full((max_blocks * block_m,), A, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[fe] + rank] = order.to(torch.int32)
    starts = torch.arange(max_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True)  # first expert whose run ends after the start
    block_expert = torch.where(starts < ends[-1], block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


def _weight_format(name: str, w: torch.Tensor, scale, zero, E: int, N: int, K: int, group_size: int) -> int:
    """Checks one expert weight stack and returns its WFMT."""
    if w.dtype == torch.uint8:
        ok = (scale is not None and w.shape == (E, N, K // 2) and group_size >= 16 and not group_size & (group_size - 1)
              and K % group_size == 0 and scale.shape == (E, N, K // group_size)
              and (zero is None or (zero.shape == scale.shape and zero.dtype == torch.uint8)))
        fmt = INT4
    elif w.dtype == torch.int8:
        ok, fmt = scale is not None and w.shape == (E, N, K) and scale.shape == (E, N) and zero is None, INT8
    else:
        ok, fmt = w.is_floating_point() and w.shape == (E, N, K) and scale is None and zero is None, FLOAT
    if not ok:
        raise ValueError(f"moe_experts: {name} {w.dtype} {list(w.shape)} (scale "
                         f"{None if scale is None else list(scale.shape)}, group {group_size}) fits none of the "
                         f"float / int8 / int4 expert layouts for E={E}, N={N}, K={K}")
    return fmt


def _config(A: int, E: int, group_size: int, fmts: tuple[int, int]) -> dict:
    """Launch heuristics (not tuned on a GPU yet): BLOCK_M near the mean tokens per expert."""
    per_expert = A / E
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    bk = min(group_size, 64) if INT4 in fmts else 64
    return dict(block_m=bm, block_n=64, block_k=bk, num_warps=4, num_stages=3)


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
                gate_up_zero: torch.Tensor | None = None, down_zero: torch.Tensor | None = None, group_size: int = 0,
                per_expert_scale: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y [T, H] in x's dtype = sum over the top-k experts of the routed expert MLPs (see the module docstring).

    x [T, H] fp16/bf16; topk_ids [T, k] ints in [0, E); topk_weights [T, k] (fp32); gate_up / down and their
    scale / zero in one of the expert layouts above (the format is read from the qdata dtype: uint8 = int4,
    int8 = int8, float = unquantized); group_size for int4; per_expert_scale [E] or None.
    """
    T, H = x.shape
    E = gate_up.shape[0]
    Ie = down.shape[2] * (2 if down.dtype == torch.uint8 else 1)
    fg = _weight_format("gate_up", gate_up, gate_up_scale, gate_up_zero, E, 2 * Ie, H, group_size)
    fd = _weight_format("down", down, down_scale, down_zero, E, H, Ie, group_size)
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(f"moe_experts: topk_ids {list(topk_ids.shape)} / topk_weights {list(topk_weights.shape)} "
                         f"must both be [T={T}, k]")
    if per_expert_scale is not None and per_expert_scale.shape != (E,):
        raise ValueError(f"moe_experts: per_expert_scale must be [E={E}], got {list(per_expert_scale.shape)}")
    check_device(x, topk_ids, topk_weights, gate_up, down, gate_up_scale, down_scale, gate_up_zero, down_zero,
                 per_expert_scale)
    k = topk_ids.shape[1]
    A = T * k
    decode = (config or {}).get("decode", T <= DECODE_MAX_TOKENS)
    if decode:
        default = decode_config(H, group_size, INT4 in (fg, fd), cuda=not emulate_bf16(x))
    else:
        default = _config(A, E, group_size, (fg, fd))
    cfg = {**default, **{key: v for key, v in (config or {}).items() if key != "decode"}}
    if INT4 in (fg, fd) and group_size % cfg["block_k"]:
        raise ValueError(f"moe_experts: block_k {cfg['block_k']} must divide group_size {group_size}")
    emulate = emulate_bf16(x)
    x = x.contiguous()

    def aux(w, s, z):  # real pointers where the format has them, a placeholder tensor otherwise
        s = s.contiguous() if s is not None else w
        z = z.contiguous() if z is not None else s
        return w.contiguous(), s, z

    wg, sg, zg = aux(gate_up, gate_up_scale, gate_up_zero)
    wd, sd, zd = aux(down, down_scale, down_zero)
    tw = topk_weights.reshape(-1).contiguous()
    pes = per_expert_scale.contiguous() if per_expert_scale is not None else None
    if decode:  # one program per (token, expert) pair and N tile: moe_decode.py
        out = launch_moe_decode(x, topk_ids.reshape(-1).contiguous(), tw, pes, (wg, sg, zg), (wd, sd, zd), Ie,
                                (fg, fd), group_size, (gate_up_zero is not None, down_zero is not None), cfg)
        return out.view(T, k, H).sum(1).to(x.dtype)
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    sorted_ids, block_expert = moe_align(topk_ids, E, bm)
    nb = block_expert.shape[0]
    h = torch.empty(A, Ie, dtype=x.dtype, device=x.device)
    _moe_gate_up_kernel[(nb, triton.cdiv(Ie, bn))](
        x, wg, sg, zg, h, sorted_ids, block_expert, A, Ie, H, x.stride(0), wg.stride(0), wg.stride(1),
        sg.stride(0), sg.stride(1) if sg.dim() > 1 else 0, zg.stride(0), zg.stride(1) if zg.dim() > 1 else 0,
        h.stride(0), TOPK=k, WFMT=fg, GROUP=max(group_size, 1), HAS_ZERO=gate_up_zero is not None, EMULATE=emulate,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out = torch.empty(A, H, dtype=torch.float32, device=x.device)
    pes = pes if pes is not None else tw
    _moe_down_kernel[(nb, triton.cdiv(H, bn))](
        h, wd, sd, zd, out, sorted_ids, block_expert, tw, pes, A, H, Ie, h.stride(0), wd.stride(0), wd.stride(1),
        sd.stride(0), sd.stride(1) if sd.dim() > 1 else 0, zd.stride(0), zd.stride(1) if zd.dim() > 1 else 0,
        out.stride(0), HAS_PES=per_expert_scale is not None, WFMT=fd, GROUP=max(group_size, 1),
        HAS_ZERO=down_zero is not None, EMULATE=emulate, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(T, k, H).sum(1).to(x.dtype)  # back to token order, fp32 sum over the k slots


# ------------------------------------------------------------------------------------------------ reference


def expert_weight_ref(w: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """One expert's (or a stack's) weight in fp32 from any of the three layouts."""
    if w.dtype == torch.uint8:
        return int4_dequantize_ref(w, scale, zero, group_size)
    if w.dtype == torch.int8:
        return scale.float()[..., None] * w.float()
    return w.float()


def moe_experts_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
                    down_scale: torch.Tensor | None = None, gate_up_zero: torch.Tensor | None = None,
                    down_zero: torch.Tensor | None = None, group_size: int = 0,
                    per_expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The semantics, one expert at a time (vLLM's torch_moe): weights dequantized to x's dtype, torch matmuls and
    activation in x's dtype, routing weights applied and summed in fp32, y cast to x's dtype."""
    T, H = x.shape
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)

    def sub(t, e):
        return None if t is None else t[e]

    for e in torch.unique(topk_ids).tolist():  # experts with no tokens are never touched
        tok, slot = torch.where(topk_ids == e)
        wgu = expert_weight_ref(gate_up[e], sub(gate_up_scale, e), sub(gate_up_zero, e), group_size).to(x.dtype)
        wd = expert_weight_ref(down[e], sub(down_scale, e), sub(down_zero, e), group_size).to(x.dtype)
        gu = x[tok] @ wgu.T  # [n, 2 * Ie]
        Ie = gu.shape[1] // 2
        h = torch.nn.functional.gelu(gu[:, :Ie], approximate="tanh") * gu[:, Ie:]
        w = topk_weights[tok, slot].float()
        if per_expert_scale is not None:
            w = w * per_expert_scale[e].float()
        y.index_add_(0, tok, (h @ wd.T).float() * w[:, None])
    return y.to(x.dtype)
