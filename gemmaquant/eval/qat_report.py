"""The QAT report: qat-report.md and a self-contained qat-report.html beside qat-report.json (written by
`gemmaquant.qat.qat_train`), in the same form as the PTQ report (gemmaquant.eval.report): the held-out quality of
GPTQ and QAT against the float model, the share of GPTQ's KL that QAT removes, the training curve, the routing
of an MoE model, the recipe and the files."""

from __future__ import annotations

import os
from pathlib import Path

from gemmaquant.eval.report import HEADLINE, Section, _write, sections_html, sections_markdown


def _value(v) -> str:
    """A recipe value as text (never a Python repr of a list or dict)."""
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or "-"
    if isinstance(v, dict):
        return "; ".join(f"{k} {_value(x)}" for k, x in v.items()) or "-"
    if v is None:
        return "-"
    return str(v)


def quality_lines(rep: dict) -> list[str]:
    p, q = rep["ptq"], rep["qat"]
    lines = [HEADLINE, "",
             "| model | KL mean | KL p99 | KL max | top-1 agreement | perplexity | held-out tokens |",
             "|---|---|---|---|---|---|---|",
             f"| float | 0 | 0 | 0 | 100.00% | {q['ppl_ref']:.3f} | {q['tokens']} |"]
    lines += [f"| {label} | {m['kl_mean']:.5f} | {m['kl_p99']:.5f} | {m['kl_max']:.5f} | {100 * m['top1']:.2f}% | "
              f"{m['ppl_test']:.3f} | {m['tokens']} |" for label, m in (("GPTQ (start)", p), ("QAT", q))]
    if "gap_removed" in rep:
        g = rep["gap_removed"]
        lines += ["", f"QAT removes {100 * g['share']:.1f}% of GPTQ's KL divergence (95% interval "
                      f"{100 * g['ci95'][0]:.1f}% to {100 * g['ci95'][1]:.1f}% over {g['windows']} held-out windows)."]
    return lines


def routing_table(rep: dict) -> list[str]:
    rows = [(label, rep[k]) for label, k in (("GPTQ", "ptq"), ("QAT", "qat")) if rep.get(k, {}).get("routing")]
    if not rows:
        return []
    n = len(rows[0][1]["routing"]["flips"])
    lines = ["Share of held-out tokens each MoE layer sends to another set of experts than the float model does, "
             "and the share of the KL that is routing (gemmaquant.eval.routing).", "",
             "| model | " + " | ".join(f"layer {i}" for i in range(n)) + " | KL share of routing |",
             "|---|" + "---|" * (n + 1)]
    for label, m in rows:
        rt = m["routing"]
        lines.append(f"| {label} | " + " | ".join(f"{100 * f:.1f}%" for f in rt["flips"])
                     + f" | {100 * rt['routing_share']:.0f}% |")
    return lines


def qat_sections(rep: dict) -> list[Section]:
    from gemmaquant.eval import plots

    secs = [Section("", [f"# gemmaquant QAT report: {rep['model']}", "",
                         f"Quantization-aware training onto {rep['format']}: {rep['steps']} steps from GPTQ's "
                         f"weights, distilled from the float model ({rep.get('seconds', 0):.0f} s)."])]
    if "qat" in rep:
        secs.append(Section("Held-out quality against the float model", quality_lines(rep)))
    if rep.get("selection"):
        from gemmaquant.qat.heldout import selection_text

        secs.append(Section("Which state was exported", [x.strip() + "." for x in selection_text(rep["selection"])]))
    log = rep.get("log") or []
    secs.append(Section("Training", [f"Training KL (mean of the first and last {min(20, len(log))} steps): "
                                     f"{_value(rep.get('kl_head'))} -> {_value(rep.get('kl_tail'))}."],
                        plots.training_curve(log)))
    routing = routing_table(rep)
    if routing:
        secs.append(Section("Routing (MoE)", routing))
    recipe = rep.get("recipe") or {}
    secs.append(Section("Recipe", ["| setting | value |", "|---|---|",
                                   *(f"| {k} | {_value(v)} |" for k, v in recipe.items())]))
    files = dict(rep.get("files") or {})
    secs.append(Section("Files", ["| kind | path |", "|---|---|", *(f"| {k} | {v} |" for k, v in files.items())]))
    return secs


def save_qat_report(rep: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write qat-report.md and qat-report.html for `rep` (the dict qat_train writes to qat-report.json)."""
    out = Path(out)
    secs = qat_sections(rep)
    paths = {"md": out / "qat-report.md", "html": out / "qat-report.html"}
    _write(paths["md"], sections_markdown(secs))
    _write(paths["html"], sections_html(secs, f"gemmaquant QAT report: {rep['model']}"))
    return paths
