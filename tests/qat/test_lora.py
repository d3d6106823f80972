"""QAT composes with PEFT LoRA: adapters applied first are trained *through* the fake quantizer (it quantizes the
merged weight W + scaling * B @ A), convert folds them into the quantized weight, merge_and_unload changes nothing."""

import pytest
import torch

from gemmaquant.config import TINY_VARIANTS
from gemmaquant.formats import get_format
from gemmaquant.model.testing import hf_causal_lm, random_model
from gemmaquant.qat import convert, fake_quantizers, prepare_qat
from gemmaquant.qat.fake_quant import stored

peft = pytest.importorskip("peft")
CFG = TINY_VARIANTS["tiny-26b-a4b"]
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def lora_model(seed=0):
    hf = hf_causal_lm(random_model(CFG, seed=seed))
    m = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking adapter (PEFT initialises B to zero)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def base_weight_and_delta(m, name="q_proj", layer=1):
    lora = m.base_model.model.model.layers[layer].self_attn.q_proj if name == "q_proj" else None
    base = lora.base_layer
    w = base.parametrizations.weight.original if hasattr(base, "parametrizations") else base.weight
    return w.detach().clone(), lora.get_delta_weight("default").detach().clone()


def test_lora_trains_through_the_quantizer_and_folds_at_convert():
    m = lora_model()
    prepare_qat(m, "int4_g32_sym", learnable_scales=True)
    names = {fq.name for _, _, fq in fake_quantizers(m)}
    assert "layers.1.self_attn.q_proj.weight" in names and "layers.1.experts.gate_up_proj" in names
    linked = [fq.name for _, _, fq in fake_quantizers(m) if fq.lora is not None]
    adapters = [n for n, mod in m.named_modules() if isinstance(mod, peft.tuners.lora.LoraLayer)]
    assert len(linked) == len(adapters) >= 15
    ids = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(input_ids=ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_" in n)
    assert all(p.grad is None for n, p in m.named_parameters() if "original" in n)  # PEFT froze the base
    opt.step()
    w, delta = base_weight_and_delta(m)
    fq = next(fq for _, _, fq in fake_quantizers(m) if fq.name == "layers.1.self_attn.q_proj.weight")
    learned = stored(fq.block_params(), fq.storage)
    with torch.no_grad():
        fake = m(input_ids=ids).logits
    packed = convert(m)
    want = get_format("int4_g32_sym").quantize(w + delta, params=learned)  # the merged weight, learned scales
    got = packed["layers.1.self_attn.q_proj.weight"]
    assert all(torch.equal(got.data[k], want.data[k]) for k in want.data)
    with torch.no_grad():
        after = m(input_ids=ids).logits
    err = (after - fake).abs().max().item()
    assert err < 1e-4, f"converted vs fake-quantized with the adapter: max |delta logits| = {err:.3g}"
    lb = m.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight
    assert lb.abs().max() == 0, "the adapter is folded into the quantized weight"
    merged = m.merge_and_unload()
    q = merged.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, got.fmt.dequantize(got)), "merge_and_unload leaves the quantized weights unchanged"
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - after).abs().max() < 1e-4


def test_lora_added_after_prepare_is_merged_before_rounding():
    hf = hf_causal_lm(random_model(CFG))
    prepare_qat(hf, "int4_g32_sym")  # fit mode: convert packs fmt.quantize(W + delta)
    # (no "down_proj": after prepare_qat, PEFT's suffix match would also hit experts.parametrizations.down_proj)
    m = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                                lora_dropout=0.0))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    w, delta = base_weight_and_delta(m)
    packed = convert(m)
    want = get_format("int4_g32_sym").quantize(w + delta)
    got = packed["layers.1.self_attn.q_proj.weight"]
    assert torch.equal(got.data["qdata"], want.data["qdata"]) and torch.equal(got.data["scale"], want.data["scale"])
