"""Fused sliding-window attention (flash-attention-style online softmax) for Gemma 4 (GEMMA4_SPEC.md §2.4).

Semantics (`swa_attention_ref` / `swa_decode_ref` at the bottom define them):
    q [B, Hq, L, D], k / v [B, Hkv, S, D]; query head j reads kv head j // (Hq / Hkv) (grouped-query attention)
    query i sits at absolute position q_offset + i (default q_offset = S - L: the queries are the last L keys)
    key at position p is visible to a query at position t  iff  0 <= t - p < W   (causal sliding window;
    window=None means W = infinity: causal full attention, Gemma 4's full layers)
    o = softmax(scale * q k^T + mask) v, softmax in fp32; scale is an argument (Gemma 4 uses 1.0)

`swa_attention` (prefill / chunked prefill over contiguous K/V): one program per (BLOCK_M queries, batch, q head).
It visits only the key blocks that intersect [first query - W + 1, last query], so the work is O(L * W) rather than
O(L^2); the mask is applied inside those blocks. Scores and the running max / sum are fp32 (exp2 with log2(e)
folded into the scale); the unnormalised probabilities go to the tensor cores in v's dtype, as in flash-attention.

`swa_decode` (decode / short chunks against a KV cache): the cache k_cache / v_cache [B, Hkv, C, D] is a ring
buffer of capacity C: position p lives in slot p % C (a linear cache is the case C >= length, where it never
wraps; Gemma's sliding layers need only C = W + L - 1). seqlens [B] counts the tokens written so far, the L new ones
included, so the queries sit at positions seqlens - L .. seqlens - 1. A position is in the cache iff
p >= seqlens - C, and visible iff it is in the cache and in the query's window. One program per (batch, kv head,
KV split) packs the G = Hq / Hkv query heads x L queries of its kv head into one M tile (the K/V tile is loaded once
for all of them) and walks its share of the visible positions (flash-decoding split-KV); the partial softmax states
(max, sum, unnormalised output) are merged in fp32 by a second kernel (`merge_splits`, one launch).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import cast_rn, check_device, emulate_bf16, mma

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(q, k, v, m_i, l_i, acc, qpos, kpos, kmask, window, qk_scale,
                         HAS_WINDOW: tl.constexpr, EMULATE: tl.constexpr):
    """One key block of the online softmax: q [M, D], k / v [N, D], positions qpos [M] / kpos [N], scores in the
    log2 domain. Returns the updated (running max m_i, running sum l_i, unnormalised output acc)."""
    s = mma(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), dtype=tl.float32), EMULATE) * qk_scale
    d = qpos[:, None] - kpos[None, :]  # query position - key position
    vis = (d >= 0) & kmask[None, :]
    if HAS_WINDOW:
        vis = vis & (d < window)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet: keep exp2 finite
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = mma(cast_rn(p, v.dtype, EMULATE), v, acc * alpha[:, None], EMULATE)
    return m_new, l_i, acc


@triton.jit
def _swa_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, L, S, q_offset, window, qk_scale, H, G,
                    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_ol,
                    HAS_WINDOW: tl.constexpr, EMULATE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H  # int64: a batch of long K/V passes 2^31 elements
    kvh = h // G
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D)
    qpos = q_offset + rm
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rm[:, None] * stride_ql + rd[None, :], mask=(rm < L)[:, None],
                other=0.0)
    kb = k_ptr + b * stride_kb + kvh * stride_kh
    vb = v_ptr + b * stride_vb + kvh * stride_vh
    # the keys this query block can see: [lo, hi); lo rounded down to a key block
    hi = tl.minimum(S, q_offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, L))
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, q_offset + pid_m * BLOCK_M - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kmask = rn < S
        k = tl.load(kb + rn[:, None] * stride_ks + rd[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(vb + rn[:, None] * stride_vs + rd[None, :], mask=kmask[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, qpos, rn, kmask, window, qk_scale,
                                             HAS_WINDOW, EMULATE)
    o = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rm[:, None] * stride_ol + rd[None, :],
             cast_rn(o, o_ptr.dtype.element_ty, EMULATE), mask=(rm < L)[:, None])


# The fastest of 8 prefill configs per head dim on an H200 (benchmarks/tune_kernels.py): 2.6x (D = 256, sliding,
# 32K tokens) and 2.2x (D = 512, full, 4K) the defaults below. Timed there, not yet tested there: the defaults
# passed the kernel tests on the H200, these only in the interpreter. tests/kernels/test_swa_attention.py runs
# them, so the next GPU run of scripts/gpu_check.sh checks them before they replace the defaults (docs/kernels.md).
H200_TIMED_PREFILL = {256: dict(block_m=128, block_n=64, num_warps=8, num_stages=2),
                      512: dict(block_m=64, block_n=64, num_warps=8, num_stages=1)}  # 2 stages exceed 227 KiB


def prefill_config(D: int, cuda: bool) -> dict:
    """swa_attention's launch parameters. On CUDA the fp32 accumulator [BLOCK_M, D] must fit in registers."""
    if not cuda:  # the interpreter: small tiles, so that the test shapes cross block edges
        return dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    return dict(block_m=64 if D <= 256 else 32, block_n=64 if D <= 128 else 32, num_warps=4 if D <= 128 else 8,
                num_stages=2)


