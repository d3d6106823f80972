"""GPTQ time per layer and projected whole-model time for Gemma 4 26b-a4b and 31b shapes.

Random weights, Hessians H = X^T X / n from random activations (lognormal channel magnitudes), one call of
`gemmaquant.algorithms.gptq` per quantized matrix as the pipeline makes them (q, k, v, o, gate, up, down, and
for 26b-a4b every expert's gate_up and down; the router stays in float). Sliding and full-attention layers
differ in attention shapes and are timed separately; the model time is n_sliding * t_sliding + n_full * t_full.

Each matrix time is split into the Hessian factorization (damped inverse Cholesky, depends on K only) and the
column sweep (~ N K^2). When a run is reduced, the measured parts are scaled and the row says so:
    --experts E      time E of the 128 experts, multiply by 128 / E
    --max-rows R     time R rows of a taller matrix, sweep scaled by N / R
    --max-k C        a matrix with K > C is timed at K = C: factorization scaled by (K / C)^3, sweep by (K / C)^2
    --absmax-params  fit the block parameters by absmax (plain RTN), as before session 14; the default fits them
                     imatrix-style (`importance_params`, the pipeline's default), whose search is timed in the sweep

    python benchmarks/bench_gptq.py --variant 26b-a4b --experts 2
    python benchmarks/bench_gptq.py --variant 31b --max-k 8192 --repeat 2
Writes benchmarks/results/gptq_<variant>_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from gemmaquant.algorithms import gptq
from gemmaquant.algorithms.gptq import damped_inverse_cholesky
from gemmaquant.checkpoint import expected_shapes
from gemmaquant.config import FULL, get_variant

RESULTS = Path(__file__).parent / "results"


def layer_matrices(variant: str, layer_type: str) -> list[tuple[str, int, int, int]]:
    """[(name, N, K, copies)] of the quantized matrices of one layer of the given attention type."""
    cfg = get_variant(variant)
    i = cfg.layer_types.index(layer_type)
    out = []
    for name, shape in expected_shapes(cfg).items():
        if not name.startswith(f"layers.{i}.") or len(shape) < 2 or ".router." in name:
            continue
        short = name.removeprefix(f"layers.{i}.")
        out.append((short, shape[-2], shape[-1], shape[0] if len(shape) == 3 else 1))
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_matrix(N: int, K: int, fmt, dev, max_rows: int, max_k: int, tokens: int, seed: int, repeat: int,
                importance_params: bool = True) -> dict:
    """Time one gptq call on an [N, K] matrix (or its reduced stand-in) and project the full-size time."""
    n, k = min(N, max_rows), min(K, max_k)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) * torch.exp(0.7 * torch.randn(k, generator=g))  # [T, k]
    H = (x.T @ x / tokens).to(dev)  # [k, k]
    w = (0.02 * torch.randn(n, k, generator=g)).to(dev)  # [n, k]
    del x
    t_chol = t_total = float("inf")
    for _ in range(repeat):  # best of `repeat`: the machine may be shared
        sync(dev)
        t0 = time.perf_counter()
        damped_inverse_cholesky(H.double(), 0.01)
        sync(dev)
        t_chol = min(t_chol, time.perf_counter() - t0)
        t0 = time.perf_counter()
        gptq(w, H, fmt, importance_params=importance_params)
        sync(dev)
        t_total = min(t_total, time.perf_counter() - t0)
    t_sweep = max(t_total - t_chol, 0.0)
    proj = t_chol * (K / k) ** 3 + t_sweep * (N / n) * (K / k) ** 2
    return {"N": N, "K": K, "timed_N": n, "timed_K": k, "factor_s": round(t_chol, 3), "sweep_s": round(t_sweep, 3),
            "measured_s": round(t_total, 3), "projected_s": round(proj, 3), "extrapolated": (n, k) != (N, K)}


def run(variant: str, fmt_name: str, dev: torch.device, experts: int, max_rows: int, max_k: int, tokens: int,
        repeat: int = 1, importance_params: bool = True):
    from gemmaquant.formats import get_format

    fmt = get_format(fmt_name)
    cfg = get_variant(variant)
    n_full = sum(t == FULL for t in cfg.layer_types)
    n_sliding = cfg.num_hidden_layers - n_full
    cache, layers = {}, {}
    for layer_type, count in (("sliding_attention", n_sliding), ("full_attention", n_full)):
        rows, total = [], 0.0
        for name, N, K, copies in layer_matrices(variant, layer_type):
            timed = min(copies, experts) if copies > 1 else 1
            key = (N, K)
            if key not in cache:  # identical shapes (k/v, gate/up, experts) are timed once per instance
                cache[key] = [time_matrix(N, K, fmt, dev, max_rows, max_k, tokens, s, repeat, importance_params)
                              for s in range(timed)]
            per = sum(r["projected_s"] for r in cache[key]) / len(cache[key])
            rows.append({"name": name, "copies": copies, "timed_copies": len(cache[key]), **cache[key][0],
                         "projected_s": round(per, 3), "projected_all_copies_s": round(per * copies, 3)})
            total += per * copies
        layers[layer_type] = {"count": count, "matrices": rows, "projected_layer_s": round(total, 2)}
    model_s = sum(v["count"] * v["projected_layer_s"] for v in layers.values())
    return {"variant": variant, "format": fmt_name, "device": device_name(dev), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "settings": {"experts_timed": experts, "max_rows": max_rows, "max_k": max_k,
                                                     "calibration_tokens": tokens, "repeat": repeat,
                                                     "importance_params": importance_params},
            "layers": layers, "projected_model_s": round(model_s, 1)}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()})"


def params_label(settings: dict) -> str:
    """How the run fit GPTQ's block parameters; runs from before the key was recorded used absmax."""
    if settings.get("importance_params", False):
        return "imatrix-style (importance_params, the pipeline's default)"
    return "absmax (importance_params off; the pipeline's default before session 14)"


