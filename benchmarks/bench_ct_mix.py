"""compressed-tensors per-layer mixes against uniform W4A16 / W8A16 on the trained fixtures (gemmaquant's own eval:
KL(float || quantized), top-1 agreement and perplexity on held-out text, the export read back as vLLM would run it).

For each fixture: GPTQ onto uniform int4 g32 (W4A16) and uniform int8 (W8A16), and GPTQ onto searched mixes
(`--format safetensors --ct-mix`, the mix solved by gemmaquant.ct_mix on one sensitivity measurement) at budgets of
exactly the W4A16 file's bytes, the W8A16 file's, and two sizes between them. Writes
benchmarks/results/ct_mix.{json,md}.

    python benchmarks/bench_ct_mix.py [--fixtures tiny-dense,tiny-moe,tiny-edge] [--n-seq 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIXTURES = ("tiny-dense", "tiny-moe", "tiny-edge")
BETWEEN = (1 / 3, 2 / 3)  # mix budgets between the W4A16 and W8A16 sizes, as fractions of the gap


def _run(fx: str, out: Path, n_seq: int, **kw) -> dict:
    from gemmaquant.export.inspect import file_bits
    from gemmaquant.workflow import run_eval, run_quantize

    res = run_quantize(fx, formats="safetensors", out=out, evaluate=False, progress=False, overwrite=True, **kw)
    path = res["files"]["safetensors"]
    ev = run_eval(fx, Path(path), n_seq=n_seq, device="cpu")
    fb = file_bits(path)
    return {"bytes": fb["bytes"], "bits_per_weight": fb["bits_per_weight"], "kl_mean": ev["kl_mean"],
            "kl_p99": ev["kl_p99"], "top1": ev["top1"], "ppl_test": ev["ppl_test"], "ppl_ref": ev["ppl_ref"],
            "quantize_seconds": res["quantize_seconds"]}


def run_fixture(fx: str, tmp: Path, n_seq: int) -> list[dict]:
    from gemmaquant.ct_mix import CTSpace, solve_ct_mix
    from gemmaquant.recipe import default_recipe
    from gemmaquant.sensitivity import measure
    from gemmaquant.target_mix import write_mix
    from gemmaquant.workflow import model_config

    rows = []
    for label, bits in (("uniform W4A16 (int4 g32)", 4), ("uniform W8A16 (int8)", 8)):
        t0 = time.time()
        rows.append({"fixture": fx, "variant": label, **_run(fx, tmp / f"u{bits}", n_seq, bits=bits)})
        print(f"{fx}: {label}: {rows[-1]['bits_per_weight']:.3f} bpw, KL {rows[-1]['kl_mean']:.5f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    w4, w8 = rows[0]["bytes"], rows[1]["bytes"]
    cfg = model_config(fx)
    t0 = time.time()
    sens = measure(fx, default_recipe(fx, 4, "gptq"), kl=True, progress=False, space=CTSpace())
    measure_s = time.time() - t0
    # MoE: also each layer's experts on their own scheme (--per-layer-experts: vLLM loads it, transformers not)
    cases = [(True, f) for f in (0.0, *BETWEEN, 1.0)]
    if cfg.enable_moe_block:
        cases += [(False, f) for f in (0.0, *BETWEEN, 1.0)]
    for shared, frac in cases:
        budget = int(w4 + frac * (w8 - w4))
        mix = solve_ct_mix(cfg, sens, budget, shared_experts=shared)
        f = write_mix({"format": "gemmaquant-ct-mix", **mix}, tmp / f"mix-{shared}-{frac:.2f}.json")
        row = _run(fx, tmp / f"m{shared}{frac:.2f}", n_seq, bits=4, ct_mix=f, per_layer_experts=not shared)
        assert row["bytes"] == mix["bytes"] <= budget, (row["bytes"], mix["bytes"], budget)
        at = {0.0: "at the W4A16 size", 1.0: "at the W8A16 size"}.get(frac, f"{frac:.2f} of the way to W8A16")
        at += "" if shared else ", experts per layer (vLLM only)"
        counts = {}
        for t in mix["unit_schemes"].values():
            counts[t] = counts.get(t, 0) + 1
        rows.append({"fixture": fx, "variant": f"searched mix, {at}", "budget_bytes": budget,
                     "predicted_loss": mix["predicted_loss"], "units": counts, "families": mix["families"],
                     "sensitivity_seconds": round(measure_s, 1), **row})
        print(f"{fx}: mix {at}: {row['bits_per_weight']:.3f} bpw, KL {row['kl_mean']:.5f}, units {counts}",
              flush=True)
    return rows


def write_outputs(data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ct_mix.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# compressed-tensors per-layer mixes against uniform W4A16 / W8A16", "",
             f"`python benchmarks/bench_ct_mix.py` ({data['when']}, {data['machine']}). KL(float || quantized), "
             f"top-1 and perplexity from `gemmaquant eval` on {data['n_seq']} x 128 held-out tokens, the "
             "compressed-tensors export read back; GPTQ (the bundled recipe) in every row; mixes solved on one "
             "sensitivity measurement per fixture (KL of each tensor quantized alone), budgets in exact file bytes. "
             "Bits per weight count the bf16 embeddings, which dominate these tiny models.", "",
             "| fixture | variant | bits/weight | KL mean | KL p99 | top-1 | perplexity (float -> quantized) | "
             "KL / uniform within its budget | units (scheme: count) |", "|---|---|---|---|---|---|---|---|---|"]
    for fx in data["fixtures"]:
        rows = [r for r in data["rows"] if r["fixture"] == fx]
        uni = [r for r in rows if r["variant"].startswith("uniform")]
        for r in rows:
            ref = max((u for u in uni if u["bytes"] <= r.get("budget_bytes", r["bytes"])), key=lambda u: u["bytes"],
                      default=None)  # the largest uniform file within the mix's budget
            ratio = f"{r['kl_mean'] / ref['kl_mean']:.2f}x {ref['variant'].split()[1]}" \
                if ref is not None and not r["variant"].startswith("uniform") else ""
            units = ", ".join(f"{k}: {v}" for k, v in r.get("units", {}).items())
            lines.append(f"| {fx} | {r['variant']} | {r['bits_per_weight']:.3f} | {r['kl_mean']:.5f} | "
                         f"{r['kl_p99']:.5f} | {100 * r['top1']:.2f}% | {r['ppl_ref']:.3f} -> {r['ppl_test']:.3f} | "
                         f"{ratio} | {units} |")
    (RESULTS / "ct_mix.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import os
    import platform

    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=",".join(FIXTURES))
    ap.add_argument("--n-seq", type=int, default=16)
    ap.add_argument("--table-only", action="store_true", help="rewrite ct_mix.md from ct_mix.json")
    args = ap.parse_args(argv)
    if args.table_only:
        write_outputs(json.loads((RESULTS / "ct_mix.json").read_text()))
        return 0
    fixtures = args.fixtures.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for fx in fixtures:
            rows += run_fixture(fx, Path(d) / fx, args.n_seq)
    data = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "n_seq": args.n_seq,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "fixtures": fixtures, "rows": rows}
    write_outputs(data)
    print((RESULTS / "ct_mix.md").read_text())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
