"""The quantize pipeline's device paths, on a CPU-only machine: every layer of a fixture quantized with its
weights, statistics and activations as fake CUDA tensors (tests/device/fake_cuda.py). A tensor the pipeline
leaves on the CPU meets a CUDA tensor somewhere and FakeTensorMode raises; what a layer hands to the writer
must come back in host memory, and the activations must stay where the budget put them."""

import dataclasses

import pytest
import torch

from gemmaquant.checkpoint import expected_shapes
from gemmaquant.formats.base import Packed
from gemmaquant.model.gemma4 import Gemma4, rope_inv_freqs
from gemmaquant.plan import make_plan
from gemmaquant.quantize import Activations, open_source, quantize_one_layer
from gemmaquant.recipe import Recipe
from tests.device.fake_cuda import fake_cuda

CUDA = torch.device("cuda")


# fixture configs shrunk so that GPTQ's column loop (slow under fake tensors: about a millisecond per op) has
# few columns: K = 32
MICRO = dict(vocab_size=256, hidden_size=32, intermediate_size=32, num_attention_heads=1, num_key_value_heads=1,
             head_dim=32, global_head_dim=32, sliding_window=8)
MICRO_CONFIGS = {
    "tiny-moe": dict(MICRO, num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"),
                     num_experts=3, top_k_experts=2, moe_intermediate_size=32),
    "tiny-edge": dict(MICRO, num_hidden_layers=4, vocab_size_per_layer_input=256,
                      layer_types=("sliding_attention", "full_attention") * 2, num_kv_shared_layers=2),
    "tiny-dense": dict(MICRO, num_hidden_layers=2, layer_types=("sliding_attention", "full_attention")),
}


def _inputs(fixture: str, r: Recipe):
    """Real CPU inputs: a fixture's architecture at micro size with random weights, the plan, and embedded
    calibration tokens (2 batches)."""
    cfg = dataclasses.replace(open_source(fixture).config, **MICRO_CONFIGS[fixture])
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.ones(s) if len(s) < 2 else torch.randn(s, generator=g) * 0.05)
             for n, s in expected_shapes(cfg).items()}
    with torch.device("meta"):
        shell = Gemma4(cfg)
    shell.load_state_dict({k: v for k, v in state.items() if not k.startswith("layers.")}, strict=False,
                          assign=True)
    ids = torch.randint(3, cfg.vocab_size, (4, 16), generator=g)
    with torch.no_grad():
        emb = [shell.embed(b) for b in ids.split(2)]
    acts = Activations(h=[e[0] for e in emb], ple=[e[1] for e in emb])
    plan = make_plan(cfg, r)
    plans = [{k[len(f"layers.{i}."):]: v for k, v in plan.items() if k.startswith(f"layers.{i}.")}
             for i in range(cfg.num_hidden_layers)]
    states = [{k[len(f"layers.{i}."):]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
              for i in range(cfg.num_hidden_layers)]
    return states, cfg, acts, plans


def _host_tensors(values):
    for name, v in values.items():
        for pk in (v if isinstance(v, list) else [v]):
            yield from ((name, t) for t in (pk.data.values() if isinstance(pk, Packed) else [pk]))


@pytest.mark.parametrize("fixture,method", [("tiny-moe", "gptq"), ("tiny-moe", "awq"), ("tiny-edge", "imatrix"),
                                            ("tiny-dense", "rtn")])
def test_every_layer_on_a_fake_cuda_device(fixture, method):
    r = Recipe.from_dict({"method": method, "n_samples": 4, "seq_len": 16, "batch_size": 2, "awq_grid": 2,
                          "moe_min_tokens": 4})
    states, cfg, acts, plans = _inputs(fixture, r)
    inv = rope_inv_freqs(cfg)
    with fake_cuda():
        acts.move(CUDA)
        for i in range(cfg.num_hidden_layers):
            values, info = quantize_one_layer(cfg, i, states[i], acts, plans[i], r, inv, CUDA,
                                              torch.bfloat16)
            wrong = [n for n, t in _host_tensors(values) if t.device.type != "cpu"]
            assert not wrong, f"layer {i}: values left on the device: {wrong}"
            assert all(h.device.type == "cuda" for h in acts.h), f"layer {i}: activations left the device"
            assert all(kv.k.device.type == "cuda" for kvs in acts.shared.values() for kv in kvs)
            if cfg.enable_moe_block:
                assert len(info["expert_tokens"]) == cfg.num_experts


def test_offloaded_activations_come_back_to_host_memory():
    r = Recipe.from_dict({"method": "rtn", "n_samples": 4, "seq_len": 16, "batch_size": 2})
    states, cfg, acts, plans = _inputs("tiny-edge", r)
    inv = rope_inv_freqs(cfg)
    with fake_cuda():
        for i in range(cfg.num_hidden_layers):  # acts stay in host memory; each batch visits the device
            quantize_one_layer(cfg, i, states[i], acts, plans[i], r, inv, CUDA, torch.bfloat16)
            assert all(h.device.type == "cpu" for h in acts.h), f"layer {i}"
            assert all(kv.k.device.type == "cpu" for kvs in acts.shared.values() for kv in kvs), f"layer {i}"


def test_fake_cuda_catches_a_tensor_left_on_the_cpu():
    """The harness itself: a CPU tensor meeting a device tensor raises."""
    with fake_cuda():
        x = torch.ones(4, device="cuda")
        with pytest.raises(Exception, match="device"):
            x + torch.ones(4)


def test_rtn_layers_without_activations_on_a_fake_cuda_device():
    """Plain RTN reads no statistics: quantize_one_layer gets no activations, runs nothing, and what it hands to
    the writer comes back in host memory."""
    r = Recipe.from_dict({"method": "rtn", "n_samples": 4, "seq_len": 16, "batch_size": 2})
    states, cfg, _, plans = _inputs("tiny-moe", r)
    inv = rope_inv_freqs(cfg)
    with fake_cuda():  # layer 0: attention, dense MLP and experts (fake tensors cost about a millisecond an op)
        values, info = quantize_one_layer(cfg, 0, states[0], None, plans[0], r, inv, CUDA, torch.bfloat16)
    wrong = [n for n, t in _host_tensors(values) if t.device.type != "cpu"]
    assert not wrong, f"values left on the device: {wrong}"
    assert info["expert_tokens"] is None and set(values) == set(plans[0])
