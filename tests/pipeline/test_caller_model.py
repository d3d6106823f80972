"""`gemmaquant.quantize(model_object, ...)` leaves the caller's model as it was (bit for bit), whatever the method
(AWQ folds scales into norms, every method writes dequantized weights into the layer it works on); with
`inplace=True` the caller's model holds exactly the quantized model afterwards."""

import pytest
import torch

import gemmaquant
from gemmaquant.hub import resolve
from gemmaquant.model.testing import hf_causal_lm
from gemmaquant.quantize import QuantizeError, quantize
from gemmaquant.quantized import QuantizedSource, dequantize_value
from gemmaquant.recipe import Recipe

SMALL = dict(n_samples=4, seq_len=32, batch_size=4, awq_grid=4)  # a coarse AWQ grid: fast, scales still folded


def recipe(method):
    return Recipe.from_dict({"method": method, "weight_format": "int4_g32_sym", **SMALL})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fixture,method,kind", [("tiny-dense", "rtn", "transformers"),
                                                 ("tiny-moe", "awq", "transformers"),
                                                 ("tiny-moe", "rtn", "gemmaquant")])
def test_quantize_leaves_the_callers_model_bit_for_bit(tmp_path, fixture, method, kind):
    model = gemmaquant.load(fixture)  # fp32: the case where .float() hands back the caller's own tensors
    if kind == "transformers":
        model = hf_causal_lm(model)
    before = snapshot(model)
    quantize(model, recipe(method), out=tmp_path, tokenizer_dir=resolve(fixture), progress=False)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"quantize() changed {len(changed)} of {len(before)} tensors of the caller's model, e.g. " \
                        f"{changed[:3]}"


@pytest.mark.parametrize("dtype,method", [(torch.float32, "rtn"), (torch.bfloat16, "awq")])
def test_inplace_writes_the_quantized_model_into_the_callers_model(tmp_path, dtype, method):
    model = gemmaquant.load("tiny-moe", dtype=dtype)
    before = snapshot(model)
    res = quantize(model, recipe(method), out=tmp_path, tokenizer_dir=resolve("tiny-moe"), progress=False,
                   inplace=True)
    src = QuantizedSource(res.work_dir)
    after = model.state_dict()
    for name in src.names():
        if name == "lm_head.weight" and name not in after:
            continue
        want = dequantize_value(src.get(name)).to(dtype)
        assert torch.equal(after[name], want), name
        if not name.startswith("layers."):  # embeddings, final norm: kept float, not touched
            assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["layers.0.mlp.up_proj.weight"], before["layers.0.mlp.up_proj.weight"])
    if method == "awq":
        norm = "layers.0.input_layernorm.weight"
        assert not torch.equal(after[norm], before[norm]), "AWQ's folded norm is part of the quantized model"


def test_inplace_resumed_run_writes_every_layer(tmp_path):
    model = gemmaquant.load("tiny-dense")
    r = recipe("rtn")
    quantize(model, r, out=tmp_path, tokenizer_dir=resolve("tiny-dense"), progress=False, stop_after_layer=0)
    res = quantize(model, r, out=tmp_path, tokenizer_dir=resolve("tiny-dense"), progress=False, inplace=True)
    src = QuantizedSource(res.work_dir)
    w = "layers.0.self_attn.q_proj.weight"  # finished by the first, interrupted run
    assert torch.equal(model.state_dict()[w], dequantize_value(src.get(w)))


def test_inplace_needs_a_model_object(tmp_path):
    with pytest.raises(QuantizeError, match="inplace"):
        quantize("tiny-dense", recipe("rtn"), out=tmp_path, progress=False, inplace=True)
