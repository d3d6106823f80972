"""MoE experts at decode (T <= 16 tokens): one program per (token, expert) pair and output tile, no tensor cores.

The semantics are moe_grouped_gemm.py's (`moe_experts_ref` defines them); `moe_experts` picks this path for small T.
Why another kernel: at T = 1 a token touches k = 8 of 128 experts, and the grouped GEMM pads each expert's one
token to a BLOCK_M = 16 block, which leaves 8 blocks x 11 N-tiles of work for 132 SMs (6% of the bandwidth on an
H200, docs/kernels.md). Here the grid is (T * k assignments, N tiles) with a small BLOCK_N, so the same weights are
spread over many more programs, each streaming its [BLOCK_N, K] slice of one expert once:
    gate_up: program (a, n) computes gate rows n*BN .. and up rows Ie + n*BN .. of assignment a's expert against
             x[a // k] (fp32 multiply-adds, tl.sum over BLOCK_K), then h = gelu_tanh(gate) * up in x's dtype;
    down:    program (a, n) computes rows n*BN .. of down[e] @ h[a], times the routing weight and per-expert scale,
             into the fp32 buffer [T*k, H] that the wrapper sums over the k slots (no atomics, deterministic).
Weight tiles are the shared `expert_tile` (codes for int8 / int4, the int4 group scale applied per K-tile, the int8
channel scale in the epilogue), so every layout the grouped kernels take works here too. An expert that no token
chose is never read. Tokens that share an expert read it once each (from L2 when they run close together): at
T <= 16 over 128 experts that is rare.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rn, emulate_bf16
from ._moe_tiles import expert_tile, gelu_tanh


@triton.jit
def _moe_gate_up_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, h_ptr, ids_ptr, I, K,
                             stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_hm,
                             TOPK: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                             EMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    e = tl.load(ids_ptr + a).to(tl.int64)
    tok = a // TOPK
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of h: gate rows rn, up rows I + rn
    we, se, ze = w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_ze
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tok * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
        wg, sg = expert_tile(we, se, ze, rn, k0, 2 * I, K, stride_wn, stride_sn, stride_zn, tl.float32,
                             WFMT, GROUP, HAS_ZERO, BLOCK_K)
        wu, su = expert_tile(we, se, ze, I + rn, k0, 2 * I, K, stride_wn, stride_sn, stride_zn, tl.float32,
                             WFMT, GROUP, HAS_ZERO, BLOCK_K)
        pg = tl.sum(wg * x[None, :], axis=1)  # exact products (bf16 / fp16 x times codes or weights), fp32 sums
        pu = tl.sum(wu * x[None, :], axis=1)
        if WFMT == 2:
            acc_g += pg * sg  # the group scale on the fp32 partial sum, as in int4_matmul
            acc_u += pu * su
        else:
            acc_g += pg
            acc_u += pu
    if WFMT == 1:  # int8 channel scales
        acc_g *= tl.load(se + rn * stride_sn, mask=rn < I, other=0.0).to(tl.float32)
        acc_u *= tl.load(se + (I + rn) * stride_sn, mask=rn < I, other=0.0).to(tl.float32)
    h = gelu_tanh(acc_g) * acc_u
    tl.store(h_ptr + a * stride_hm + rn, cast_rn(h, h_ptr.dtype.element_ty, EMULATE), mask=rn < I)


@triton.jit
def _moe_down_gemv_kernel(h_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ids_ptr, tw_ptr, pes_ptr, N, K,
                          stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_om,
                          HAS_PES: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    e = tl.load(ids_ptr + a).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns (H)
    we, se, ze = w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_ze
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + a * stride_hm + rk, mask=rk < K, other=0.0).to(tl.float32)
        w, s = expert_tile(we, se, ze, rn, k0, N, K, stride_wn, stride_sn, stride_zn, tl.float32,
                           WFMT, GROUP, HAS_ZERO, BLOCK_K)
        part = tl.sum(w * h[None, :], axis=1)
        if WFMT == 2:
            acc += part * s
        else:
            acc += part
    if WFMT == 1:
        acc *= tl.load(se + rn * stride_sn, mask=rn < N, other=0.0).to(tl.float32)
    wt = tl.load(tw_ptr + a).to(tl.float32)  # the assignment's routing weight
    if HAS_PES:
        wt = wt * tl.load(pes_ptr + e).to(tl.float32)
    tl.store(out_ptr + a * stride_om + rn, acc * wt, mask=rn < N)


def decode_config(K: int, group_size: int, int4: bool, cuda: bool) -> dict:
    """Launch parameters (not yet timed on a GPU): a narrow N tile so that T * k pairs still fill the SMs. The
    interpreter runs programs one after another, so there a wider tile keeps the tests short."""
    block_k = min(group_size, 128) if int4 else min(128, triton.next_power_of_2(K))
    return dict(block_n=16 if cuda else 32, block_k=block_k,
                num_warps=4, num_stages=3)


def launch_moe_decode(x, ids, tw, pes, gate_up, down, Ie, fmts, group_size, has_zero, cfg) -> torch.Tensor:
    """The two decode kernels on prepared (contiguous, checked) operands: gate_up / down are (w, scale, zero)
    triples with placeholders where the format has none; returns the fp32 per-assignment buffer [T * k, H]."""
    (wg, sg, zg), (wd, sd, zd) = gate_up, down
    A, H = ids.numel(), x.shape[1]
    bn, bk = cfg["block_n"], cfg["block_k"]
    h = torch.empty(A, Ie, dtype=x.dtype, device=x.device)
    _moe_gate_up_gemv_kernel[(A, triton.cdiv(Ie, bn))](
        x, wg, sg, zg, h, ids, Ie, H, x.stride(0), wg.stride(0), wg.stride(1),
        sg.stride(0), sg.stride(1) if sg.dim() > 1 else 0, zg.stride(0), zg.stride(1) if zg.dim() > 1 else 0,
        h.stride(0), TOPK=A // x.shape[0], WFMT=fmts[0], GROUP=max(group_size, 1), HAS_ZERO=has_zero[0],
        EMULATE=emulate_bf16(x), BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    out = torch.empty(A, H, dtype=torch.float32, device=x.device)
    _moe_down_gemv_kernel[(A, triton.cdiv(H, bn))](
        h, wd, sd, zd, out, ids, tw, pes if pes is not None else tw, H, Ie, h.stride(0), wd.stride(0), wd.stride(1),
        sd.stride(0), sd.stride(1) if sd.dim() > 1 else 0, zd.stride(0), zd.stride(1) if zd.dim() > 1 else 0,
        out.stride(0), HAS_PES=pes is not None, WFMT=fmts[1], GROUP=max(group_size, 1), HAS_ZERO=has_zero[1],
        BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
