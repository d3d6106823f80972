"""The reference model equals transformers' Gemma 4 (GEMMA4_SPEC.md §5) on random tiny configs that together
cover every feature: sliding + full layers with their own head dims and KV-head counts, proportional RoPE,
k_eq_v, PLE, KV sharing, double-wide MLP, MoE beside the dense MLP, layer_scalar, softcap.
Batch 2, sequences longer than the sliding window, fp32, max |delta logits| <= 1e-4."""

import dataclasses

import pytest
import torch

import gemmaquant
from gemmaquant.config import FULL, SLIDING, TINY_VARIANTS, Gemma4Config
from gemmaquant.model.testing import (hf_causal_lm, hf_conditional_generation, random_model,
                                      save_multimodal_checkpoint)

# every feature at once: MoE + PLE + KV sharing + k_eq_v + double-wide MLP
ALL_FEATURES = Gemma4Config(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16, global_head_dim=32, attention_k_eq_v=True,
    layer_types=(SLIDING, SLIDING, FULL, SLIDING, FULL, SLIDING, FULL), sliding_window=5,
    final_logit_softcapping=30.0, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512,
    num_kv_shared_layers=2, use_double_wide_mlp=True, enable_moe_block=True, num_experts=6, top_k_experts=3,
    moe_intermediate_size=24)

CONFIGS = {name: dataclasses.replace(cfg, sliding_window=5) for name, cfg in TINY_VARIANTS.items()}
CONFIGS["all-features"] = ALL_FEATURES
TOL = 1e-4


def _ids(cfg, B=2, T=13, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_causal_lm(name):
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=1)
    ids = _ids(cfg)
    with torch.no_grad():
        ours, theirs = model(ids), hf_causal_lm(model)(ids).logits
    assert ours.shape == (2, 13, cfg.vocab_size)
    err = (ours - theirs).abs().max().item()
    assert err <= TOL, f"{name}: max |ours - transformers| = {err:.3g}"


@pytest.mark.parametrize("name", ["tiny-e2b", "all-features", "tiny-26b-a4b"])
def test_load_multimodal_sharded_checkpoint_equals_transformers(tmp_path, name):
    """gemmaquant.load on a directory laid out like a released checkpoint: multimodal naming, a vision tower,
    several shards with an index."""
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=2)
    save_multimodal_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    loaded = gemmaquant.load(tmp_path / "ckpt")
    ids = _ids(cfg, seed=3)
    with torch.no_grad():
        ours = loaded(ids)
        theirs = hf_conditional_generation(tmp_path / "ckpt")(input_ids=ids).logits
    err = (ours - theirs).abs().max().item()
    assert err <= TOL, f"{name}: max |ours - transformers(multimodal)| = {err:.3g}"
    assert (ours - model(ids)).abs().max().item() == 0.0  # fp32 round trip through disk is lossless


def test_negative_control_detects_a_wrong_formula():
    """The parity check can fail: a 1/sqrt(d) attention scale (Gemma 2/3 habit) breaks it."""
    cfg = CONFIGS["tiny-31b"]
    model = random_model(cfg, seed=1)
    ids = _ids(cfg)
    hf = hf_causal_lm(model)
    for layer in hf.model.layers:
        layer.self_attn.scaling = layer.self_attn.head_dim ** -0.5
    with torch.no_grad():
        err = (model(ids) - hf(ids).logits).abs().max().item()
    assert err > 100 * TOL