def markdown(r: dict) -> str:
    s = r["settings"]
    cap = lambda v: "all" if v >= 1 << 30 else str(v)  # noqa: E731
    moe = any(m["copies"] > 1 for v in r["layers"].values() for m in v["matrices"])
    lines = [f"# GPTQ time, {r['variant']}, {r['format']}, {r['device']}, {r['threads']} thread(s)", "",
             f"Random weights, Hessians from {s['calibration_tokens']} random activation rows; experts timed: "
             f"{s['experts_timed'] if moe else 'no experts'}; rows timed at most: {cap(s['max_rows'])}; "
             f"K timed at most: {cap(s['max_k'])}; best of {s.get('repeat', 1)}; block parameters: "
             f"{params_label(s)}; `*` = extrapolated (see benchmarks/bench_gptq.py).", ""]
    for lt, v in r["layers"].items():
        lines += [f"## {lt} layer (x{v['count']}): {v['projected_layer_s']:.1f} s", "",
                  "| matrix | N x K | copies | timed | factorization s | sweep s | per matrix s | all copies s |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in v["matrices"]:
            star = "*" if m["extrapolated"] or m["timed_copies"] < m["copies"] else ""
            lines.append(f"| {m['name']} | {m['N']} x {m['K']} | {m['copies']} | {m['timed_N']} x {m['timed_K']} "
                         f"x{m['timed_copies']} | {m['factor_s']:.2f} | {m['sweep_s']:.2f} | {m['projected_s']:.2f} | "
                         f"{m['projected_all_copies_s']:.1f}{star} |")
        lines.append("")
    h = r["projected_model_s"] / 3600
    lines.append(f"**Projected whole model: {r['projected_model_s']:.0f} s ({h:.2f} h)** (GPTQ only: no calibration "
                 "forward passes, no Hessian accumulation, no I/O).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="26b-a4b", choices=["26b-a4b", "31b"])
    ap.add_argument("--format", default="int4_g32_sym")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--max-rows", type=int, default=1 << 30)
    ap.add_argument("--max-k", type=int, default=1 << 30)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="best of this many timings per matrix")
    ap.add_argument("--absmax-params", action="store_true",
                    help="fit block parameters by absmax instead of imatrix-style (the pipeline's default)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    r = run(a.variant, a.format, dev, a.experts, a.max_rows, a.max_k, a.tokens, a.repeat,
            importance_params=not a.absmax_params)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"gptq_{a.variant}_{dev.type}"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
