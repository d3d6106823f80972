"""Which Gemma 4 tensors are sensitive, measured on the trained fixtures: for every tensor the search chooses a type
for, the KL(float || model) on calibration text when that tensor alone is round-to-nearest quantized to its
cheapest candidate type (Q4_0 for most; gemmaquant.sensitivity), grouped by role (token embedding, per-layer
embedding table, attention, dense MLP, experts, PLE gate/projection) and by position (first layer, last layer,
the others). The unit the allocation trades in is the KL per byte saved, so the table gives that too (going from
Q8_0 to the cheapest type). Also the rank correlation between the raw Hessian proxy and the measured KL.
Writes benchmarks/results/sensitivity.{json,md}.

    python benchmarks/bench_sensitivity.py [--fixtures tiny-dense,tiny-moe,tiny-edge]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIXTURES = ("tiny-dense", "tiny-moe", "tiny-edge")


def main():
    import torch

    from gemmaquant.recipe import Recipe
    from gemmaquant.sensitivity import measure, position, role
    from gemmaquant.workflow import model_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=",".join(FIXTURES))
    ap.add_argument("--table-only", action="store_true", help="rewrite sensitivity.md from sensitivity.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for fx in [] if args.table_only else args.fixtures.split(","):
        n_layers = model_config(fx).num_hidden_layers
        s = measure(fx, Recipe(), progress=False)
        rows = []
        for u in s.units:
            cheap = s.reference_type[u.name]
            (b8, l8), (bc, lc) = u.options["Q8_0"], u.options[cheap]
            n = 1
            for d in u.shape:
                n *= d
            rows.append({"tensor": u.name, "role": role(u.name), "position": position(u.name, n_layers),
                         "weights": n, "cheapest": cheap, "kl_alone": s.kl[u.name],
                         "proxy_cheapest": s.proxy[u.name][cheap],
                         "kl_per_mbyte_saved": (lc - l8) / max(b8 - bc, 1) * 2**20})
        out[fx] = {"spearman_proxy_vs_kl": s.spearman(), "tensors": rows}
        print(fx, "spearman", s.spearman(), flush=True)
    saved = json.loads((RESULTS / "sensitivity.json").read_text()) if (RESULTS / "sensitivity.json").is_file() else {}
    saved.update(out)
    (RESULTS / "sensitivity.json").write_text(json.dumps(saved, indent=1) + "\n")
    lines = ["KL(float || model) with one tensor alone round-to-nearest quantized to its cheapest type (mostly Q4_0), "
             "on 8 x 256 calibration tokens; KL/MiB: the KL that tensor adds per MiB saved going Q8_0 -> cheapest "
             "(the allocation's price). Mean over the tensors of each group. Regenerate: "
             "`python benchmarks/bench_sensitivity.py`.", "",
             "| fixture | role | position | tensors | weights | mean KL alone | mean KL per MiB saved |",
             "|---|---|---|---|---|---|---|"]
    for fx, d in saved.items():
        groups: dict[tuple, list] = {}
        for r in d["tensors"]:
            groups.setdefault((r["role"], r["position"]), []).append(r)
        for (ro, pos), rs in sorted(groups.items()):
            lines.append(f"| {fx} | {ro} | {pos} | {len(rs)} | {sum(r['weights'] for r in rs)} | "
                         f"{sum(r['kl_alone'] for r in rs) / len(rs):.2e} | "
                         f"{sum(r['kl_per_mbyte_saved'] for r in rs) / len(rs):.2e} |")
        lines.append(f"| {fx} | rank correlation (Spearman) of the raw Hessian proxy with the KL | | | | "
                     f"{d['spearman_proxy_vs_kl']:.2f} | |")
    lines += ["", "Prior for models too large for the KL per tensor (gemmaquant.sensitivity.PRIOR_WEIGHTS): the "
              "geometric mean of KL / proxy over the fixtures' tensors of each role and position; rank correlation "
              "with the KL of the proxy scaled by it, in sample and with the weights fitted on the other two fixtures:", "",
              "| role | position | KL per unit of proxy |", "|---|---|---|"]
    w = prior_weights(saved)
    lines += [f"| {ro} | {pos} | {v:.3g} |" for (ro, pos), v in sorted(w.items())]
    lines += ["", "| fixture | raw proxy | scaled by the prior | prior fitted on the other fixtures |",
              "|---|---|---|---|"]
    for fx in saved:
        rs = [r for r in saved[fx]["tensors"] if r["proxy_cheapest"] > 0]
        kl = [r["kl_alone"] for r in rs]
        loo = prior_weights({f: v for f, v in saved.items() if f != fx})
        lines.append(f"| {fx} | {_spearman([r['proxy_cheapest'] for r in rs], kl):.2f} | "
                     f"{_spearman([_w(w, r) * r['proxy_cheapest'] for r in rs], kl):.2f} | "
                     f"{_spearman([_w(loo, r) * r['proxy_cheapest'] for r in rs], kl):.2f} |")
    (RESULTS / "sensitivity.md").write_text("\n".join(lines) + "\n")


def prior_weights(saved: dict) -> dict[tuple[str, str], float]:
    """(role, position) -> geometric mean of KL / proxy; (role, "any") pools the positions."""
    import math

    groups: dict[tuple[str, str], list[float]] = {}
    for d in saved.values():
        for r in d["tensors"]:
            if r["proxy_cheapest"] > 0 and r["kl_alone"] > 0:
                v = math.log(r["kl_alone"] / r["proxy_cheapest"])
                for key in ((r["role"], r["position"]), (r["role"], "any")):
                    groups.setdefault(key, []).append(v)
    return {k: math.exp(sum(v) / len(v)) for k, v in groups.items()}


def _w(w: dict, r: dict) -> float:
    return w.get((r["role"], r["position"]), w.get((r["role"], "any"), 1.0))


def _spearman(a, b) -> float:
    import torch

    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([a.argsort().argsort().double(), b.argsort().argsort().double()]))[0, 1])


if __name__ == "__main__":
    main()
