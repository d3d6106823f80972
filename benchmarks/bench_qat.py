"""QAT versus PTQ on the bundled trained fixtures: held-out KL divergence, top-1 agreement and perplexity.

For every fixture (tiny-dense, tiny-moe, tiny-edge) and bit width (4, 3, 2; formats gemmaquant.qat.BITS_FORMAT):
    RTN    round-to-nearest of every planned matrix (prepare_qat + convert with no training)
    GPTQ   the PTQ pipeline (gemmaquant.quantize, method gptq, calibrated on train.txt): QAT's starting point
    QAT    gemmaquant.qat.qat_train: --steps steps of distillation from the float model, from the GPTQ result
each measured against the float fixture on the first --eval-seqs x 128 tokens of heldout.txt (documents none of
the fixtures was trained on). "recovered vs RTN" = 1 - KL(QAT) / KL(RTN), "vs GPTQ" = 1 - KL(QAT) / KL(GPTQ) (the
variants table's "gap recovered"). With --format (e.g. q4_0) every model is on that grid and RTN is its own fit.

    python benchmarks/bench_qat.py                          # everything, 1 thread (about 3 hours on one core)
    python benchmarks/bench_qat.py --fixtures tiny-moe --bits 4
    python benchmarks/bench_qat.py --table-only             # rebuild the table from the saved runs
    python benchmarks/bench_qat.py --bits 4 --format q4_0   # QAT on llama.cpp's Q4_0 grid
    python benchmarks/bench_qat.py --format Q4_K_M          # on llama.cpp's Q4_K_M mix (each tensor its block type)
    python benchmarks/bench_qat.py --fixtures tiny-edge --bits 4 --set lr=0 --set scale_lr=0.01 --tag scales-only
Each run is saved as benchmarks/results/qat/<fixture>-int<bits>.json (or <fixture>-<format>.json); the table goes to
benchmarks/results/qat.json and qat.md, and into docs/qat.md between the qat-table markers. A run with recipe
overrides (--set, named by --tag) is saved as results/qat/variants/<fixture>-int<bits>-<tag>.json and tabulated
against the default recipe's run between the qat-variants markers.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "qat"
DOC = Path(__file__).parent.parent / "docs" / "qat.md"
VARIANTS = RUNS / "variants"
START, END = "<!-- qat-table:start -->", "<!-- qat-table:end -->"
VSTART, VEND = "<!-- qat-variants:start -->", "<!-- qat-variants:end -->"
FIXTURES = ("tiny-dense", "tiny-moe", "tiny-edge")
# What a saved run that does not record a field ran with: runs without a "recipe" ran on the defaults before
# session 5 (PAST_DEFAULTS) plus their overrides; "average" did not exist before session 4 (0.0 = off), nor
# "expert_lr_scale" before session 10 (1.0: the experts on the common rates), nor "attention_lr_scale" before
# session 20 (1.0: attention on the common rates).
PAST_DEFAULTS = {"lr": 0.01, "scale_lr": 0.003, "router_weight": 10.0, "average": 0.0, "expert_lr_scale": 1.0,
                 "batch_size": 8, "attention_lr_scale": 1.0}
ADDED_FIELDS = ("average", "expert_lr_scale", "attention_lr_scale")  # a recorded recipe without them: PAST_DEFAULTS
MOE_ONLY = ("router_weight", "expert_lr_scale")  # no effect on a model without experts
NOT_RECIPE = ("bits", "weight_format", "gguf_type", "save_every")  # shown in other columns, or no effect on results


def run_one(fixture: str, bits: int, steps: int, eval_seqs: int, overrides: dict | None = None,
            weight_format: str | None = None) -> dict:
    import gemmaquant
    from gemmaquant.eval.metrics import compare_logits, heldout_ids
    from gemmaquant.fixtures import fixture_path
    from gemmaquant.qat import convert, prepare_qat, qat_train
    from gemmaquant.qat.train import default_heldout
    from gemmaquant.recipe import Recipe

    data = Path(str(fixture_path(fixture))).parent.parent / "calibration" / "data" / "train.txt"
    grid = {"weight_format": weight_format}
    if weight_format is not None and is_mix(weight_format):  # a llama.cpp mix: every tensor on its own type
        grid = {"gguf_type": weight_format.upper()}
        bits = round(mix_bits(fixture, weight_format), 2)
    with tempfile.TemporaryDirectory() as tmp:
        rep = qat_train(fixture, bits=bits if "weight_format" in grid else 4, data=data, steps=steps, out=tmp,
                        eval_seqs=eval_seqs, export=False, progress=False, **grid, **(overrides or {}))
    run = {"fixture": fixture, "bits": bits, "format": rep["format"], "steps": steps, "gptq": rep["ptq"],
           "qat": rep["qat"], "kl_train_first": rep["kl_first"], "kl_train_last": rep["kl_last"],
           "kl_train_tail": rep["kl_tail"], "seconds": rep["seconds"], "recipe": rep["recipe"],
           "gap_removed": rep.get("gap_removed"), "gptq_importance_params": rep["ptq_recipe"]["importance_params"]}
    if overrides is not None:  # a variant: QAT against GPTQ only
        return {**run, "overrides": overrides}
    fmt = rep["format"]
    ref = gemmaquant.load(fixture)
    rtn = prepare_qat(copy.deepcopy(ref), Recipe(**grid) if "gguf_type" in grid else fmt)
    convert(rtn)
    ids = heldout_ids(fixture_path(fixture), default_heldout(), eval_seqs, 128)
    return {**run, "eval_tokens": eval_seqs * 127, "rtn": compare_logits(ref, rtn, ids)}


def is_mix(name: str) -> bool:
    """A llama.cpp file type / mix (Q4_K_M, Q5_K_S, ...) rather than one gemmaquant format (q4_0, int4_g32_sym)."""
    from gemmaquant.formats import FORMATS

    return name.lower() not in FORMATS


def mix_bits(fixture: str, gguf_type: str) -> float:
    """Bits per weight of the quantized matrices under a llama.cpp mix on this fixture (its GGUF block sizes)."""
    from gemmaquant.export.gguf_pack import tensor_nbytes
    from gemmaquant.plan import make_plan
    from gemmaquant.recipe import Recipe

    plan = make_plan(_config(fixture), Recipe(gguf_type=gguf_type.upper()))
    sized = [(tensor_nbytes(p.fmt.type_name, tuple(p.shape)), math.prod(p.shape)) for p in plan.values() if p.fmt]
    return 8 * sum(b for b, _ in sized) / sum(n for _, n in sized)


@functools.cache
def _config(fixture: str):
    from gemmaquant.workflow import model_config

    return model_config(fixture)


def recipe_changes(run: dict) -> dict:
    """The QATRecipe fields (steps included) in which a saved run differs from today's default recipe."""
    import dataclasses

    from gemmaquant.qat.train import QATRecipe, for_model

    # batch 32 (session 19) and attention at 0.25x the rates (session 20) on the MoE fixture; the steps and rates a
    # 1000-step run resolves to (issue 29: left unset, they follow the amount of text)
    default = dataclasses.asdict(thousand_steps(for_model(QATRecipe(), _config(run["fixture"]))))
    ran = dict(default)
    if "recipe" in run:
        ran.update(run["recipe"])
        ran.update({k: run["recipe"].get(k, PAST_DEFAULTS[k]) for k in ADDED_FIELDS})
    else:
        ran.update(PAST_DEFAULTS)
    overrides = run.get("overrides") or {}
    ran.update(overrides)
    ran["steps"] = run["steps"]
    for k in ("batch_size", "attention_lr_scale", "lr", "scale_lr"):  # (a recipe as written, unresolved)
        if ran[k] is None:
            ran[k] = default[k]
    changes = {k: v for k, v in ran.items()  # (fields since removed count only where a run set them)
               if k not in NOT_RECIPE and (k in default or k in overrides) and v != default.get(k, object())}
    if not _has_router(run["fixture"]):  # the routing term and the expert rates do nothing there
        for k in MOE_ONLY:
            changes.pop(k, None)
    if not run.get("gptq_importance_params", False):  # QAT's start before session 14: GPTQ with absmax scales
        changes["gptq_params"] = "absmax"
    return changes


