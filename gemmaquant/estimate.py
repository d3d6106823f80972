"""`--dry-run`: what a quantization will produce and cost, from the config alone (no weights needed).

Sizes are exact arithmetic on the plan (gemmaquant.export.sizes: every tensor's bytes in each file, the figure
`gemmaquant inspect` reads back from the written file). Memory and time are estimates: peak memory = one layer
in fp32 (twice: float and dequantized) + its calibration statistics + the calibration activations; time = the
run's floating-point work divided by a matmul throughput measured on this machine in a fraction of a second.
"""

from __future__ import annotations

import time

import torch

from gemmaquant.config import Gemma4Config
from gemmaquant.plan import TensorPlan
from gemmaquant.recipe import Recipe


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def matmul_gflops(seconds: float = 0.3) -> float:
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0) / 1e9


def estimate(cfg: Gemma4Config, plan: dict[str, TensorPlan], recipe: Recipe, formats: tuple[str, ...],
             device=None) -> dict:
    """The dry-run figures; `device` (a torch.device) adds the device-memory estimate (gemmaquant.estimate_device):
    always its line on a GPU run, and on the CPU the figures a GPU run would need."""
    from gemmaquant.export.sizes import gguf_size, safetensors_size

    total = sum(_numel(p.shape) for p in plan.values())
    # one layer (the largest) in fp32, twice; its Hessians (fp64); activations in and out (fp32)
    layer_bytes = {}
    hess = {}
    for p in plan.values():
        if p.name.startswith("layers."):
            i = int(p.name.split(".")[1])
            layer_bytes[i] = layer_bytes.get(i, 0) + _numel(p.shape) * 4 * 2
            if p.fmt is not None:
                K = p.shape[-1]
                experts = p.shape[0] if len(p.shape) == 3 else 1
                hess[i] = hess.get(i, 0) + experts * K * K * 8
    tokens = recipe.n_samples * recipe.seq_len
    acts = tokens * cfg.hidden_size * 4 * 2
    peak = max(layer_bytes.values()) + max(hess.values(), default=0) + acts
    # floating-point work: two forward passes over the calibration tokens (active params), Hessian accumulation,
    # and the algorithm itself (GPTQ ~ 2 N K^2 per matrix + K^3 Cholesky)
    active_quant = 0
    algo = 0.0
    for p in plan.values():
        if p.fmt is None or not p.name.startswith("layers."):
            continue
        N, K = p.shape[-2], p.shape[-1]
        experts = p.shape[0] if len(p.shape) == 3 else 1
        share = (cfg.top_k_experts / cfg.num_experts) if experts > 1 else 1.0
        active_quant += N * K * experts * share
        if recipe.method == "gptq":
            algo += experts * (2 * N * K * K + K**3 / 3)
        elif recipe.method == "awq":
            algo += experts * recipe.awq_grid * 2 * N * K * min(tokens, 2048)
    flops = 2 * 2 * active_quant * tokens + tokens * sum(
        p.shape[-1] ** 2 * 2 for p in plan.values() if p.fmt is not None and p.name.startswith("layers.")) + algo
    gf = matmul_gflops()
    seconds = flops / (gf * 1e9)
    gib = 2**30
    res = {
        "params_total": total,
        "gguf": gguf_size(cfg, plan, recipe) if "gguf" in formats else None,
        "safetensors": safetensors_size(plan) if "safetensors" in formats else None,
        "float_tensors": {n: p.reason for n, p in plan.items() if p.fmt is None},
        "peak_memory_bytes_estimate": int(peak),
        "time_seconds_estimate": seconds, "measured_matmul_gflops": gf,
    }
    grid = f"a per-tensor mix (file type {recipe.gguf_type})" if recipe.tensor_types else (recipe.gguf_type or
                                                                                          recipe.weight_format)
    lines = [f"plan: {recipe.method} onto {grid}, "
             f"{total / 1e9:.3f}B parameters, {len(plan)} tensors"]
    for t, n in sorted((res["gguf"] or {}).get("params_by_type", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"  {t:6s} {n / 1e9:9.4f}B params in the GGUF")
    if res["gguf"]:
        lines.append(f"GGUF: {res['gguf']['bytes'] / gib:.2f} GiB, {res['gguf']['bits_per_weight']:.3f} bits/weight")
    if res["safetensors"]:
        lines.append(f"safetensors (compressed-tensors): {res['safetensors']['bytes'] / gib:.2f} GiB, "
                     f"{res['safetensors']['bits_per_weight']:.3f} bits/weight (text model; towers copied as they are)")
    reasons = {}
    for n, why in res["float_tensors"].items():
        reasons.setdefault(why, []).append(n)
    lines.append("kept in float:")
    for why, names in reasons.items():
        lines.append(f"  {len(names):4d} tensors: {why}")
    lines.append(f"peak memory (estimate): {peak / gib:.1f} GiB; time (estimate at {gf:.0f} GFLOP/s measured here): "
                 f"{seconds / 3600:.2f} h")
    from gemmaquant.estimate_device import device_memory

    dm = device_memory(cfg, plan, recipe)
    res.update(dm)
    if device is not None:
        res["device"] = str(device)
    lines.append(("on a GPU: " if device is None or device.type == "cpu" else f"on {device}: ") + dm["device_text"])
    res["text"] = "\n".join(lines)
    return res
