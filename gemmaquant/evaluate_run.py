"""After a quantization: evaluate the exported file against the float model and write the report.

The model evaluated is the one read back from the exported file (GGUF when written, else compressed-tensors), so
the figures describe what a user downloads. Beside it, round-to-nearest int8 and int4 of the same float model are
measured as reference points for the size-against-KL plot.

Two resumable steps (gemmaquant.resume): "evaluate" writes its figures to `work/eval.json`, "report" renders the
report files from that file, so a report redone after an interruption has the same figures, timings included.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
from pathlib import Path

import torch

from gemmaquant.progress import stage
from gemmaquant.quantized import read_record, write_json_atomic

REPORT_FILES = ("report.json", "report.md", "report.html")
EVAL_FILE = "eval.json"
MAX_EVAL_PARAMS = 2_000_000_000  # larger models: evaluate separately with `gemmaquant eval` on a big machine


def _versions() -> dict:
    out = {}
    for pkg in ("gemmaquant", "torch", "transformers", "gguf", "safetensors", "compressed-tensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@torch.no_grad()
def rtn_copy(model, plan: dict, fmt) -> torch.nn.Module:
    """The float model with every planned matrix replaced by its RTN-dequantized value on `fmt`."""
    q = copy.deepcopy(model)
    params = dict(q.named_parameters())
    for name, p in plan.items():
        if p.fmt is None or name not in params:
            continue
        t = params[name]
        ws = t if t.ndim == 3 else t[None]
        t.copy_(torch.stack([fmt.dequantize(fmt.quantize(w.float())) for w in ws]).view_as(t))
    return q


def evaluate_and_report(model, result, recipe, files: dict, out: Path, progress=None, n_seq: int = 16,
                        seq_len: int = 128, steps=None) -> dict:
    """Evaluate the exported file and write the report into `out`. With `steps` (gemmaquant.resume.Steps) each of
    the two steps is skipped when its record is complete, and recorded when done."""
    from gemmaquant.plan import plan_summary

    summary = plan_summary(result.plan)
    if summary["total_params"] > MAX_EVAL_PARAMS:
        return {"skipped": f"model has {summary['total_params'] / 1e9:.1f}B parameters; run `gemmaquant eval`",
                "files": {}, "metrics": None}
    out = Path(out)
    eval_file = Path(result.work_dir) / EVAL_FILE
    tested = files.get("gguf") or files["safetensors"]
    key = {"model": str(model), "tested": Path(tested).name, "n_seq": n_seq, "seq_len": seq_len,
           "files": steps.sha256("gguf" if "gguf" in files else "safetensors") if steps else None}
    if steps is None or not steps.complete("evaluate", key):
        write_json_atomic(evaluate(model, result, recipe, tested, n_seq, seq_len, progress), eval_file)
        if steps is not None:
            steps.record("evaluate", key, [str(eval_file.relative_to(out))])
    figures = read_record(eval_file, {})  # read back either way: the report is rendered from the file
    key = {"evaluation": steps.sha256("evaluate") if steps else None,
           "files": {k: steps.sha256(k) for k in files} if steps else None}
    paths = {k: out / f"report.{k}" for k in ("json", "md", "html")}
    if steps is None or not steps.complete("report", key):
        paths = write_report(model, result, recipe, files, out, figures)
        if steps is not None:
            steps.record("report", key, list(REPORT_FILES))
    return {"metrics": figures["metrics"], "compared": figures["compared"], "measured_on": tested,
            "files": {k: str(v) for k, v in paths.items()}}


def evaluate(model, result, recipe, tested: str, n_seq: int = 16, seq_len: int = 128, progress=None) -> dict:
    """KL etc. of the exported file `tested` against the float model, RTN reference points, latency."""
    import gemmaquant
    from gemmaquant.eval.latency import measure_latency
    from gemmaquant.eval.metrics import compare_logits, heldout_ids
    from gemmaquant.export.inspect import file_bits
    from gemmaquant.formats import get_format
    from gemmaquant.hub import resolve
    from gemmaquant.workflow import default_heldout

    kind = "gguf" if str(tested).endswith(".gguf") else "safetensors"
    stage(f"evaluating {tested} against the float model ({n_seq} x {seq_len} held-out tokens)", progress)
    ref = gemmaquant.load(model)
    test = gemmaquant.load(tested)
    ids = heldout_ids(resolve(model), default_heldout(), n_seq, seq_len)
    metrics = compare_logits(ref, test, ids, routing=True)  # MoE: expert choices that flip, and their share of the KL
    label = f"{recipe.method} {'per-layer mix' if recipe.ct_schemes else recipe.gguf_type or recipe.weight_format}"
    compared = [{"label": label, "file": tested, "bits_per_weight": file_bits(tested)["bits_per_weight"], **metrics}]
    for name in ("int8", "int4_g32_sym"):
        stage(f"comparison: round-to-nearest {name} of the float model", progress)
        fmt = get_format(name)
        plan = {n: type(p)(p.name, p.shape, fmt if p.fmt is not None else None, p.reason)
                for n, p in result.plan.items()}
        m = compare_logits(ref, rtn_copy(ref, plan, fmt), ids)
        compared.append({"label": f"rtn {name}", "bits_per_weight": _bits(kind, ref.config, plan, name), **m})
    stage("latency of the float and the quantized model on this machine", progress)
    latency = {"float": measure_latency(ref, prompt_len=64, new_tokens=16),
               "quantized": measure_latency(test, prompt_len=64, new_tokens=16)}
    return {"metrics": metrics, "compared": compared, "latency": latency}


def write_report(model, result, recipe, files: dict, out: Path, figures: dict) -> dict[str, Path]:
    """report.json / .md / .html from the evaluation's `figures`. Everything but the `timings` section (latency,
    seconds per layer) is a function of the inputs, so the same command gives the same report apart from it."""
    from gemmaquant.eval.report import Report
    from gemmaquant.plan import plan_summary

    from gemmaquant.export.inspect import file_bits

    file_info = {k: {"path": v, "bytes": _size(Path(v)), "bits_per_weight": file_bits(v)["bits_per_weight"]}
                 for k, v in files.items()}
    layers = [{k: v for k, v in info.items() if k != "seconds"} for info in result.layers]
    timings = {"latency": figures["latency"], "layer_seconds": [info.get("seconds") for info in result.layers]}
    families = []
    if "gguf" in files:
        from gemmaquant.export.sizes import gguf_size
        from gemmaquant.workflow import model_config

        families = gguf_size(model_config(model), result.plan, recipe)["families"]
    rep = Report(model=str(model), recipe=recipe.to_dict(), versions=_versions(),
                 calibration_sha256=result.calibration_sha256, plan=plan_summary(result.plan),
                 metrics=figures["metrics"], compared=figures["compared"], layers=layers, files=file_info,
                 timings=timings, measured_on=files.get("gguf") or files["safetensors"], gguf_families=families)
    return rep.save(out)


def _bits(kind: str, cfg, plan: dict, weight_format: str) -> float:
    """Bits per weight of the file of `kind` that `plan` (every matrix on `weight_format`) would export to."""
    from gemmaquant.export.sizes import gguf_size, safetensors_size
    from gemmaquant.recipe import Recipe

    if kind == "gguf":
        return gguf_size(cfg, plan, Recipe(weight_format=weight_format))["bits_per_weight"]
    return safetensors_size(plan)["bits_per_weight"]


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
