"""Every tensor of every Gemma 4 variant has a llama.cpp GGUF name that gguf-py lists for MODEL_ARCH.GEMMA4, and the
mapping is a bijection (the reader inverts it)."""

import gguf
import pytest

from gemmaquant.checkpoint import expected_shapes
from gemmaquant.config import TINY_VARIANTS, VARIANTS
from gemmaquant.export.gguf_names import ROPE_FREQS, always_f32, gguf_name, text_name

GEMMA4_TENSORS = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA4]}


def _template(g: str) -> str:
    parts = g.split(".")
    if parts[0] == "blk":
        parts[1] = "{bid}"
    return ".".join(parts[:-1])  # drop .weight / .scale


@pytest.mark.parametrize("variant", [*VARIANTS, *TINY_VARIANTS])
def test_every_tensor_has_a_gemma4_gguf_name(variant):
    cfg = {**VARIANTS, **TINY_VARIANTS}[variant]
    shapes = expected_shapes(cfg)
    names = {gguf_name(n): n for n in shapes}
    assert len(names) == len(shapes), "two tensors map to one GGUF name"
    for g, n in names.items():
        assert _template(g) in GEMMA4_TENSORS, f"{n} -> {g} is not a gemma4 tensor in gguf-py"
        assert text_name(g) == n
    assert _template(ROPE_FREQS) in GEMMA4_TENSORS and text_name(ROPE_FREQS) is None


def test_precision_rules_match_llamacpp():
    # converter prepare_tensors: 1-D, *_norm.weight, ffn_gate_inp.*, names not ending .weight -> F32
    assert always_f32("blk.0.attn_q_norm.weight", 1)
    assert always_f32("blk.0.ffn_gate_inp.weight", 2)
    assert always_f32("blk.0.ffn_gate_inp.scale", 1)
    assert always_f32("blk.0.layer_output_scale.weight", 1)
    assert not always_f32("blk.0.attn_q.weight", 2)
    assert not always_f32("blk.0.ffn_gate_up_exps.weight", 3)
    assert not always_f32("per_layer_model_proj.weight", 2)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(KeyError, match="layers.0.mlp.fc9.weight"):
        gguf_name("layers.0.mlp.fc9.weight")
