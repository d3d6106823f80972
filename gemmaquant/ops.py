"""Every hot op of the quantized model, deciding per call between a Triton kernel and its pure-torch reference.

    ops.int4_matmul(x, qdata, scale, zero, group_size)   y = x @ W^T, W int4 group-wise (Int4Group layout)
    ops.int8_matmul(x, qdata, scale, act_quant=False)    y = x @ W^T, W int8 per channel; W8A16 or W8A8 (dynamic
                                                         per-token activation quantization)
    ops.linear(x, packed)                                any Packed weight: int4 / int8 kernels, else dequantize
    ops.moe_experts(x, topk_ids, topk_weights, gate_up, down, ...)   Gemma 4 MoE experts (GEMMA4_SPEC §2.6)
    ops.attention(q, k, v, window=, scale=, q_offset=, cache_seqlens=)   causal / sliding-window GQA attention,
                                                         over contiguous K/V or over a ring-buffer KV cache

Which implementation runs is decided at each call, never at import time: the `impl=` argument if given, else the
innermost `with ops.use("triton" | "reference"):` block, else the Triton kernel for CUDA tensors whose shapes the
kernel supports and the reference everywhere else. Forcing "triton" on CPU tensors runs the kernels in Triton's
interpreter (TRITON_INTERPRET=1 must be set before triton is imported); forcing it on a shape the kernel does not
support is an error rather than a silent fallback.

The kernels are registered as torch custom ops (`torch.ops.gemmaquant.*`, with fake implementations giving the
output shapes), so `torch.compile` traces them as single opaque nodes; the references are plain torch and trace
like any other code. The kernels and references live in `gemmaquant.kernels` (kernels/), imported lazily here.
"""

import contextlib
import threading
from typing import Optional

import torch
from torch import Tensor

IMPLS = ("triton", "reference")
_state = threading.local()


