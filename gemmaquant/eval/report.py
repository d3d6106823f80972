"""The quantization report: report.json (machine-readable), report.md, and a self-contained report.html: the same
sections, each with its plot (matplotlib, inline SVG: no JavaScript, no external files, it opens offline).

Plots (gemmaquant.eval.plots): (a) size (bits per weight) against KL divergence for the variants compared, (b)
per-layer weight error (SQNR, dB) for each tensor kind, (c) expert coverage: calibration tokens routed to each
expert of each layer, with experts that needed forced routing outlined.

Timings (latency, seconds per layer) differ from run to run, so they sit apart: the `timings` key, last in
report.json, and the last section of report.md / report.html, headed TIMINGS_HEADING. The rest of a report is a
function of the model, recipe and calibration set: the same command writes it byte for byte again.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

HEADLINE = ("KL divergence to the float model and top-1 agreement are the headline figures: Gemma 4 checkpoints "
            "are instruction-tuned, so their perplexity on plain text says little about what quantization lost.")
TIMINGS_HEADING = "## Timings (this machine, this run)"
TIMINGS_NOTE = "Everything above this section is the same whenever the same command is run; the timings are not."
ROUTING_NOTE = ("Share of held-out tokens each MoE layer sends to another set of experts than the float model does "
                "(each model on its own residual stream), and the KL left when the quantized model is given the float "
                "model's expert choices and gate weights (gemmaquant.eval.routing).")


@dataclass
class Report:
    model: str
    recipe: dict
    versions: dict
    calibration_sha256: str
    plan: dict  # plan_summary: params by format, bits per weight, float tensors with reasons
    metrics: dict  # compare_logits of the exported model
    compared: list = field(default_factory=list)  # [{label, bits_per_weight, kl_mean, top1}]
    layers: list = field(default_factory=list)  # per-layer info: sqnr_db, expert_tokens, forced_experts
    files: dict = field(default_factory=dict)  # kind -> {path, bytes, bits_per_weight (read from the file)}
    measured_on: str = ""  # the exported file the metrics were measured on (read back as a user loads it)
    gguf_families: list = field(default_factory=list)  # export.sizes.gguf_families: type per tensor family, why
    timings: dict = field(default_factory=dict)  # {"latency": {model: measure_latency}, "layer_seconds": [...]}

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        out = Path(out)
        paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
        _write(paths["json"], json.dumps(asdict(self), indent=2, default=str))
        _write(paths["md"], self.markdown())
        _write(paths["html"], self.html())
        return paths

    # ---- sections: the markdown and the html are the same text; the html adds each section's plot ----
    def sections(self) -> list[Section]:
        from gemmaquant.eval import plots

        m, r = self.metrics, self.recipe
        out = [Section("", [
            f"# gemmaquant report: {self.model}", "",
            f"Recipe: {r.get('method')} onto "
            f"{'a per-tensor mix' if r.get('tensor_types') or r.get('ct_schemes') else r.get('gguf_type') or r.get('weight_format')}, "
            f"{r.get('n_samples')} x {r.get('seq_len')} calibration tokens "
            f"(sha256 {self.calibration_sha256[:16]}...).",
            "", HEADLINE, "",
            "| KL mean | KL p99 | KL max | top-1 agreement | perplexity (float -> quantized) | held-out tokens |",
            "|---|---|---|---|---|---|",
            f"| {m['kl_mean']:.5f} | {m['kl_p99']:.5f} | {m['kl_max']:.5f} | {100 * m['top1']:.2f}% | "
            f"{m['ppl_ref']:.3f} -> {m['ppl_test']:.3f} | {m['tokens']} |"])]
        if self.measured_on:
            bits = next((f"; {v['bits_per_weight']:.3f} bits per weight" for v in self.files.values()
                         if v.get("path") == self.measured_on and "bits_per_weight" in v), "")
            out[0].lines += ["", f"Measured on {self.measured_on} (read back as a user loads it{bits})."]
        if m.get("routing"):
            out.append(Section("Routing (MoE)", routing_lines(m)))
        if self.compared:
            out.append(Section("Size against quality", [
                "| variant | bits/weight | KL mean | top-1 |", "|---|---|---|---|",
                *(f"| {c['label']} | {c['bits_per_weight']:.3f} | {c['kl_mean']:.5f} | {100 * c['top1']:.2f}% |"
                  for c in self.compared)], plots.size_kl(self.compared)))
        if r.get("tensor_types"):
            out.append(Section("Per-tensor mix", mix_lines(r["tensor_types"])))
        if r.get("ct_schemes"):
            out.append(Section("Per-layer mix (compressed-tensors)", mix_lines(r["ct_schemes"], "ct_schemes")))
        reasons: dict[str, int] = {}
        for why in self.plan["float_tensors"].values():
            reasons[why] = reasons.get(why, 0) + 1
        out += [Section("Files", ["| kind | path | size | bits/weight |", "|---|---|---|---|",
                                  *(f"| {k} | {v['path']} | {v['bytes'] / 2**20:.2f} MiB | "
                                    + (f"{v['bits_per_weight']:.3f}" if "bits_per_weight" in v else "") + " |"
                                    for k, v in self.files.items()),
                                  "", "Bits per weight: every tensor's bytes in the file (scales and float tensors "
                                  "included) x 8 over its weights, as `gemmaquant inspect` reports it."]),
                *([Section("GGUF types per tensor family", [
                    "| family | layers | type | bits/weight | share of the file | why (where not the default) |",
                    "|---|---|---|---|---|---|",
                    *(f"| {f['family']} | {f['layers']} | {f['type']} | {f['bits_per_weight']:.2f} | "
                      f"{100 * f['share']:.2f}% | {f['why']} |" for f in self.gguf_families)])]
                  if self.gguf_families else []),
                Section("Kept in float", ["| tensors | reason |", "|---|---|",
                                          *(f"| {n} | {why} |" for why, n in reasons.items())])]
        if any(info.get("lattice") for info in self.layers):
            out.append(Section("QAT lattice (read back, not rounded again)", lattice_lines(self.layers)))
        sq = ["| layer | min | mean | worst tensor |", "|---|---|---|---|"]
        for info in self.layers:
            s = info["sqnr_db"]
            if s:
                worst = min(s, key=s.get)
                sq.append(f"| {info['layer']} | {s[worst]:.2f} | {sum(s.values()) / len(s):.2f} | {worst} |")
        out.append(Section("Per-layer weight SQNR (dB)", sq, plots.sqnr(self.layers)))
        if any(info.get("expert_tokens") for info in self.layers):
            out.append(Section("Expert coverage (calibration tokens routed per expert)", expert_lines(self.layers),
                               plots.expert_heatmap(self.layers)))
        out.append(Section("", ["Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items())]))
        lat = [f"| {k} | {v['prefill_tokens_per_s']:.1f} | {v['decode_tokens_per_s']:.1f} |"
               for k, v in (self.timings.get("latency") or {}).items()
               if isinstance(v, dict) and "prefill_tokens_per_s" in v]
        secs = [s for s in self.timings.get("layer_seconds") or [] if s is not None]
        lines = [TIMINGS_NOTE, ""]
        if lat:
            lines += ["Latency, side by side:", "", "| model | prefill tok/s | decode tok/s |", "|---|---|---|", *lat, ""]
        if secs:
            lines.append(f"Quantization: {sum(secs):.1f} s over {len(secs)} layers (slowest {max(secs):.1f} s).")
        if lat or secs:  # last: everything before it is the same whenever the same command runs
            out.append(Section(TIMINGS_HEADING.removeprefix("## "), lines))
        return out

    def markdown(self) -> str:
        return sections_markdown(self.sections())

    def html(self) -> str:
        return sections_html(self.sections(), f"gemmaquant report: {self.model}")


@dataclass
class Section:
    """One part of a report: a title ("" for none), its markdown lines, and the plot drawn for it (inline SVG)."""

    title: str
    lines: list[str]
    plot: str = ""


def mix_lines(tensor_types: dict, key: str = "tensor_types") -> list[str]:
    """The GGUF type (or compressed-tensors scheme, key "ct_schemes") of every tensor of a per-tensor mix
    (`--target-bpw`, `--gguf-mix`, `--ct-mix`), by tensor family."""
    from gemmaquant.target_mix import family

    fams: dict[str, dict[str, list[str]]] = {}
    for name, t in sorted(tensor_types.items()):
        layer = name.split(".")[1] if name.startswith("layers.") else "-"
        fams.setdefault(family(name), {}).setdefault(t, []).append(layer)
    what = "compressed-tensors scheme" if key == "ct_schemes" else "GGUF type"
    return [f"Each tensor's {what}, chosen per tensor (the full list: report.json, recipe.{key}).", "",
            "| tensor family | type (layers) |", "|---|---|",
            *(f"| {fam} | " + "; ".join(f"{t} ({', '.join(ls)})" if ls != ["-"] else t for t, ls in types.items())
              + " |" for fam, types in fams.items())]


def routing_lines(m: dict) -> list[str]:
    """The routing table of compare_logits' metrics `m` (MoE: expert choices that flip, their share of the KL)."""
    rt = m["routing"]
    return [ROUTING_NOTE, "",
            "| MoE layer | " + " | ".join(map(str, range(len(rt["flips"])))) + " |",
            "|---|" + "---|" * len(rt["flips"]),
            "| expert choices that differ | " + " | ".join(f"{100 * f:.1f}%" for f in rt["flips"]) + " |", "",
            f"KL with the float model's routing: {rt['kl_ref_routing']:.5f} of {m['kl_mean']:.5f} "
            f"({100 * rt['routing_share']:.0f}% of the KL is routing)."]


