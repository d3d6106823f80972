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
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for fx in args.fixtures.split(","):
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
    (RESULTS / "sensitivity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