@contextlib.contextmanager
def use(impl: str):
    """Force "triton" or "reference" for every op called inside the block (in this thread); blocks nest."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    old = getattr(_state, "impl", None)
    _state.impl = impl
    try:
        yield
    finally:
        _state.impl = old


def resolve(x: Tensor, impl: Optional[str] = None, unsupported: str = "") -> str:
    """The implementation an op on `x` runs now: `impl`, else the `use` block's, else triton on CUDA when the kernel
    supports the call (`unsupported` is empty) and the reference otherwise."""
    impl = impl or getattr(_state, "impl", None)
    if impl is None:
        return "triton" if x.is_cuda and not unsupported else "reference"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    if impl == "triton" and unsupported:
        raise ValueError(f"the Triton kernel does not support this call: {unsupported}")
    return impl


# --------------------------------------------------------------------------------------- custom op registration


@torch.library.custom_op("gemmaquant::int4_matmul", mutates_args=())
def _int4_matmul_op(x: Tensor, qdata: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int) -> Tensor:
    from gemmaquant.kernels.int4_matmul import int4_matmul

    return int4_matmul(x, qdata, scale, zero, group_size)


@_int4_matmul_op.register_fake
def _(x, qdata, scale, zero, group_size):
    return x.new_empty(x.shape[0], qdata.shape[0])


@torch.library.custom_op("gemmaquant::int8_matmul", mutates_args=())
def _int8_matmul_op(x: Tensor, qdata: Tensor, scale: Tensor, act_quant: bool) -> Tensor:
    from gemmaquant.kernels.int8_matmul import int8_matmul

    return int8_matmul(x, qdata, scale, act_quant)


@_int8_matmul_op.register_fake
def _(x, qdata, scale, act_quant):
    return x.new_empty(x.shape[0], qdata.shape[0])


@torch.library.custom_op("gemmaquant::moe_experts", mutates_args=())
def _moe_experts_op(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor,
                    gate_up_scale: Optional[Tensor], down_scale: Optional[Tensor], gate_up_zero: Optional[Tensor],
                    down_zero: Optional[Tensor], group_size: int, per_expert_scale: Optional[Tensor]) -> Tensor:
    from gemmaquant.kernels.moe_grouped_gemm import moe_experts

    return moe_experts(x, topk_ids, topk_weights, gate_up, down, gate_up_scale, down_scale, gate_up_zero, down_zero,
                       group_size, per_expert_scale)


@_moe_experts_op.register_fake
def _(x, topk_ids, topk_weights, gate_up, down, gate_up_scale, down_scale, gate_up_zero, down_zero, group_size,
      per_expert_scale):
    return torch.empty_like(x)


@torch.library.custom_op("gemmaquant::swa_attention", mutates_args=())
def _swa_attention_op(q: Tensor, k: Tensor, v: Tensor, window: Optional[int], scale: float,
                      q_offset: Optional[int]) -> Tensor:
    from gemmaquant.kernels.swa_attention import swa_attention

    return swa_attention(q, k, v, window, scale, q_offset)


@_swa_attention_op.register_fake
def _(q, k, v, window, scale, q_offset):
    return torch.empty_like(q)


@torch.library.custom_op("gemmaquant::swa_decode", mutates_args=())
def _swa_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, window: Optional[int],
                   scale: float) -> Tensor:
    from gemmaquant.kernels.swa_attention import swa_decode

    return swa_decode(q, k_cache, v_cache, seqlens, window, scale)


@_swa_decode_op.register_fake
def _(q, k_cache, v_cache, seqlens, window, scale):
    return torch.empty_like(q)


# --------------------------------------------------------------------------------------------------- the ops


def _pow2(n: int) -> bool:
    return n >= 16 and not n & (n - 1)


def int4_matmul(x: Tensor, qdata: Tensor, scale: Tensor, zero: Optional[Tensor] = None, group_size: int = 128, *,
                impl: Optional[str] = None) -> Tensor:
    """y = x @ W^T for W int4 group-wise: qdata uint8 [N, K // 2] (k = 2j low nibble, 2j + 1 high), scale
    [N, K // g], zero uint8 [N, K // g] or None (symmetric, zero = 8); w = scale * (u - zero).
    x [..., K] fp16 / bf16 -> y [..., N] in x's dtype. The kernel picks a split-K GEMV for <= 16 rows of x and a
    tiled GEMM above."""
    K, N = x.shape[-1], qdata.shape[0]
    why = "" if _pow2(group_size) and K % group_size == 0 else f"group_size {group_size} with K = {K}"
    if resolve(x, impl, why) == "triton":
        return torch.ops.gemmaquant.int4_matmul(x.reshape(-1, K), qdata, scale, zero,
                                                group_size).reshape(*x.shape[:-1], N)
    from gemmaquant.kernels.int4_matmul import int4_matmul_ref

    return int4_matmul_ref(x, qdata, scale, zero, group_size)


def int8_matmul(x: Tensor, qdata: Tensor, scale: Tensor, act_quant: bool = False, *,
                impl: Optional[str] = None) -> Tensor:
    """y = x @ W^T for W int8 per output channel: qdata int8 [N, K], scale [N], w = scale[:, None] * q.
    act_quant=False: W8A16. act_quant=True: W8A8, x quantized per token on the fly (s_x = absmax / 127, round half
    away from zero), int32 accumulation. x [..., K] -> y [..., N] in x's dtype."""
    K, N = x.shape[-1], qdata.shape[0]
    if resolve(x, impl) == "triton":
        return torch.ops.gemmaquant.int8_matmul(x.reshape(-1, K), qdata, scale, act_quant).reshape(*x.shape[:-1], N)
    from gemmaquant.kernels.int8_matmul import int8_matmul_ref

    return int8_matmul_ref(x, qdata, scale, act_quant)


def linear(x: Tensor, packed, *, impl: Optional[str] = None) -> Tensor:
    """y = x @ W^T for a gemmaquant.formats Packed weight: int4 group formats and int8 channel go to their ops, any
    other format is dequantized (to x's dtype) and multiplied by torch."""
    from gemmaquant.formats import Int8Channel, IntGroup

    fmt, d = packed.fmt, packed.data
    if isinstance(fmt, IntGroup) and fmt.bits_per_code == 4:
        return int4_matmul(x, d["qdata"], d["scale"], d.get("zero"), fmt.group_size, impl=impl)
    if isinstance(fmt, Int8Channel):
        return int8_matmul(x, d["qdata"], d["scale"], impl=impl)
    return x @ fmt.dequantize(packed).to(x.dtype).T


def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor, *,
                gate_up_scale: Optional[Tensor] = None, down_scale: Optional[Tensor] = None,
                gate_up_zero: Optional[Tensor] = None, down_zero: Optional[Tensor] = None, group_size: int = 0,
                per_expert_scale: Optional[Tensor] = None, impl: Optional[str] = None) -> Tensor:
    """The routed experts of a Gemma 4 MoE block (GEMMA4_SPEC §2.6):
        y[t] = sum_j topk_weights[t, j] * per_expert_scale[e] * (gelu_tanh(x G_e^T) * (x U_e^T)) D_e^T,
        e = topk_ids[t, j]
    x [T, H] (already normed); topk_ids [T, k]; topk_weights [T, k] fp32, renormalised over the top k;
    per_expert_scale [E] or None (None: the weights already carry it). gate_up [E, 2*Ie, H] (gate = first Ie
    rows), down [E, H, Ie], each bf16/fp16, or int8 qdata with scale [E, N], or int4 uint8 qdata [E, N, K // 2]
    with scale / zero [E, N, K // g] and group_size. Returns y [T, H] in x's dtype."""
    args = (x, topk_ids, topk_weights, gate_up, down, gate_up_scale, down_scale, gate_up_zero, down_zero, group_size,
            per_expert_scale)
    int4 = gate_up.dtype == torch.uint8 or down.dtype == torch.uint8
    why = "" if not int4 or _pow2(group_size) else f"int4 experts with group_size {group_size}"
    if resolve(x, impl, why) == "triton":
        return torch.ops.gemmaquant.moe_experts(*args)
    from gemmaquant.kernels.moe_grouped_gemm import moe_experts_ref

    return moe_experts_ref(*args)


def attention(q: Tensor, k: Tensor, v: Tensor, *, window: Optional[int] = None, scale: float = 1.0,
              q_offset: Optional[int] = None, cache_seqlens: Optional[Tensor] = None,
              impl: Optional[str] = None) -> Tensor:
    """Causal grouped-query attention, sliding-window when `window` is given; fp32 softmax; returns [B, Hq, L, D].

    q [B, Hq, L, D]; query head j reads kv head j // (Hq / Hkv). A key at position p is visible to a query at
    position t iff 0 <= t - p < window (window=None: t - p >= 0, Gemma 4's full layers). Gemma 4 uses scale=1.0.
      * cache_seqlens=None: k / v [B, Hkv, S, D] hold positions 0 .. S-1; query i is at q_offset + i
        (default S - L).
      * cache_seqlens [B] int: k / v [B, Hkv, C, D] are a ring-buffer KV cache (position p in slot p % C; a linear
        cache is C >= length) holding cache_seqlens[b] tokens, the L new ones included: queries are at positions
        cache_seqlens - L .. cache_seqlens - 1, and positions older than cache_seqlens - C are gone.
    """
    D, G, L = q.shape[-1], q.shape[1] // k.shape[1], q.shape[2]
    why = "" if _pow2(D) else f"head_dim {D}"
    if cache_seqlens is not None:
        if q_offset is not None:
            raise ValueError("attention: q_offset and cache_seqlens exclude each other (the cache gives positions)")
        why = why or ("" if G * L <= 128 else f"{G} q heads per kv head x {L} queries > 128 rows (decode kernel)")
        if resolve(q, impl, why) == "triton":
            return torch.ops.gemmaquant.swa_decode(q, k, v, cache_seqlens, window, float(scale))
        from gemmaquant.kernels.swa_attention import swa_decode_ref

        return swa_decode_ref(q, k, v, cache_seqlens, window, scale)
    if resolve(q, impl, why) == "triton":
        return torch.ops.gemmaquant.swa_attention(q, k, v, window, float(scale), q_offset)
    from gemmaquant.kernels.swa_attention import swa_attention_ref

    return swa_attention_ref(q, k, v, window, scale, q_offset)
