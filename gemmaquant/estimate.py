"""`--dry-run`: what a quantization will produce and cost, from the config alone (no weights needed).

Sizes are exact arithmetic on the plan (gemmaquant.export.sizes: every tensor's bytes in each file, the figure
`gemmaquant inspect` reads back from the written file). Memory and time are estimates: peak memory = one layer
in fp32 (twice: float and dequantized) + its calibration statistics + the calibration activations; time = the
forward's and statistics' floating-point work at the GEMM rate, plus GPTQ's time per matrix, both measured on the
device the run would use (gemmaquant.throughput: short probes at the model's widths, cached), and the output says
which measurement it used.
"""

from __future__ import annotations

import torch

from gemmaquant.config import Gemma4Config
from gemmaquant.plan import TensorPlan
from gemmaquant.recipe import Recipe


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def family_lines(families: list[dict], min_share: float = 1e-3) -> list[str]:
    """The GGUF's type per tensor family and why (gemmaquant.export.sizes.gguf_families), one line each; the
    families under `min_share` of the file (norms, scalars) in one closing line."""
    lines = ["GGUF types per tensor family (share of the file, bits/weight; why, where not the default type):"]
    small = [r for r in families if r["share"] < min_share]
    for r in families:
        if r["share"] >= min_share:
            where = f" [layers {r['layers']}]" if r["layers"] else ""
            why = f"  <- {r['why']}" if r["why"] else ""
            lines.append(f"  {r['family']}{where}: {r['type']}, {100 * r['share']:.2f}%, "
                         f"{r['bits_per_weight']:.2f} bpw{why}")
    if small:
        types = ", ".join(sorted({r["type"] for r in small}))
        lines.append(f"  {len(small)} smaller families ({types}): {100 * sum(r['share'] for r in small):.2f}% "
                     "of the file")
    return lines


