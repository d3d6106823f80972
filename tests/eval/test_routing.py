"""compare_logits(routing=True): expert choices that flip under quantization, and the KL left with the float model's
routing (gemmaquant.eval.routing)."""

import copy

import pytest
import torch

from gemmaquant.config import TINY_VARIANTS
from gemmaquant.eval.metrics import compare_logits
from gemmaquant.eval.routing import routing_text
from gemmaquant.model.testing import random_model

CFG = TINY_VARIANTS["tiny-26b-a4b"]


def ids(n=3, T=24):
    return torch.randint(0, CFG.vocab_size, (n, T), generator=torch.Generator().manual_seed(0))


def perturbed(model, which: str, seed: int = 0):
    """A copy with noise on every router (which="router") or on every expert tensor (which="experts")."""
    g = torch.Generator().manual_seed(seed)
    p = copy.deepcopy(model)
    with torch.no_grad():
        for layer in p.layers:
            ts = [layer.router.proj.weight] if which == "router" else [layer.experts.gate_up_proj,
                                                                       layer.experts.down_proj]
            for t in ts:
                t.add_(0.5 * t.std() * torch.randn(t.shape, generator=g))
    return p


def test_a_model_against_itself_routes_the_same():
    m = random_model(CFG)
    out = compare_logits(m, copy.deepcopy(m), ids(), routing=True)
    r = out["routing"]
    assert r["flips"] == [0.0] * CFG.num_hidden_layers
    assert out["kl_mean"] == pytest.approx(0, abs=1e-12) and r["kl_ref_routing"] == pytest.approx(0, abs=1e-12)


def test_routers_alone_changed_all_of_the_kl_is_routing():
    """Only the routers differ: given the reference's expert choices and gate weights, the test model *is* the
    reference, so the KL left is 0 (every MoE layer must be forced for that), and what the routers changed flips."""
    m = random_model(CFG)
    p = perturbed(m, "router")
    x = ids()
    out = compare_logits(m, p, x, routing=True)
    r = out["routing"]
    plain = compare_logits(m, p, x)  # the probe's forced forward leaves the other metrics as they were
    assert {k: v for k, v in out.items() if k != "routing"} == plain
    assert out["kl_mean"] > 1e-4 and r["kl_ref_routing"] < 1e-12 and r["routing_share"] == pytest.approx(1.0)
    assert all(f > 0 for f in r["flips"])
    # the flip counts are those of the two models' top-k sets, layer by layer, each on its own residual stream
    from gemmaquant.qat.distill import Taps

    tm, tp = Taps(m, False, True), Taps(p, False, True)
    with torch.no_grad():
        m(x), p(x)
    want = [(a.topk(CFG.top_k_experts, -1).indices.sort(-1).values
             != b.topk(CFG.top_k_experts, -1).indices.sort(-1).values).any(-1).double().mean().item()
            for a, b in zip(tm.router, tp.router)]
    tm.remove(), tp.remove()
    assert r["flips"] == pytest.approx(want, abs=1e-6)
    assert "% of the KL is routing" in routing_text(out)
    assert not any(r._forward_hooks for r in (m.layers[0].router, p.layers[0].router))  # the hooks are removed


def test_experts_alone_changed_the_first_layer_cannot_flip():
    """Noise on the experts only: the first MoE layer's router reads a residual stream the experts have not touched
    yet, so its choices are the reference's; the KL left with the reference's routing is the experts' own error."""
    m = random_model(CFG)
    p = perturbed(m, "experts")
    out = compare_logits(m, p, ids(), routing=True)
    r = out["routing"]
    assert r["flips"][0] == 0.0 and max(r["flips"][1:]) > 0
    assert 0 < r["kl_ref_routing"] < out["kl_mean"]


def test_a_dense_model_has_no_routing():
    m = random_model(TINY_VARIANTS["tiny-31b"])
    out = compare_logits(m, copy.deepcopy(m), ids(), routing=True)
    assert "routing" not in out and routing_text(out) == ""


def test_a_bf16_test_model_takes_the_float_models_routing():
    """A bf16 test model against an fp32 reference: given the reference routing, only bf16 rounding is left."""
    m = random_model(CFG)
    p = perturbed(m, "router").to(torch.bfloat16)
    out = compare_logits(m, p, ids(), routing=True)
    r = out["routing"]
    assert r["kl_ref_routing"] < 0.1 * out["kl_mean"] and max(r["flips"]) > 0