def thousand_steps(r):
    """The recipe as a 1000-step run resolves it: the steps, and the rates measured at that length."""
    import dataclasses

    from gemmaquant.qat.train import LR, SCALE_LR

    return dataclasses.replace(r, steps=r.steps or 1000, lr=LR if r.lr is None else r.lr,
                               scale_lr=SCALE_LR if r.scale_lr is None else r.scale_lr)


def _has_router(fixture: str) -> bool:
    return _config(fixture).enable_moe_block


def _default_text() -> str:
    import dataclasses

    from gemmaquant.qat.train import QATRecipe

    d = dataclasses.asdict(thousand_steps(QATRecipe()))
    shown = ("steps", "lr", "scale_lr", "router_weight", "expert_lr_scale", "average")
    return ", ".join(f"{k} {d[k]}" for k in shown) + "; GPTQ start with imatrix-style block parameters"


def _bits_text(run: dict) -> str:
    return f"{run['bits']:.2f} bpw" if is_mix(run["format"]) else str(run["bits"])


def _changes_text(changes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(changes.items())) or "default"


def _removed_text(run: dict) -> str:
    """The share of GPTQ's KL that QAT removed, with its 95% interval over the held-out windows where the run
    recorded one (runs since session 11). One decimal: the goal is half, and runs land within a point of it."""
    g, q = run["gptq"]["kl_mean"], run["qat"]["kl_mean"]
    text = f"{100 * (1 - q / g):.1f}%"
    ci = (run.get("gap_removed") or {}).get("ci95")
    return text + (f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})" if ci else "")