def estimate(cfg: Gemma4Config, plan: dict[str, TensorPlan], recipe: Recipe, formats: tuple[str, ...],
             device=None, throughput=None) -> dict:
    """The dry-run figures; `device` (a torch.device) adds the device-memory estimate (gemmaquant.estimate_device):
    always its line on a GPU run, and on the CPU the figures a GPU run would need. throughput: a
    gemmaquant.throughput.Throughput to use instead of measuring `device` (None: measure, or reuse the cache)."""
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
    # time: two forward passes over the calibration tokens (active params), Hessian accumulation (and AWQ's grid
    # search) as GEMM work at the measured rate; GPTQ per matrix from its measured sweep (gemmaquant.throughput)
    from gemmaquant.algorithms.gptq_batched import _chunk_experts
    from gemmaquant.device import forward_dtype
    from gemmaquant.throughput import measure

    dev = device if device is not None else torch.device("cpu")
    quantized = [p for p in plan.values() if p.fmt is not None and p.name.startswith("layers.")]
    if throughput is None:
        shapes = {(p.fmt.name, p.shape[-1]): p.fmt for p in quantized} if recipe.method == "gptq" else {}
        throughput = measure(dev, forward_dtype(recipe.forward_dtype, dev), cfg.hidden_size,
                             {(f, K) for (_, K), f in shapes.items()}, importance=recipe.importance_params,
                             acc_dtype=torch.float64 if dev.type == "cpu" else torch.float32)
    active_quant = 0
    algo = 0.0
    gptq_s = 0.0
    for p in quantized:
        N, K = p.shape[-2], p.shape[-1]
        experts = p.shape[0] if len(p.shape) == 3 else 1
        share = (cfg.top_k_experts / cfg.num_experts) if experts > 1 else 1.0
        active_quant += N * K * experts * share
        if recipe.method == "gptq":
            batch = _chunk_experts(experts, N, K, dev, None) if experts > 1 else 1
            gptq_s += throughput.gptq_seconds(p.fmt.name, N, K, experts, batch, recipe.importance_params)
        elif recipe.method == "awq":
            algo += experts * recipe.awq_grid * 2 * N * K * min(tokens, 2048)
    # statistics: X^T X of every input group once (q/k/v share theirs, gate/up theirs), of each expert's inputs
    # for the top_k experts each token is routed to, plus the forced-routing and AWQ-sample passes left out
    from gemmaquant.capture import group_of

    groups = {}
    for p in quantized:
        rel = p.name.split(".", 2)[2]
        experts = p.shape[0] if len(p.shape) == 3 else 1
        per_token = (cfg.top_k_experts if experts > 1 else 1) * p.shape[-1] ** 2 * 2
        groups[(p.name.split(".")[1], rel if experts > 1 else _group(rel, group_of))] = per_token
    stats_flops = tokens * sum(groups.values())
    gf, af = throughput.gemm_gflops, throughput.acc_gflops or throughput.gemm_gflops
    forward_s = (2 * 2 * active_quant * tokens + algo) / (gf * 1e9)
    stats_s = stats_flops / (af * 1e9)
    gemm_s = forward_s + stats_s
    seconds = gemm_s + gptq_s
    gib = 2**30
    res = {
        "params_total": total,
        "gguf": gguf_size(cfg, plan, recipe) if "gguf" in formats else None,
        "safetensors": safetensors_size(plan) if "safetensors" in formats else None,
        "float_tensors": {n: p.reason for n, p in plan.items() if p.fmt is None},
        "peak_memory_bytes_estimate": int(peak),
        "time_seconds_estimate": seconds, "measured_matmul_gflops": gf,
        "time_parts_seconds": {"forward": forward_s, "statistics": stats_s, "gptq": gptq_s},
        "time_basis": f"{throughput.basis} on {throughput.device}",
    }
    grid = f"a per-tensor mix (file type {recipe.gguf_type})" if recipe.tensor_types else (recipe.gguf_type or
                                                                                          recipe.weight_format)
    if recipe.ct_schemes:
        grid = "a per-layer compressed-tensors mix (int4 / int8 / bf16)"
    lines = [f"plan: {recipe.method} onto {grid}, "
             f"{total / 1e9:.3f}B parameters, {len(plan)} tensors"]
    for t, n in sorted((res["gguf"] or {}).get("params_by_type", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"  {t:6s} {n / 1e9:9.4f}B params in the GGUF")
    if res["gguf"]:
        lines.append(f"GGUF: {res['gguf']['bytes'] / gib:.2f} GiB, {res['gguf']['bits_per_weight']:.3f} bits/weight")
        lines += family_lines(res["gguf"]["families"])
    if res["safetensors"]:
        lines.append(f"safetensors (compressed-tensors): {res['safetensors']['bytes'] / gib:.2f} GiB, "
                     f"{res['safetensors']['bits_per_weight']:.3f} bits/weight (text model; towers copied as they are)")
    reasons = {}
    for n, why in res["float_tensors"].items():
        reasons.setdefault(why, []).append(n)
    lines.append("kept in float:")
    for why, names in reasons.items():
        lines.append(f"  {len(names):4d} tensors: {why}")
    lines.append(f"peak memory (estimate): {peak / gib:.1f} GiB; time (estimate): {seconds / 3600:.2f} h = forward "
                 f"{forward_s / 3600:.2f} h at {gf:.0f} GFLOP/s + statistics {stats_s / 3600:.2f} h at {af:.0f} "
                 f"GFLOP/s"
                 + (f" + GPTQ {gptq_s / 3600:.2f} h from its sweep timed at the model's widths" if gptq_s else "")
                 + f"; throughput {res['time_basis']}")
    from gemmaquant.estimate_device import device_memory

    dm = device_memory(cfg, plan, recipe)
    res.update(dm)
    if device is not None:
        res["device"] = str(device)
    lines.append(("on a GPU: " if device is None or device.type == "cpu" else f"on {device}: ") + dm["device_text"])
    res["text"] = "\n".join(lines)
    return res


def _group(rel: str, group_of) -> str:
    """The input statistic a layer tensor reads (q/k/v share one), or the tensor itself when it has none."""
    try:
        return group_of(rel)
    except KeyError:
        return rel