def expert_lines(layers: list[dict]) -> list[str]:
    lines = ["| layer | tokens per expert | forced routing | worst expert SQNR (dB) |", "|---|---|---|---|"]
    for info in layers:
        if not info.get("expert_tokens"):
            continue
        forced = ", ".join(map(str, info.get("forced_experts") or [])) or "none"
        worst = ", ".join(f"{k.split('.')[-1]} {min(v):.1f}" for k, v in (info.get("expert_sqnr_db") or {}).items()
                          if v)
        lines.append(f"| {info['layer']} | {', '.join(map(str, info['expert_tokens']))} | {forced} | {worst or '-'} |")
    return lines


def lattice_lines(layers: list[dict]) -> list[str]:
    """The QAT checkpoint's record (gemmaquant.qat_checkpoint): totals, then every tensor with groups off the
    lattice and what re-rounded them."""
    from gemmaquant.qat_checkpoint import lattice_summary

    s = lattice_summary(layers)
    lines = [f"{s['recovered']} of {s['groups']} groups of 32 ({100 * s['share']:.2f}%) keep the checkpoint's own "
             f"step and codes: the exports give those weights back bit for bit (Q4_0 in fp32 to the checkpoint's bf16 "
             f"rounding). Steps fp16 cannot hold (Q4_0's d): {s['fp16_inexact']}"
             + (f", max error {s['fp16_max_error']:.3g}." if s["fp16_inexact"] else ".")]
    if s["rerounded"]:
        lines += ["", "| tensor | groups off the lattice | re-rounded by |", "|---|---|---|",
                  *(f"| {n} | {r['groups']} | {r['by']} |" for n, r in s["rerounded"].items())]
    else:
        lines += ["", "No group was re-rounded."]
    return lines