def table(runs: list[dict]) -> str:
    head = ("| fixture | bits (format) | recipe | float PPL | RTN KL | GPTQ KL | QAT KL | recovered vs RTN | vs GPTQ "
            "| top-1 GPTQ → QAT | PPL GPTQ → QAT | QAT s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in runs:
        g, q, rtn = r["gptq"], r["qat"], r["rtn"]["kl_mean"]
        rows.append(f"| {r['fixture']} | {_bits_text(r)} ({r['format']}) | {_changes_text(recipe_changes(r))} "
                    f"| {q['ppl_ref']:.2f} | {rtn:.4f} "
                    f"| {g['kl_mean']:.4f} | **{q['kl_mean']:.4f}** | {100 * (1 - q['kl_mean'] / rtn):.0f}% "
                    f"| {_removed_text(r)} "
                    f"| {100 * g['top1']:.1f}% → {100 * q['top1']:.1f}% | {g['ppl_test']:.2f} → {q['ppl_test']:.2f} "
                    f"| {r['seconds']:.0f} |")
    steps = sorted({r["steps"] for r in runs})
    toks = sorted({r["eval_tokens"] for r in runs})
    note = (f"\n\n\"recipe\": how the run differs from today's default recipe ({_default_text()}). "
            f"{', '.join(map(str, steps))} QAT steps of batch_size x 128 tokens "
            f"(by default 32 on tiny-moe, an MoE model, with its attention at 0.25x the rates, and 8 on the others at 1x; "
            f"\"batch_size=8\" or \"attention_lr_scale=1.0\" on a tiny-moe row: "
            f"the earlier default); KL(float ‖ quantized) per token, mean over "
            f"{', '.join(map(str, toks))} held-out predictions (\"vs GPTQ\" (a-b): the 95% confidence interval over "
            f"the held-out windows, a paired bootstrap, where the run recorded it); one CPU thread "
            f"({platform.processor() or platform.machine()}, torch {torch.__version__}). "
            f"Regenerate: `python benchmarks/bench_qat.py`.")
    return head + "\n" + "\n".join(rows) + note


def variants_table(variants: list[dict], runs: list[dict]) -> str:
    base = {(r["fixture"], r["format"]): r for r in runs}
    head = ("| fixture | format | recipe change | steps | GPTQ KL | QAT KL | gap recovered | table's run |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = []
    for v in variants:
        g, q, b = v["gptq"]["kl_mean"], v["qat"]["kl_mean"], base.get((v["fixture"], v["format"]))
        ref = f"{100 * (1 - b['qat']['kl_mean'] / b['gptq']['kl_mean']):.1f}%" if b else "-"
        changes = recipe_changes(v)
        changes.pop("steps", None)  # its own column
        change = _changes_text(changes)
        rows.append(f"| {v['fixture']} | {v['format']} | {change} | {v['steps']} | {g:.4f} | **{q:.4f}** "
                    f"| {_removed_text(v)} | {ref} |")
    return head + "\n" + "\n".join(rows)


def _replace_between(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        return text
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a] + "\n" + body + "\n" + text[b:]


def write_table(runs: list[dict], variants: list[dict] = ()) -> str:
    order = {f: i for i, f in enumerate(FIXTURES)}
    runs = sorted(runs, key=lambda r: (order.get(r["fixture"], 9), -r["bits"], r["format"]))
    md = table(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qat.json").write_text(json.dumps(runs, indent=2))
    variants = sorted(variants, key=lambda v: (order.get(v["fixture"], 9), -v["bits"], v["format"], v["steps"],
                                               _changes_text(recipe_changes(v))))
    vmd = variants_table(variants, runs) if variants else ""
    (RESULTS / "qat.md").write_text("# QAT vs PTQ on the trained fixtures\n\n" + md + "\n"
                                    + (f"\n## Recipe variations\n\n{vmd}\n" if vmd else ""))
    if DOC.is_file():
        text = _replace_between(DOC.read_text(), START, END, md)
        DOC.write_text(_replace_between(text, VSTART, VEND, vmd) if vmd else text)
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", nargs="+", default=list(FIXTURES))
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a QATRecipe field for a variant run (repeatable); needs --tag")
    ap.add_argument("--tag", help="name of the variant run")
    ap.add_argument("--format", help="train on this format instead of the bits' default (e.g. q4_0: llama.cpp's "
                    "Q4_0 grid; its RTN column is then llama.cpp's own Q4_0 rounding); saved as <fixture>-<format>")
    a = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    if overrides and not a.tag:
        ap.error("--set needs --tag (the variant's file name)")
    a.steps = int(overrides.pop("steps", a.steps))  # run_one's own argument (the table's steps column)
    overrides = overrides if a.tag else None  # None: the default recipe's run
    torch.set_num_threads(a.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        for fx in a.fixtures:
            # a named format is one grid: one run, labelled with its nominal bits (q4_0: 4), not one per --bits
            for bits in ([int(re.search(r"\d", a.format).group())] if a.format else a.bits):
                t = time.time()
                res = run_one(fx, bits, a.steps, a.eval_seqs, overrides, a.format)
                stem = f"{fx}-{a.format}" if a.format else f"{fx}-int{bits}"
                if overrides is not None:
                    VARIANTS.mkdir(parents=True, exist_ok=True)
                    (VARIANTS / f"{stem}-{a.tag}.json").write_text(json.dumps(res, indent=2))
                else:
                    (RUNS / f"{stem}.json").write_text(json.dumps(res, indent=2))
                print(f"{stem}: KL GPTQ {res['gptq']['kl_mean']:.5f} -> QAT {res['qat']['kl_mean']:.5f} "
                      f"({time.time() - t:.0f} s)", flush=True)
    runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    variants = [json.loads(p.read_text()) for p in sorted(VARIANTS.glob("*.json"))]
    print(write_table(runs, variants))


if __name__ == "__main__":
    main()