def decode_config(G: int, L: int, D: int, cuda: bool) -> dict:
    """swa_decode's launch parameters: one M tile holds the G query heads x L queries of a kv head."""
    return dict(block_m=max(16, triton.next_power_of_2(G * L)), block_n=(64 if D <= 256 else 32) if cuda else 16,
                num_warps=4 if D <= 256 else 8, num_stages=2 if cuda else 1)


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} must be "
                         f"[B, Hq, L, D] and [B, Hkv, S, D]")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    D = q.shape[3]
    if D < 16 or D & (D - 1):
        raise ValueError(f"attention: head_dim {D} must be a power of two >= 16")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def swa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, scale: float = 1.0,
                  q_offset: int | None = None, config: dict | None = None) -> torch.Tensor:
    """Causal (sliding-window when `window` is given) attention over contiguous K/V; returns o [B, Hq, L, D].

    q [B, Hq, L, D], k / v [B, Hkv, S, D] (fp16 / bf16 / fp32, head_dim a power of two, 256 and 512 for Gemma 4);
    query i is at position q_offset + i (default S - L; q_offset + L <= S, so every query sees at least itself).
    """
    _check_qkv(q, k, v)
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q_offset = S - L if q_offset is None else q_offset
    if q_offset < 0 or q_offset + L > S:
        raise ValueError(f"attention: queries at positions [{q_offset}, {q_offset + L}) must lie within the {S} keys")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1 or None, got {window}")
    check_device(q, k, v)
    cfg = {**prefill_config(D, q.device.type == "cuda"), **(config or {})}
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    o = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(L, cfg["block_m"]), B * H)
    _swa_fwd_kernel[grid](
        q, k, v, o, L, S, q_offset, window or 0, scale * LOG2E, H, H // Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        HAS_WINDOW=window is not None, EMULATE=emulate_bf16(q), BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], D=D,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o


@triton.jit
def _swa_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr, seqlens_ptr, L, C, window, qk_scale, Hkv, G, chunk,
                       stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_ks,
                       stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_ol, stride_os,
                       stride_mb, stride_mh, stride_ml,
                       HAS_WINDOW: tl.constexpr, EMULATE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, kvh = (pid_bh // Hkv).to(tl.int64), pid_bh % Hkv  # int64: B x C x D of a long cache passes 2^31
    r = tl.arange(0, BLOCK_M)  # row r = (query head kvh * G + r // L, query r % L)
    rmask = r < G * L
    hq = kvh * G + r // L
    qi = r % L
    rd = tl.arange(0, D)
    n = tl.load(seqlens_ptr + b)  # tokens in the cache, the L new ones included
    qpos = n - L + qi
    q = tl.load(q_ptr + b * stride_qb + hq[:, None] * stride_qh + qi[:, None] * stride_ql + rd[None, :],
                mask=rmask[:, None], other=0.0)
    lo = tl.maximum(0, n - C)  # older positions were overwritten in the ring
    if HAS_WINDOW:
        lo = tl.maximum(lo, n - L - window + 1)  # nothing older is in the first query's window
    s_lo = lo + split * chunk
    s_hi = tl.minimum(n, s_lo + chunk)
    kb = k_ptr + b * stride_kb + kvh * stride_kh
    vb = v_ptr + b * stride_vb + kvh * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for p0 in range(s_lo, s_hi, BLOCK_N):
        pos = p0 + tl.arange(0, BLOCK_N)
        pmask = pos < s_hi
        slot = pos % C  # the ring
        k = tl.load(kb + slot[:, None] * stride_ks + rd[None, :], mask=pmask[:, None], other=0.0)
        v = tl.load(vb + slot[:, None] * stride_vs + rd[None, :], mask=pmask[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, qpos, pos, pmask, window, qk_scale,
                                             HAS_WINDOW, EMULATE)
    row = b * stride_mb + hq * stride_mh + qi * stride_ml + split
    tl.store(m_ptr + row, m_i, mask=rmask)
    tl.store(l_ptr + row, l_i, mask=rmask)
    tl.store(o_ptr + b * stride_ob + hq[:, None] * stride_oh + qi[:, None] * stride_ol + split * stride_os
             + rd[None, :],
             acc, mask=rmask[:, None])


def swa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
               window: int | None = None, scale: float = 1.0, num_splits: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """Attention of L new queries per sequence against a (ring-buffer) KV cache; returns o [B, Hq, L, D].

    q [B, Hq, L, D]; k_cache / v_cache [B, Hkv, C, D] with position p in slot p % C; seqlens [B] int (tokens
    written, the L new ones included: the queries are at positions seqlens - L .. seqlens - 1). G * L = Hq / Hkv * L
    query rows share one program, at most 128 (longer chunks: use swa_attention).
    """
    _check_qkv(q, k_cache, v_cache)
    B, H, L, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    if seqlens.shape != (B,) or seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attention: seqlens must be an int tensor [B={B}], got {seqlens.dtype} {list(seqlens.shape)}")
    if G * L > 128:
        raise ValueError(f"attention: {G} heads x {L} queries per kv head exceed the decode kernel's 128 rows")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1 or None, got {window}")
    check_device(q, k_cache, v_cache, seqlens)
    cuda = q.device.type == "cuda"
    cfg = {**decode_config(G, L, D, cuda), **(config or {})}
    span = min(C, window + L - 1) if window is not None else C  # most positions one query block can visit
    if num_splits is None:  # enough programs for every SM, but no split under 4 key blocks
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if cuda else 4
        num_splits = max(1, min(triton.cdiv(2 * sms, B * Hkv), triton.cdiv(span, 4 * cfg["block_n"])))
    chunk = triton.cdiv(triton.cdiv(span, num_splits), cfg["block_n"]) * cfg["block_n"]
    q, k_cache, v_cache = _last_contiguous(q), _last_contiguous(k_cache), _last_contiguous(v_cache)
    o_part = torch.empty(B, H, L, num_splits, D, dtype=torch.float32, device=q.device)
    m_part = torch.empty(B, H, L, num_splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _swa_decode_kernel[(B * Hkv, num_splits)](
        q, k_cache, v_cache, o_part, m_part, l_part, seqlens, L, C, window or 0, scale * LOG2E, Hkv, G, chunk,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        m_part.stride(0), m_part.stride(1), m_part.stride(2),
        HAS_WINDOW=window is not None, EMULATE=emulate_bf16(q), BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], D=D,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return merge_splits(o_part, m_part, l_part, q.dtype)


@triton.jit
def _merge_splits_kernel(o_part_ptr, m_ptr, l_ptr, o_ptr, num_splits, SPLITS: tl.constexpr, D: tl.constexpr,
                         EMULATE: tl.constexpr):
    # one program per query row (b, h, l): o = sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s, m = max_s m_s
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS)
    m_s = tl.load(m_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(m_s, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: keep exp2 finite (the row is then 0 / 0)
    rd = tl.arange(0, D)
    acc = tl.zeros((D,), dtype=tl.float32)
    den = 0.0
    for j in range(num_splits):  # one [D] row at a time: a [SPLITS, D] tile would not fit in registers at D = 512
        w = tl.exp2(tl.load(m_ptr + row * num_splits + j) - m)  # an empty split has m_j = -inf: weight 0
        acc += w * tl.load(o_part_ptr + (row * num_splits + j) * D + rd)
        den += w * tl.load(l_ptr + row * num_splits + j)
    tl.store(o_ptr + row * D + rd, cast_rn(acc / den, o_ptr.dtype.element_ty, EMULATE))


def merge_splits(o_part: torch.Tensor, m_part: torch.Tensor, l_part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merge flash-decoding's partial softmax states in one launch (the torch merge took 8): o_part [..., S, D],
    m_part / l_part [..., S] fp32 contiguous, each split's (max, sum, unnormalised output) in the log2 domain, an
    empty split with m = -inf. Returns [..., D] in `dtype`; `merge_splits_ref` is the same in torch."""
    *lead, S, D = o_part.shape
    out = torch.empty(*lead, D, dtype=dtype, device=o_part.device)
    rows = out.numel() // D
    if rows:
        _merge_splits_kernel[(rows,)](o_part.contiguous(), m_part.contiguous(), l_part.contiguous(), out, S,
                                      SPLITS=triton.next_power_of_2(S), D=D, EMULATE=emulate_bf16(out))
    return out


def merge_splits_ref(o_part: torch.Tensor, m_part: torch.Tensor, l_part: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    m = m_part.amax(-1, keepdim=True)
    w = torch.exp2(m_part - torch.where(m == float("-inf"), 0.0, m))  # [..., splits]
    return ((o_part * w[..., None]).sum(-2) / (l_part * w).sum(-1, keepdim=True)).to(dtype)


# ------------------------------------------------------------------------------------------------ reference


def _attend_ref(q, k, v, visible, scale):
    """Plain torch attention at q's precision, as transformers' eager Gemma 4: scores in q's dtype, fp32 softmax,
    probabilities cast back to q's dtype for the product with v. visible [B or 1, 1, L, S] bool."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # GQA: head j reads kv head j // G
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.float().masked_fill(~visible, float("-inf"))
    return torch.softmax(s, dim=-1).to(q.dtype) @ v


def swa_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                      scale: float = 1.0, q_offset: int | None = None) -> torch.Tensor:
    """The semantics of swa_attention, with the mask built explicitly (nanochat's _sdpa_attention)."""
    L, S = q.shape[2], k.shape[2]
    qpos = torch.arange(L, device=q.device) + (S - L if q_offset is None else q_offset)
    d = qpos[:, None] - torch.arange(S, device=q.device)[None, :]  # [L, S] query position - key position
    visible = (d >= 0) & (d < (window if window is not None else S + L + 1))
    return _attend_ref(q, k, v, visible[None, None], scale)


def swa_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                   window: int | None = None, scale: float = 1.0) -> torch.Tensor:
    """The semantics of swa_decode: slot s of the ring holds position p(s) = n - 1 - ((n - 1 - s) mod C) when
    p(s) >= 0 (n = seqlens[b]); it is visible to the query at position t iff 0 <= t - p(s) < W."""
    L, C = q.shape[2], k_cache.shape[2]
    n = seqlens.long()[:, None, None]  # [B, 1, 1]
    slot = torch.arange(C, device=q.device)[None, None, :]
    pos = n - 1 - torch.remainder(n - 1 - slot, C)  # [B, 1, C]
    qpos = n - L + torch.arange(L, device=q.device)[None, :, None]  # [B, L, 1]
    d = qpos - pos  # [B, L, C]
    visible = (pos >= 0) & (d >= 0) & (d < (window if window is not None else math.inf))
    return _attend_ref(q, k_cache, v_cache, visible[:, None], scale)
