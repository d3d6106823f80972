"""The Gemma 4 text decoder in plain PyTorch: the reference every quantizer, kernel and exporter is tested against.

Every formula is GEMMA4_SPEC.md §2 (section numbers cited below) and matches Hugging Face transformers'
`models/gemma4/modeling_gemma4.py` to <= 1e-4 in fp32 (tests/model/test_parity_hf.py). Parameter names are the
checkpoint names with the `model.` / `model.language_model.` prefix stripped, so a state dict loads unchanged.

Shapes: B batch, T new tokens, S keys (past + new), H hidden, d head dim (per layer), nq / nkv heads.

    model = Gemma4(config)                       # random init; see gemmaquant.load() for checkpoints
    logits = model(ids)                          # [B, T, vocab]
    cache = KVCache(config); model(ids[:, :5], cache=cache); model(ids[:, 5:6], cache=cache)   # incremental
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmaquant.config import Gemma4Config


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")  # = HF "gelu_pytorch_tanh"


class RMSNorm(nn.Module):
    """§2.1: computed in fp32, weight used as stored (no `1 + w` as in Gemma 1-3); `with_scale=False` is the
    weightless norm of v, the router input and the multimodal projector."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def rope_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float = 1.0) -> Tensor:
    """§2.4 RoPE frequencies [d/2]. "Proportional" RoPE (full layers) rotates only the first
    int(p*d//2) frequency pairs, with the exponent denominator the *full* head dim; the rest get frequency 0.
    Under a meta default device (a model built for its shapes) an empty tensor: arithmetic on meta runs torch's
    Python references, whose first call imports torch._dynamo (about a second), for values meta does not hold."""
    if torch.get_default_device().type == "meta":
        return torch.empty(head_dim // 2)
    rotated = int(partial_rotary_factor * head_dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat([inv, torch.zeros(head_dim // 2 - rotated)])


def rope_inv_freqs(cfg: Gemma4Config) -> dict[str, Tensor]:
    """Sliding layers: default RoPE over head_dim; full layers: proportional RoPE over global_head_dim."""
    return {"sliding_attention": rope_inv_freq(cfg.head_dim, cfg.rope_theta_sliding),
            "full_attention": rope_inv_freq(cfg.global_head_dim, cfg.rope_theta_full, cfg.partial_rotary_factor_full)}


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX / rotate-half convention: x [B, T, h, d]; cos, sin [T, d] (pairs (j, j + d/2))."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Causal (optionally sliding-window) GQA attention with scale 1.0 and an fp32 softmax.

    q [B, nq, T, d], k/v [B, nkv, S, d], q_pos [T], k_pos [S] absolute positions. A key is visible iff
    k_pos <= q_pos and (no window or q_pos - k_pos < window): the window admits exactly W keys (§2.4 Masks).
    """
    visible = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    if window is not None:
        visible &= (q_pos[:, None] - k_pos[None, :]) < window
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # GQA: head j -> kv j // groups
    scores = (q @ k.transpose(-1, -2)).float()  # [B, nq, T, S], scaling = 1.0 (q/k are RMS-normed instead)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v  # [B, nq, T, d]


@dataclass
class LayerKV:
    k: Tensor  # [B, nkv, S, d] post-norm, post-RoPE keys
    v: Tensor  # [B, nkv, S, d] post-v_norm values
    pos: Tensor  # [S] absolute positions of the cached keys


@dataclass
class KVCache:
    """Per-producer-layer K/V for incremental decoding. Sliding layers keep only the last W-1 keys (all a later
    query can see); KV-shared layers have no entry and read their producer's (§2.4 KV sharing)."""

    config: Gemma4Config
    layers: dict[int, LayerKV] = field(default_factory=dict)
    seen: int = 0  # tokens processed so far = position of the next token


@dataclass
class ForwardState:
    """What every layer of one forward call shares: positions, RoPE tables per layer type, the K/V each
    producer layer computed in this call (for KV-shared layers), and the cache."""

    q_pos: Tensor  # [T]
    rope: dict[str, tuple[Tensor, Tensor]]  # layer type -> (cos, sin) [T, d]
    fresh_kv: dict[int, LayerKV] = field(default_factory=dict)
    cache: KVCache | None = None


def make_forward_state(inv_freqs: dict[str, Tensor], pos: Tensor, cache: KVCache | None = None) -> ForwardState:
    """RoPE tables (cos, sin) [T, d] for each layer type at positions `pos` [T]."""
    rope = {}
    for kind, inv in inv_freqs.items():
        freqs = pos[:, None].float() * inv.to(pos.device)[None, :]  # [T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        rope[kind] = (emb.cos(), emb.sin())
    return ForwardState(q_pos=pos, rope=rope, cache=cache)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma4Config, i: int):
        super().__init__()
        self.layer_idx = i
        self.d, self.nkv, self.nq = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_attention_heads
        self.window = cfg.sliding_window if cfg.is_sliding(i) else None
        self.layer_type = cfg.layer_types[i]
        self.producer = cfg.kv_producer(i)  # == i unless this layer reuses another layer's K/V
        self.q_proj = nn.Linear(cfg.hidden_size, self.nq * self.d, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        if self.producer == i:
            self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=False)
            # attention_k_eq_v (full layers of 26B/31B): no v_proj, V is the raw k_proj output
            self.v_proj = None if cfg.layer_k_eq_v(i) else nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=False)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(self.d, cfg.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(self.nq * self.d, cfg.hidden_size, bias=False)
        self.attend = attention  # same signature; gemmaquant.runtime swaps in its dispatched kernel

    def forward(self, x: Tensor, st: ForwardState) -> Tensor:
        B, T, _ = x.shape
        cos, sin = st.rope[self.layer_type]
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.nq, self.d)), cos, sin)
        if self.producer == self.layer_idx:
            kr = self.k_proj(x).view(B, T, self.nkv, self.d)
            vr = kr if self.v_proj is None else self.v_proj(x).view(B, T, self.nkv, self.d)
            k = apply_rope(self.k_norm(kr), cos, sin).transpose(1, 2)  # [B, nkv, T, d]
            v = self.v_norm(vr).transpose(1, 2)
            kv = LayerKV(k, v, st.q_pos)
            if st.cache is not None:
                kv = self._update_cache(st.cache, kv)
            st.fresh_kv[self.layer_idx] = kv
        else:
            kv = st.fresh_kv[self.producer]  # producer ran earlier in this same call
        a = self.attend(q.transpose(1, 2), kv.k, kv.v, st.q_pos, kv.pos, self.window)  # [B, nq, T, d]
        return self.o_proj(a.transpose(1, 2).reshape(B, T, self.nq * self.d))

    def _update_cache(self, cache: KVCache, new: LayerKV) -> LayerKV:
        """Append this call's K/V; return all keys visible to this call, store only what later calls can see."""
        old = cache.layers.get(self.layer_idx)
        kv = new if old is None else LayerKV(torch.cat([old.k, new.k], 2), torch.cat([old.v, new.v], 2),
                                             torch.cat([old.pos, new.pos]))
        start = 0 if self.window is None else max(kv.pos.numel() - (self.window - 1), 0)  # sliding: last W-1 keys
        cache.layers[self.layer_idx] = LayerKV(kv.k[:, :, start:], kv.v[:, :, start:], kv.pos[start:])
        return kv


class MLP(nn.Module):
    """§2.5 gated GELU-tanh MLP (every layer; double width on E2B's KV-shared layers)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """§2.6 router: on the raw residual, weightless RMSNorm * scale * H^-0.5, softmax over all experts,
    top-k, renormalise, then multiply by per_expert_scale (never folded into the logits, §3.5 P6)."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.top_k, self.eps = cfg.top_k_experts, cfg.rms_norm_eps
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x [N, H] -> weights [N, k] fp32, ids [N, k]
        r = self.norm(x) * self.scale * x.shape[-1] ** -0.5
        probs = torch.softmax(self.proj(r), dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return w * self.per_expert_scale[ids], ids


class Experts(nn.Module):
    """The fused expert tensors as stored: gate_up_proj [E, 2*Ie, H] (gate rows first), down_proj [E, H, Ie]."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        E, H, Ie = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Ie, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, Ie))

    def expert(self, e: int, x: Tensor) -> Tensor:  # x [n, H] -> [n, H], one expert's MLP
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(gelu_tanh(gate) * up, self.down_proj[e])

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:  # x [N, H], weights/ids [N, k]
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():  # experts with no tokens cost nothing
            tok, slot = torch.where(ids == e)
            y = self.expert(e, x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma4Config, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(H, cfg.layer_intermediate_size(i))
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # persistent: always loaded, never assumed 1
        self.enable_moe_block = cfg.enable_moe_block
        if cfg.enable_moe_block:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.has_ple = cfg.has_ple
        if cfg.has_ple:
            self.per_layer_input_gate = nn.Linear(H, cfg.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(cfg.hidden_size_per_layer_input, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps)

    def moe(self, res: Tensor) -> Tensor:
        """§2.6: the expert branch, on the post-attention residual (not on the dense MLP's normed input)."""
        flat = res.reshape(-1, res.shape[-1])  # [N, H]
        weights, ids = self.router(flat)
        return self.experts(self.pre_feedforward_layernorm_2(flat), weights, ids).reshape(res.shape)

    def forward(self, h: Tensor, st: ForwardState, ple: Tensor | None = None) -> Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), st))  # §2.4
        res = h
        ff = self.mlp(self.pre_feedforward_layernorm(h))  # §2.5
        if self.enable_moe_block:  # §2.6: dense MLP (the "shared expert") + routed experts, each normed
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(self.moe(res))
        h = res + self.post_feedforward_layernorm(ff)  # §2.7
        if self.has_ple:  # §2.3 per-layer embedding injection; ple [B, T, P]
            g = gelu_tanh(self.per_layer_input_gate(h)) * ple
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return h * self.layer_scalar  # scales the whole residual stream