def sections_markdown(sections: list[Section]) -> str:
    lines = []
    for sec in sections:
        lines += ([f"## {sec.title}", ""] if sec.title else []) + sec.lines + [""]
    return "\n".join(lines)


CSS = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.4}"
       "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
       "th{background:#f3f3f3}svg{max-width:100%;height:auto;display:block;margin:0.5em 0}")


def sections_html(sections: list[Section], title: str) -> str:
    """One self-contained page: each section's title, its plot, then its text and tables."""
    parts = []
    for sec in sections:
        if sec.title:
            parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts.append(sec.plot)
        parts.append(md_to_html(sec.lines))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(p for p in parts if p) + "\n</body></html>\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def md_to_html(lines: list[str]) -> str:
    """The little markdown the reports write: headings, paragraphs, `- ` lists and pipe tables (first row: header)."""
    out: list[str] = []
    block = None  # "table" | "ul" | None

    def close():
        nonlocal block
        if block:
            out.append(f"</{block}>")
        block = None

    for line in lines:
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            tag = "td"
            if block != "table":
                close()
                out.append("<table>")
                block, tag = "table", "th"
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("- "):
            if block != "ul":
                close()
                out.append("<ul>")
                block = "ul"
            out.append(f"<li>{html.escape(line[2:])}</li>")
        else:
            close()
            if line.startswith("#"):
                level = len(line) - len(line.lstrip("#"))
                out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
            elif line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
    close()
    return "\n".join(out)
