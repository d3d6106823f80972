"""Batched GPTQ over a stack of experts (gemmaquant.algorithms.gptq_batched) against the per-expert loop
`[gptq(w[e], H[e]) for e]`, the reference.

The batched sweep does the loop's elementwise arithmetic in the same precisions; only its matrix products
(the batched Cholesky / triangular solves, the block updates as baddbmm) could sum in another order. On the CPU
each batch element is the same BLAS / LAPACK call the loop makes, so the bytes are equal: that is what keeps the
CPU pipeline's outputs byte-identical now that it batches its experts, and these tests assert it exactly."""

import warnings

import pytest
import torch

from gemmaquant.algorithms.gptq import gptq
from gemmaquant.algorithms.gptq_batched import gptq_experts
from tests.algorithms.fmts import fmt
from tests.algorithms.problems import activations, weights

E, N, K = 5, 24, 256


@pytest.fixture(scope="module")
def experts():
    """Five experts with their own weights and Hessians; expert 1 has a dead input, expert 2 all-zero rows
    (scale-0 blocks), expert 3 a Hessian that is not positive definite at the default damp (the loop retries)."""
    w = torch.stack([weights(N, K, seed=10 + e) for e in range(E)])
    H = []
    for e in range(E):
        x = activations(3 * K, K, seed=e)
        H.append(x.T @ x / x.shape[0])
    H = torch.stack(H)
    H[1, :, 9] = H[1, 9, :] = 0.0
    w[2, :3] = 0.0
    H[3].diagonal().sub_(0.05 * H[3].diagonal().mean())  # indefinite until damp > 5%
    return w, H


def _same(a, b):
    assert len(a) == len(b)
    for e, (pa, pb) in enumerate(zip(a, b)):
        assert pa.data.keys() == pb.data.keys()
        for k in pa.data:
            assert torch.equal(pa.data[k], pb.data[k]), f"expert {e}: {k} differs"


def _loop(w, H, f, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [gptq(w[e], H[e], f, **kw) for e in range(w.shape[0])]


@pytest.mark.parametrize("name", ["int4_g32_sym", "int4_g32_asym", "q4_0", "q4_k", "q6_k", "iq4_nl", "iq4_xs",
                                  "q3_k", "q2_k"])
def test_batched_equals_the_loop(experts, name):
    w, H = experts
    f = fmt(name)
    with pytest.warns(UserWarning, match="used damp=0.08"):  # expert 3's retry, warned as the loop warns it
        got = gptq_experts(w, H, f)
    _same(_loop(w, H, f), got)


@pytest.mark.parametrize("kw", [dict(act_order=False), dict(importance_params=True), dict(block_size=48),
                                dict(act_order=False, static_groups=False)])
def test_batched_options_equal_the_loop(experts, kw):
    w, H = experts
    f = fmt("int4_g32_asym")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gptq_experts(w, H, f, **kw)
    _same(_loop(w, H, f, **kw), got)


def test_chunks_of_experts_and_lazy_hessians(experts):
    """One expert per chunk (the memory bound at 26B-A4B widths), Hessians made on demand: the same bytes."""
    w, H = experts
    f = fmt("int4_g32_sym")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = gptq_experts(w, H, f)
        made = []
        lazy = [lambda e=e: made.append(e) or H[e] for e in range(E)]
        chunked = gptq_experts(w, lazy, f, chunk_bytes=1)
    assert made == list(range(E))
    _same(whole, chunked)


def test_inputs_are_not_modified_and_bad_input_raises(experts):
    w, H = experts
    w0, H0 = w.clone(), H.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gptq_experts(w, H, fmt("q4_0"))
    assert torch.equal(w, w0) and torch.equal(H, H0)
    bad = H.clone()
    bad[4] = -torch.eye(K)
    with pytest.raises(ValueError, match="not positive definite"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gptq_experts(w, bad, fmt("q4_0"))
    nan = H.clone()
    nan[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="H has 1 non-finite"):
        gptq_experts(w, nan, fmt("q4_0"))
    with pytest.raises(ValueError, match="one \\[K, K\\] Hessian per expert"):
        gptq_experts(w, H[:2], fmt("q4_0"))
    with pytest.raises(ValueError, match="H must be \\[K, K\\]"):
        gptq_experts(w, H[:, :128, :128], fmt("q4_0"))


def test_on_a_fake_cuda_device(experts):
    """Every tensor of the batched sweep on the device of the weights (FakeTensorMode raises on a CPU one)."""
    from tests.device.fake_cuda import fake_cuda

    w, H = experts
    with fake_cuda():
        wc, Hc = w[:2, :, :64].to("cuda"), H[:2, :64, :64].to("cuda")
        packs = gptq_experts(wc, Hc, fmt("int4_g32_sym"), block_size=32)
        assert all(t.device.type == "cuda" for p in packs for t in p.data.values())


@pytest.mark.parametrize("min_tokens", [0, 60])  # 60: some experts get their statistics by forced routing
def test_quantize_layer_batched_equals_the_loop(min_tokens):
    """A tiny-moe layer's experts, batched or one at a time: the same bytes, forced-routed experts included, and an
    expert left without statistics (no token, no pool) gets RTN in both."""
    import copy

    from gemmaquant.capture import LayerStats, capture, force_route_rare_experts
    from gemmaquant.layer_quant import quantize_layer
    from gemmaquant.model.gemma4 import rope_inv_freqs
    from gemmaquant.plan import make_plan
    from gemmaquant.quantize import Activations, build_layer, open_source, run_layer
    from gemmaquant.recipe import Recipe

    src = open_source("tiny-moe")
    cfg = src.config
    layer = build_layer(cfg, 1, src.layer_state(1))
    g = torch.Generator().manual_seed(0)
    acts = Activations(h=[torch.randn(2, 48, cfg.hidden_size, generator=g) for _ in range(2)], ple=[None] * 2)
    stats = LayerStats()
    with capture(layer, stats, max_samples=0):
        run_layer(layer, cfg, 1, acts, rope_inv_freqs(cfg))
    force_route_rare_experts(layer, stats, min_tokens, max_samples=0)
    if min_tokens:
        assert stats.forced_experts
    starved = cfg.num_experts - 1
    for kind in ("expert_in", "expert_down_in"):
        stats.inputs.pop(f"{kind}.{starved}", None)
    r = Recipe.from_dict({"method": "gptq"})
    plan = {k[len("layers.1."):]: v for k, v in make_plan(cfg, r).items() if k.startswith("layers.1.")}
    out = [quantize_layer(copy.deepcopy(layer), stats, plan, r, batched_gptq=b) for b in (False, True)]
    (va, sa, ea), (vb, sb, eb) = out
    assert sa == sb and ea == eb
    experts = [n for n in va if n.startswith("experts.")]
    assert experts
    for n in experts:
        _same(va[n], vb[n])
