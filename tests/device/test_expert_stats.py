"""Batched per-expert statistics (gemmaquant.expert_stats, the GPU path) against the per-expert loop of
gemmaquant.capture (the CPU path and the reference): the same experts, token counts and AWQ sample rows, and the
same Gram matrices up to summation order (fp64 sums here: 1e-12 relative on expert_in, whose inputs are the
same fp32 rows; the down_proj inputs come from a bmm instead of one linear per expert, so fp32 rounding)."""

import pytest
import torch

from gemmaquant.capture import LayerStats, capture, force_route_rare_experts
from gemmaquant.model.gemma4 import rope_inv_freqs
from gemmaquant.quantize import Activations, build_layer, open_source, run_layer


@pytest.fixture(scope="module")
def moe_layer():
    src = open_source("tiny-moe")
    cfg = src.config
    layer = build_layer(cfg, 1, src.layer_state(1))
    g = torch.Generator().manual_seed(0)
    acts = Activations(h=[torch.randn(2, 48, cfg.hidden_size, generator=g) for _ in range(3)], ple=[None] * 3)
    return cfg, layer, acts


def _stats(cfg, layer, acts, batched, max_samples=64, min_tokens=0):
    stats = LayerStats()
    with capture(layer, stats, max_samples=max_samples, stride=3, batched=batched):
        run_layer(layer, cfg, 1, acts, rope_inv_freqs(cfg))
    force_route_rare_experts(layer, stats, min_tokens, max_samples=max_samples, batched=batched)
    return stats


def _expert_keys(stats):
    return sorted(k for k in stats.inputs if k.startswith("expert_"))


@pytest.mark.parametrize("min_tokens", [0, 60])  # 60: some experts are forced-routed
def test_batched_expert_statistics_equal_the_loop(moe_layer, min_tokens):
    cfg, layer, acts = moe_layer
    loop = _stats(cfg, layer, acts, batched=False, min_tokens=min_tokens)
    bat = _stats(cfg, layer, acts, batched=True, min_tokens=min_tokens)
    assert torch.equal(loop.expert_tokens, bat.expert_tokens)
    assert loop.forced_experts == bat.forced_experts
    if min_tokens:
        assert 0 < len(loop.forced_experts) < cfg.num_experts, loop.expert_tokens
    assert _expert_keys(loop) == _expert_keys(bat)
    for k in _expert_keys(loop):
        a, b = loop.inputs[k], bat.inputs[k]
        assert a.n == b.n and a.kept == b.kept, k
        assert a.xtx.dtype == b.xtx.dtype == torch.float64
        if k.startswith("expert_in.") or k == "expert_pool":
            torch.testing.assert_close(b.xtx, a.xtx, rtol=1e-12, atol=1e-12 * a.xtx.abs().max().item(), msg=k)
            assert torch.equal(a.x, b.x), k  # the same rows, bit for bit
            if k != "expert_pool" and int(k.split(".")[1]) in loop.forced_experts:
                assert torch.equal(a.xtx, b.xtx), k  # forced routing: the pool's X^T X, computed once
        else:
            torch.testing.assert_close(b.xtx, a.xtx, rtol=1e-5, atol=1e-6 * a.xtx.abs().max().item(), msg=k)
            torch.testing.assert_close(b.x, a.x, rtol=1e-5, atol=1e-6, msg=k)


def test_batched_statistics_in_small_chunks_of_experts(moe_layer, monkeypatch):
    """Experts taken a few at a time (the memory bound on a real model) give the same sums."""
    import gemmaquant.expert_stats as es

    cfg, layer, acts = moe_layer
    whole = _stats(cfg, layer, acts, batched=True)
    monkeypatch.setattr(es, "CHUNK_ELEMENTS", 1)  # one expert per chunk
    monkeypatch.setattr(es.ExpertAccumulator.__init__, "__defaults__", (1,))
    chunked = _stats(cfg, layer, acts, batched=True)
    for k in _expert_keys(whole):
        assert torch.equal(whole.inputs[k].x, chunked.inputs[k].x), k
        torch.testing.assert_close(chunked.inputs[k].xtx, whole.inputs[k].xtx, rtol=1e-12, atol=1e-9, msg=k)
