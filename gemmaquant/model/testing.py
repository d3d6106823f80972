"""Helpers to build random Gemma 4 models and their transformers twins (used by tests and benchmarks)."""

from __future__ import annotations

import torch

from gemmaquant.config import Gemma4Config
from gemmaquant.model.gemma4 import Gemma4


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter and persistent buffer so that no formula hides behind an identity init:
    norm weights 1 +- 0.3, router/per-expert scales and layer_scalar in [0.6, 1.4), matrices N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if "layer_scalar" in n]:
        if t.ndim <= 1:
            t.copy_(0.6 + 0.8 * torch.rand(t.shape, generator=g))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return model


def random_model(cfg: Gemma4Config, seed: int = 0, dtype=torch.float32) -> Gemma4:
    return randomize_(Gemma4(cfg), seed).to(dtype).eval()


def hf_text_config(cfg: Gemma4Config):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**cfg.to_hf_dict())


def hf_causal_lm(model: Gemma4):
    """transformers' Gemma4ForCausalLM holding the same fp32 weights as `model` (eager attention)."""
    from transformers import Gemma4ForCausalLM

    hfc = hf_text_config(model.config)
    hfc._attn_implementation = "eager"
    hf = Gemma4ForCausalLM(hfc).eval()
    hf.load_state_dict({"model." + k: v for k, v in model.state_dict().items()}, strict=False)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def tiny_vision_tower_state(hidden_size: int, seed: int = 0) -> tuple[dict, dict]:
    """A real (tiny) Gemma 4 vision tower's config dict and random weights, under their multimodal names."""
    from transformers import Gemma4VisionConfig

    vc = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=16)
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.vision_tower.patch_embedder.position_embedding_table": (2, 10240, 32),
        "model.vision_tower.patch_embedder.input_proj.weight": (32, 768),
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": (32, 32),
        "model.vision_tower.encoder.layers.0.self_attn.k_proj.linear.weight": (32, 32),
        "model.vision_tower.encoder.layers.0.self_attn.v_proj.linear.weight": (32, 32),
        "model.vision_tower.encoder.layers.0.self_attn.o_proj.linear.weight": (32, 32),
        "model.vision_tower.encoder.layers.0.self_attn.q_norm.weight": (16,),
        "model.vision_tower.encoder.layers.0.self_attn.k_norm.weight": (16,),
        "model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight": (64, 32),
        "model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight": (64, 32),
        "model.vision_tower.encoder.layers.0.mlp.down_proj.linear.weight": (32, 64),
        "model.vision_tower.encoder.layers.0.input_layernorm.weight": (32,),
        "model.vision_tower.encoder.layers.0.post_attention_layernorm.weight": (32,),
        "model.vision_tower.encoder.layers.0.pre_feedforward_layernorm.weight": (32,),
        "model.vision_tower.encoder.layers.0.post_feedforward_layernorm.weight": (32,),
        "model.embed_vision.embedding_projection.weight": (hidden_size, 32),
    }
    return vc.to_dict(), {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def save_multimodal_checkpoint(model: Gemma4, out, dtype=torch.float32, max_shard_bytes: int = 4 << 30,
                               tokenizer_dir=None):
    """Write `model` the way Google released Gemma 4: Gemma4ForConditionalGeneration naming, a vision tower,
    optionally sharded."""
    from gemmaquant.checkpoint import save_checkpoint

    vision_cfg, tower = tiny_vision_tower_state(model.config.hidden_size)
    return save_checkpoint(model, out, multimodal=True, dtype=dtype, extra_tensors=tower,
                           extra_config={"vision_config": vision_cfg, "audio_config": None},
                           max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer_dir)


def hf_conditional_generation(path):
    """transformers' Gemma4ForConditionalGeneration loaded from a multimodal checkpoint directory."""
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                          attn_implementation="eager").eval()
