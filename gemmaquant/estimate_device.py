"""`--dry-run` on a device: peak device memory and host memory of a quantization, and whether it fits a 24 GB card.

The model of the run (gemmaquant.quantize with gemmaquant.device):
    device  one layer's weights in fp32 (the float copy and the dequantized result written over it, plus one
            matrix's GPTQ temporaries: W, its transpose and codes [N, K], the Hessian factor [K, K] three times)
            + the layer's Hessians in fp32 (every input group; MoE: one [H, H] and one [Ie, Ie] per expert)
            + the forward's largest temporaries for one calibration batch (attention scores [b, heads, T, T] fp32,
              the MLP / expert intermediate [b T k, width])
            + the calibration activations (in and out, fp32) when they fit the activation budget (half the free
              memory), else nothing: they stay in host memory and visit the device one batch at a time
    host    two layers of checkpoint tensors as stored (the one on the device and the one read ahead, pinned)
            + the embedding tables in fp32 (the calibration set is embedded on the host)
            + the activations when they are offloaded
Estimates, not measurements: benchmarks/bench_pipeline.py measures the peaks on the real shapes.
"""

from __future__ import annotations

from gemmaquant.config import Gemma4Config
from gemmaquant.plan import TensorPlan
from gemmaquant.recipe import Recipe

CARD_24GB = 24 * 10**9


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def device_memory(cfg: Gemma4Config, plan: dict[str, TensorPlan], recipe: Recipe, card_bytes: int = CARD_24GB) -> dict:
    layers: dict[int, dict] = {}
    for p in plan.values():
        if not p.name.startswith("layers."):
            continue
        i = int(p.name.split(".")[1])
        d = layers.setdefault(i, {"params": 0, "gptq_tmp": 0, "hess": {}})
        d["params"] += _numel(p.shape)
        if p.fmt is not None:
            N, K = p.shape[-2], p.shape[-1]
            d["gptq_tmp"] = max(d["gptq_tmp"], 3 * N * K * 4 + 3 * K * K * 4)
            experts = p.shape[0] if len(p.shape) == 3 else 1
            d["hess"][(K, experts, p.name.rsplit(".", 1)[0] if experts == 1 else p.name)] = experts * K * K * 4
    T, b = recipe.seq_len, recipe.batch_size
    tokens = recipe.n_samples * T
    width = max(cfg.intermediate_size * (2 if cfg.use_double_wide_mlp else 1),
                (cfg.moe_intermediate_size or 0) * 2 * (cfg.top_k_experts or 0))
    forward = b * cfg.num_attention_heads * T * T * 4 * 2 + b * T * width * 4 * 3
    per_layer = max(2 * d["params"] * 4 + d["gptq_tmp"] + sum(d["hess"].values()) for d in layers.values())
    acts = tokens * cfg.hidden_size * 4 * 2
    layer_stored = max(d["params"] for d in layers.values()) * 2  # bf16 checkpoint
    embed = cfg.vocab_size * cfg.hidden_size * 4 + (
        cfg.vocab_size_per_layer_input * cfg.num_hidden_layers * cfg.hidden_size_per_layer_input * 4
        if cfg.hidden_size_per_layer_input else 0)
    resident = per_layer + forward
    on_device = resident + acts <= card_bytes and acts <= (card_bytes - resident) // 2
    device_peak = resident + (acts if on_device else 0)
    host_peak = 2 * layer_stored + embed + (0 if on_device else acts)
    fits = device_peak <= card_bytes
    gib = 2**30
    where = "on the device" if on_device else "in host memory"
    text = (f"device (estimate): peak {device_peak / gib:.1f} GiB (layer + Hessians + GPTQ {per_layer / gib:.1f}, "
            f"forward {forward / gib:.2f}, activations {acts / gib:.2f} GiB {where}); host peak {host_peak / gib:.1f} "
            f"GiB; {'fits' if fits else 'does not fit'} a 24 GB card")
    return {"device_peak_bytes_estimate": int(device_peak), "host_peak_bytes_estimate": int(host_peak),
            "activations_on_device": on_device, "fits_24gb": fits, "device_text": text}