class Gemma4(nn.Module):
    def __init__(self, config: Gemma4Config):
        super().__init__()
        cfg = self.config = config
        H, L, P = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        if cfg.has_ple:
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, L * P)
            self.per_layer_model_projection = nn.Linear(H, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(L))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        for kind, inv in rope_inv_freqs(cfg).items():
            self.register_buffer(f"inv_freq_{kind}", inv, persistent=False)

    # ---- the pieces, also used one layer at a time by the streaming quantizer ----
    def embed(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """§2.2 + §2.3: scaled token embedding x0 [B, T, H] and the PLE inputs [B, T, L, P] (or None)."""
        w = self.embed_tokens.weight
        x0 = F.embedding(ids, w) * torch.tensor(self.config.hidden_size**0.5).to(w.dtype)  # rounded like HF's buffer
        if not self.config.has_ple:
            return x0, None
        B, T = ids.shape
        L, P = self.config.num_hidden_layers, self.config.hidden_size_per_layer_input
        tok = self.embed_tokens_per_layer(ids)  # (a module call: QAT trains it as SparseRowsEmbedding)
        tok = (tok * torch.tensor(P**0.5).to(tok.dtype)).view(B, T, L, P)
        proj = self.per_layer_model_projection(x0) * self.config.hidden_size**-0.5
        proj = self.per_layer_projection_norm(proj.view(B, T, L, P))
        return x0, (proj + tok) * 2.0**-0.5

    def forward_state(self, T: int, cache: KVCache | None, device) -> ForwardState:
        start = cache.seen if cache is not None else 0
        inv = {kind: getattr(self, f"inv_freq_{kind}") for kind in set(self.config.layer_types)}
        return make_forward_state(inv, torch.arange(start, start + T, device=device), cache)

    def head(self, h: Tensor) -> Tensor:
        """§2.8: final norm, tied (or separate) output projection, logit soft-cap."""
        w = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(self.norm(h), w)
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. With `cache`, continues from `cache.seen`."""
        h, ple = self.embed(input_ids)
        st = self.forward_state(input_ids.shape[1], cache, h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, st, None if ple is None else ple[:, :, i])
        if cache is not None:
            cache.seen += input_ids.shape[1]
        return self.head(h)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Tensor:
        """Greedy decoding with the KV cache: [B, T] -> [B, T + n]."""
        cache = KVCache(self.config)
        logits = self(input_ids, cache=cache)
        out = [input_ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            logits = self(nxt, cache=cache)
        return torch.cat(out, dim=1)


def param_counts(cfg: Gemma4Config) -> dict[str, int]:
    """Total and active (per token) parameter counts, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        m = Gemma4(cfg)
    total = sum(p.numel() for p in m.parameters()) + sum(b.numel() for n, b in m.named_buffers() if "layer_scalar" in n)
    active = total
    if cfg.enable_moe_block:
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        active -= cfg.num_hidden_layers * (cfg.num_experts - cfg.top_k_experts) * per_expert
    return {"total": total, "active": active}
