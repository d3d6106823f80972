"""prepare_qat / convert on gemmaquant's Gemma4 and on transformers' Gemma 4 classes: the plan's weights (fused
experts included) are fake-quantized, convert packs bit-identically to the format, the state dict keeps the
checkpoint names through a safetensors round trip, bad input is refused."""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemmaquant.config import TINY_VARIANTS
from gemmaquant.formats import get_format
from gemmaquant.model.testing import hf_causal_lm, random_model
from gemmaquant.plan import make_plan
from gemmaquant.qat import QATError, convert, fake_quantizers, prepare_qat
from gemmaquant.recipe import Recipe

MOE = TINY_VARIANTS["tiny-26b-a4b"]
EDGE = dataclasses.replace(TINY_VARIANTS["tiny-e2b"], hidden_size_per_layer_input=32)
# every row a multiple of 256, so that the K-quants (256-weight super-blocks) fit every matrix
KQUANT_MOE = dataclasses.replace(MOE, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                                 num_attention_heads=8, num_hidden_layers=2, num_experts=4,
                                 layer_types=("sliding_attention", "full_attention"))


def logits(model, ids):
    out = model(ids)
    return out if torch.is_tensor(out) else out.logits


def ids_for(cfg, B=2, T=40, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def train_steps(model, ids, n=2, lr=1e-3):
    """A few SGD steps so that the latent weights (and scales) are off their initial values."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(n):
        opt.zero_grad()
        logits(model, ids).float().pow(2).mean().backward()
        opt.step()


def latent_state(model) -> dict:
    """{checkpoint name: (latent weight, stored block params or None)} before convert."""
    out = {}
    for mod, pname, fq in fake_quantizers(model):
        w = mod.parametrizations[pname].original.detach().clone()
        out[fq.name] = (fq.fmt, w, fq.stored_params())
    return out


def expected_packs(fmt, w, params):
    """What the format packs from the trained weights (per expert for fused [E, N, K] tensors)."""
    if w.ndim == 2:
        return [fmt.quantize(w, params=params)]
    N = w.shape[1]
    return [fmt.quantize(w[e], params=None if params is None else {k: v[e * N:(e + 1) * N] for k, v in params.items()})
            for e in range(w.shape[0])]


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("kind", ["ours", "hf"])
@pytest.mark.parametrize("cfg", [MOE, EDGE], ids=["moe", "edge"])
def test_prepare_train_convert_is_bit_identical(cfg, kind, learnable):
    model = random_model(cfg)
    if kind == "hf":
        model = hf_causal_lm(model)
    ids = ids_for(cfg)
    fmt_name = "int4_g32_asym" if learnable else "int4_g32_sym"
    prepare_qat(model, fmt_name, learnable_scales=learnable)
    plan = {n for n, p in make_plan(cfg, Recipe(weight_format=fmt_name)).items() if p.fmt is not None}
    names = {fq.name for _, _, fq in fake_quantizers(model)}
    assert names == plan
    if cfg.enable_moe_block:
        assert {"layers.0.experts.gate_up_proj", "layers.0.experts.down_proj"} <= names
    train_steps(model, ids)
    for mod, pname, fq in fake_quantizers(model):  # gradients reach every latent weight (and scale)
        assert mod.parametrizations[pname].original.grad is not None, fq.name
        for p in fq.parameters(recurse=False):
            assert p.grad is not None and p.grad.abs().sum() > 0, fq.name
    before = latent_state(model)
    with torch.no_grad():
        fake = logits(model, ids)
    packed = convert(model)
    assert not fake_quantizers(model) and set(packed) == plan
    with torch.no_grad():
        assert torch.equal(logits(model, ids), fake), "the converted model computes what the fake-quantized one did"
    for name, (fmt, w, params) in before.items():
        got = packed[name] if isinstance(packed[name], list) else [packed[name]]
        want = expected_packs(fmt, w, params)
        assert len(got) == len(want), name
        for a, b in zip(got, want):
            assert a.fmt == fmt and a.data.keys() == b.data.keys(), name
            for k in a.data:
                assert a.data[k].dtype == b.data[k].dtype and torch.equal(a.data[k], b.data[k]), f"{name}::{k}"
    with pytest.raises(QATError, match="already quantized"):
        prepare_qat(model, fmt_name)


def test_transformers_and_reference_agree_under_fake_quantization():
    ours = random_model(MOE)
    hf = hf_causal_lm(ours)
    ids = ids_for(MOE)
    for m in (ours, hf):
        prepare_qat(m, "int4_g32_sym", learnable_scales=True)
    with torch.no_grad():
        err = (logits(ours, ids) - logits(hf, ids)).abs().max().item()
    assert err < 1e-4, f"max |ours - transformers| = {err:.3g}"
    a, b = convert(ours), convert(hf)
    for name in a:
        pa = a[name] if isinstance(a[name], list) else [a[name]]
        pb = b[name] if isinstance(b[name], list) else [b[name]]
        assert all(torch.equal(x.data["qdata"], y.data["qdata"]) for x, y in zip(pa, pb)), name


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_state_dict_keeps_checkpoint_names_and_round_trips(tmp_path, kind):
    base = random_model(MOE)
    make = (lambda: copy.deepcopy(base)) if kind == "ours" else (lambda: hf_causal_lm(base))
    model = make()
    plain_keys = set(model.state_dict())
    ids = ids_for(MOE)
    prepare_qat(model, "int4_g32_sym", learnable_scales=True)
    train_steps(model, ids)
    sd = model.state_dict()
    assert not [k for k in sd if "parametrizations" in k]
    assert plain_keys <= set(sd)  # the checkpoint names, plus the learned scales beside their weights
    extra = set(sd) - plain_keys
    assert extra and all("_qat_scale" in k for k in extra)
    save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / "mid.safetensors"))  # (tied lm_head: a copy)
    again = make()
    prepare_qat(again, "int4_g32_sym", learnable_scales=True)
    again.load_state_dict(load_file(str(tmp_path / "mid.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(logits(again, ids), logits(model, ids))
    train_steps(model, ids, 1)
    train_steps(again, ids, 1)
    with torch.no_grad():
        assert torch.equal(logits(again, ids), logits(model, ids)), "training continues identically"


def test_conditional_generation_text_weights_only(tmp_path):
    from gemmaquant.model.testing import hf_conditional_generation, save_multimodal_checkpoint

    model = random_model(MOE)
    save_multimodal_checkpoint(model, tmp_path / "ckpt")
    hf = hf_conditional_generation(tmp_path / "ckpt")
    tower = {k: v.clone() for k, v in hf.state_dict().items() if "vision" in k}
    prepare_qat(hf, "int4_g32_sym")
    names = {fq.name for _, _, fq in fake_quantizers(hf)}
    assert "layers.3.experts.down_proj" in names and not [n for n in names if "vision" in n]
    ids = ids_for(MOE)
    with torch.no_grad():
        fake = hf(input_ids=ids).logits
    packed = convert(hf)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, fake)
    for k, v in hf.state_dict().items():
        if "vision" in k:
            assert torch.equal(v, tower[k]), k
    ref = copy.deepcopy(model)
    prepare_qat(ref, "int4_g32_sym")
    mine = convert(ref)
    assert all(torch.equal(mine[n].data["qdata"], packed[n].data["qdata"])
               for n in mine if not isinstance(mine[n], list))


def test_other_grids_and_formats():
    model = random_model(EDGE)
    prepare_qat(model, get_format("q4_0"))  # GGUF legacy: ggml's own RTN, codes included
    fq = fake_quantizers(model)[0][2]
    assert fq.fmt.name == "q4_0"
    ids = ids_for(EDGE)
    with torch.no_grad():
        fake = logits(model, ids)
    convert(model)
    with torch.no_grad():
        assert torch.equal(logits(model, ids), fake)


@pytest.mark.parametrize("fmt_name", ["q4_k", "q6_k"])
def test_learnable_kquant_subscales_train_and_convert_exactly(fmt_name, tmp_path):
    """learnable_ints: the K-quants' integer sub-block scales (and mins) are trainable, fused experts included;
    moved past a rounding point they change the forward pass, convert packs exactly the rounded, clamped values,
    and a mid-training state dict round-trips through safetensors."""
    model = random_model(KQUANT_MOE)
    ids = ids_for(KQUANT_MOE)
    prepare_qat(model, fmt_name, learnable_scales=True, learnable_ints=True)
    found = fake_quantizers(model)
    assert {fq.name for _, _, fq in found} >= {"layers.0.experts.gate_up_proj", "layers.0.self_attn.q_proj.weight"}
    ints = [fq.sc for _, _, fq in found]
    assert all(isinstance(p, torch.nn.Parameter) for p in ints)
    with torch.no_grad():
        start = logits(model, ids)
        gen = torch.Generator().manual_seed(0)
        for p in ints:  # about a third of the sub-scales move by one unit, a few past the stored range
            p.add_(torch.randint(-1, 2, p.shape, generator=gen).float() * 0.6)
            p.view(-1)[:3] = torch.tensor([-500.0, 500.0, 0.4])
        moved = logits(model, ids)
    assert not torch.equal(moved, start)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert [k for k in sd if k.endswith("_qat_sc")]
    save_file(sd, str(tmp_path / "mid.safetensors"))
    again = random_model(KQUANT_MOE)
    prepare_qat(again, fmt_name, learnable_scales=True, learnable_ints=True)
    again.load_state_dict(load_file(str(tmp_path / "mid.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(logits(again, ids), moved)
    before = latent_state(model)
    packed = convert(model)
    with torch.no_grad():
        assert torch.equal(logits(model, ids), moved), "the converted model computes what the fake-quantized one did"
    lo, hi = get_format(fmt_name).trainable_ints["sc"]
    for name, (fmt, w, params) in before.items():
        assert int(params["sc"].min()) >= lo and int(params["sc"].max()) <= hi, name
        got = packed[name] if isinstance(packed[name], list) else [packed[name]]
        for a, b in zip(got, expected_packs(fmt, w, params)):
            for k in a.data:
                assert a.data[k].dtype == b.data[k].dtype and torch.equal(a.data[k], b.data[k]), f"{name}::{k}"


def test_bad_input():
    model = random_model(MOE)
    with pytest.raises(QATError, match="does not fit"):
        prepare_qat(copy.deepcopy(model), "q4_k")  # 256-weight super-blocks, rows of 128 inputs
    with pytest.raises(QATError, match="unknown format"):
        prepare_qat(copy.deepcopy(model), "int5_g7")
    with pytest.raises(QATError, match="iq4_nl, a non-uniform codebook grid; QAT trains uniform grids only"):
        prepare_qat(copy.deepcopy(model), "iq4_nl")
    with pytest.raises(QATError, match="not a Gemma 4 model"):
        prepare_qat(torch.nn.Linear(64, 64), "int4_g32_sym")
    with pytest.raises(QATError, match="nothing to convert"):
        convert(copy.deepcopy(model))
    prepared = prepare_qat(copy.deepcopy(model), "int4_g32_sym")
    with pytest.raises(QATError, match="already prepared"):
        prepare_qat(prepared, "int4_g32_sym")
    # a dequantized model (what loading a GGUF / compressed-tensors file gives) is refused
    converted = prepare_qat(copy.deepcopy(model), "int4_g32_sym")
    convert(converted)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(converted.state_dict())
    with pytest.raises(QATError, match="already quantized"):
        prepare_qat(fresh, "int4_g32_sym")
    hf = hf_causal_lm(model)
    hf.config.quantization_config = {"quant_method": "compressed-tensors"}
    with pytest.raises(QATError, match="compressed-tensors"):
        prepare_qat(hf, "int4_g32_sym")
    # init from PTQ values on another grid
    p = convert(prepare_qat(copy.deepcopy(model), "int8"))
    with pytest.raises(QATError, match="init"):
        prepare_qat(copy.deepcopy(model), "int4_g32_sym", init=p)
