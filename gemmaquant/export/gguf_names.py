"""Our tensor names <-> llama.cpp GGUF names for Gemma 4 (GEMMA4_SPEC.md §3.2), as data.

Our names are the checkpoint names with the `model.` / `model.language_model.` prefix stripped
(`layers.3.self_attn.q_proj.weight`). The GGUF side is what llama.cpp's `llama_model_gemma4::load_arch_tensors`
asks for; shapes are unchanged (ggml `ne` is the reversed PyTorch shape: no transposes, no +1 on norms, no
Q/K permutation, the fused expert gate_up tensor is not split).

Precision rule (llama.cpp `conversion/base.py: prepare_tensors` and `llama-quant.cpp: tensor_allows_quantization`):
1-D tensors, `*_norm.weight`, the router (`ffn_gate_inp.*`) and names not ending in `.weight` are always F32.
"""

from __future__ import annotations

import re

GLOBAL_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}

LAYER_NAMES = {  # relative to `layers.{i}.` -> relative to `blk.{i}.`
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "layer_scalar": "layer_output_scale.weight",  # the converter appends `.weight`
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",  # applied to each expert's down output (spec §3.5 P6)
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",  # [E, 2*Ie, H], gate rows first
    "experts.down_proj": "ffn_down_exps.weight",  # [E, H, Ie]
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
}

ROPE_FREQS = "rope_freqs.weight"  # generated: [d_f/2] = [1.0]*rotated + [1e30]*rest, used by full layers only

_GLOBAL_BACK = {v: k for k, v in GLOBAL_NAMES.items()}
_LAYER_BACK = {v: k for k, v in LAYER_NAMES.items()}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

EXPERT_NAMES = ("experts.gate_up_proj", "experts.down_proj")


def gguf_name(name: str) -> str:
    """`layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`; raises KeyError for names llama.cpp has no slot for."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    raise KeyError(f"tensor {name!r} has no GGUF name for architecture gemma4 (see GEMMA4_SPEC.md §3.2)")


def text_name(gguf: str) -> str | None:
    """The reverse of `gguf_name`; None for generated tensors (rope_freqs)."""
    if gguf == ROPE_FREQS:
        return None
    if gguf in _GLOBAL_BACK:
        return _GLOBAL_BACK[gguf]
    m = _BLK_RE.match(gguf)
    if m and m.group(2) in _LAYER_BACK:
        return f"layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"
    raise KeyError(f"GGUF tensor {gguf!r} is not a Gemma 4 tensor gemmaquant reads")


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name) or _BLK_RE.match(name)
    return int(m.group(1)) if m else None


def is_expert(name: str) -> bool:
    return name.endswith(EXPERT_NAMES)


def always_f32(gguf: str, ndim: int) -> bool:
    """llama.cpp keeps these F32 in every file type (converter `prepare_tensors` + quantizer exclusions)."""
    return (ndim <= 1 or gguf.endswith("_norm.weight") or ".ffn_gate_inp." in gguf
            or not gguf.endswith(".weight"))


def never_requantized(gguf: str) -> bool:
    """llama-quantize leaves these in the converter's float type ("not too big so keep them as it is")."""
    return "per_layer_model_proj" in gguf
