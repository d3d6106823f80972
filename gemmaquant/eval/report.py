"""The quantization report: report.json (machine-readable), report.md, and a self-contained report.html whose
plots are inline SVG drawn here (no JavaScript, no external files: it opens offline).

Plots: (a) size (bits per weight) against KL divergence for the variants compared, (b) per-layer weight error
(SQNR, dB) for each tensor kind, (c) expert coverage: calibration tokens routed to each expert of each layer, with
experts that needed forced routing outlined.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

HEADLINE = ("KL divergence to the float model and top-1 agreement are the headline figures: Gemma 4 checkpoints "
            "are instruction-tuned, so their perplexity on plain text says little about what quantization lost.")
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
    latency: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # kind -> {path, bytes, bits_per_weight (read from the file)}
    measured_on: str = ""  # the exported file the metrics were measured on (read back as a user loads it)

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        out = Path(out)
        paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
        _write(paths["json"], json.dumps(asdict(self), indent=2, default=str))
        _write(paths["md"], self.markdown())
        _write(paths["html"], self.html())
        return paths

    # ---- markdown ----
    def markdown(self) -> str:
        m = self.metrics
        r = self.recipe
        lines = [f"# gemmaquant report: {self.model}", "",
                 f"Recipe: {r.get('method')} onto {r.get('gguf_type') or r.get('weight_format')}, "
                 f"{r.get('n_samples')} x {r.get('seq_len')} calibration tokens "
                 f"(sha256 {self.calibration_sha256[:16]}...).",
                 "", HEADLINE, "",
                 "| KL mean | KL p99 | KL max | top-1 agreement | perplexity (float -> quantized) | held-out tokens |",
                 "|---|---|---|---|---|---|",
                 f"| {m['kl_mean']:.5f} | {m['kl_p99']:.5f} | {m['kl_max']:.5f} | {100 * m['top1']:.2f}% | "
                 f"{m['ppl_ref']:.3f} -> {m['ppl_test']:.3f} | {m['tokens']} |", ""]
        if self.measured_on:
            bits = next((f"; {v['bits_per_weight']:.3f} bits per weight" for v in self.files.values()
                         if v.get("path") == self.measured_on and "bits_per_weight" in v), "")
            lines += [f"Measured on {self.measured_on} (read back as a user loads it{bits}).", ""]
        if m.get("routing"):
            rt = m["routing"]
            lines += ["## Routing (MoE)", "", ROUTING_NOTE, "",
                      "| MoE layer | " + " | ".join(map(str, range(len(rt["flips"])))) + " |",
                      "|---|" + "---|" * len(rt["flips"]),
                      "| expert choices that differ | " + " | ".join(f"{100 * f:.1f}%" for f in rt["flips"]) + " |", "",
                      f"KL with the float model's routing: {rt['kl_ref_routing']:.5f} of {m['kl_mean']:.5f} "
                      f"({100 * rt['routing_share']:.0f}% of the KL is routing).", ""]
        if self.compared:
            lines += ["## Size against quality", "", "| variant | bits/weight | KL mean | top-1 |", "|---|---|---|---|"]
            lines += [f"| {c['label']} | {c['bits_per_weight']:.3f} | {c['kl_mean']:.5f} | {100 * c['top1']:.2f}% |"
                      for c in self.compared]
            lines.append("")
        lines += ["## Files", "", "| kind | path | size | bits/weight |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['path']} | {v['bytes'] / 2**20:.2f} MiB | "
                  + (f"{v['bits_per_weight']:.3f}" if "bits_per_weight" in v else "") + " |"
                  for k, v in self.files.items()]
        lines += ["", "Bits per weight: every tensor's bytes in the file (scales and float tensors included) x 8 "
                  "over its weights, as `gemmaquant inspect` reports it.", "",
                  "## Kept in float", "", "| tensors | reason |", "|---|---|"]
        reasons: dict[str, int] = {}
        for why in self.plan["float_tensors"].values():
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"| {n} | {why} |" for why, n in reasons.items()]
        lines += ["", "## Per-layer weight SQNR (dB)", "", "| layer | min | mean | worst tensor |", "|---|---|---|---|"]
        for info in self.layers:
            s = info["sqnr_db"]
            if s:
                worst = min(s, key=s.get)
                lines.append(f"| {info['layer']} | {s[worst]:.2f} | {sum(s.values()) / len(s):.2f} | {worst} |")
        if any(info.get("expert_tokens") for info in self.layers):
            lines += ["", "## Expert coverage (calibration tokens routed per expert)", ""]
            for info in self.layers:
                forced = info.get("forced_experts") or []
                per_expert = info.get("expert_sqnr_db") or {}
                worst = {k.split(".")[-1]: f"{min(v):.1f}" for k, v in per_expert.items() if v}
                lines.append(f"- layer {info['layer']}: {info['expert_tokens']}"
                             + (f"; forced routing for experts {forced}" if forced else "")
                             + (f"; worst expert SQNR dB {worst}" if worst else ""))
        if self.latency:
            lat = self.latency
            lines += ["", "## Latency (side by side, this machine)", "", "| model | prefill tok/s | decode tok/s |",
                      "|---|---|---|"]
            for k, v in lat.items():
                if isinstance(v, dict) and "prefill_tokens_per_s" in v:
                    lines.append(f"| {k} | {v['prefill_tokens_per_s']:.1f} | {v['decode_tokens_per_s']:.1f} |")
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()), ""]
        return "\n".join(lines)

    # ---- html ----
    def html(self) -> str:
        body = _md_to_html(self.markdown())
        plots = [("Size against KL divergence", svg_scatter(self.compared)),
                 ("Per-layer weight error (SQNR)", svg_sqnr(self.layers)),
                 ("Expert coverage", svg_heatmap(self.layers))]
        figs = "".join(f"<h2>{html.escape(t)}</h2>{s}" for t, s in plots if s)
        return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>gemmaquant report</title><style>"
                "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
                "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>" + figs + body + "</body></html>")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _md_to_html(md: str) -> str:
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


W, H, PAD = 640, 320, 48


def _axes(xlabel: str, ylabel: str) -> str:
    return (f"<line x1='{PAD}' y1='{H - PAD}' x2='{W - 10}' y2='{H - PAD}' stroke='black'/>"
            f"<line x1='{PAD}' y1='10' x2='{PAD}' y2='{H - PAD}' stroke='black'/>"
            f"<text x='{W / 2}' y='{H - 10}' text-anchor='middle' font-size='12'>{html.escape(xlabel)}</text>"
            f"<text x='12' y='{H / 2}' font-size='12' transform='rotate(-90 12 {H / 2})' "
            f"text-anchor='middle'>{html.escape(ylabel)}</text>")


def _scale(v, lo, hi, a, b):
    return a + (b - a) * (0.5 if hi == lo else (v - lo) / (hi - lo))


def svg_scatter(points: list) -> str:
    if not points:
        return ""
    xs = [p["bits_per_weight"] for p in points]
    ys = [math.log10(max(p["kl_mean"], 1e-8)) for p in points]
    marks = []
    for p, x, y in zip(points, xs, ys):
        cx, cy = _scale(x, min(xs), max(xs), PAD + 20, W - 60), _scale(y, min(ys), max(ys), H - PAD - 15, 20)
        marks.append(f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='5' fill='#c33'/><text x='{cx + 7:.1f}' y='{cy - 6:.1f}' "
                     f"font-size='11'>{html.escape(p['label'])} ({p['kl_mean']:.4f})</text>")
    return (f"<svg width='{W}' height='{H}' id='plot-size-kl'>"
            + _axes("bits per weight", "KL divergence (log10)") + "".join(marks) + "</svg>")


def svg_sqnr(layers: list) -> str:
    kinds = sorted({k.split(".")[-2] if k.count(".") else k for info in layers for k in info.get("sqnr_db", {})})
    if not kinds:
        return ""
    vals = [v for info in layers for v in info["sqnr_db"].values() if math.isfinite(v)]
    lo, hi = min(vals), max(vals)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    lines = []
    for j, kind in enumerate(kinds):
        pts = []
        for info in layers:
            v = [s for k, s in info["sqnr_db"].items() if (k.split(".")[-2] if k.count(".") else k) == kind]
            if v and math.isfinite(min(v)):
                x = _scale(info["layer"], 0, max(len(layers) - 1, 1), PAD + 10, W - 120)
                pts.append(f"{x:.1f},{_scale(min(v), lo, hi, H - PAD - 5, 15):.1f}")
        c = colors[j % len(colors)]
        lines.append(f"<polyline fill='none' stroke='{c}' points='{' '.join(pts)}'/>"
                     f"<text x='{W - 110}' y='{20 + 14 * j}' font-size='11' fill='{c}'>{html.escape(kind)}</text>")
    return (f"<svg width='{W}' height='{H}' id='plot-sqnr'>"
            + _axes("layer", f"SQNR dB ({lo:.1f} .. {hi:.1f})") + "".join(lines) + "</svg>")


def svg_heatmap(layers: list) -> str:
    rows = [info for info in layers if info.get("expert_tokens")]
    if not rows:
        return ""
    E = len(rows[0]["expert_tokens"])
    top = max(max(r["expert_tokens"]) for r in rows) or 1
    cw, ch = min(24, (W - PAD) / E), 20
    cells = []
    for i, r in enumerate(rows):
        for e, n in enumerate(r["expert_tokens"]):
            shade = int(255 - 200 * n / top)
            forced = e in (r.get("forced_experts") or [])
            cells.append(f"<rect x='{PAD + e * cw:.1f}' y='{10 + i * ch}' width='{cw:.1f}' height='{ch}' "
                         f"fill='rgb({shade},{shade},255)' stroke='{'red' if forced else 'white'}'>"
                         f"<title>layer {r['layer']} expert {e}: {n} tokens{' (forced)' if forced else ''}"
                         "</title></rect>")
        cells.append(f"<text x='4' y='{25 + i * ch}' font-size='11'>L{r['layer']}</text>")
    height = 20 + ch * len(rows)
    return (f"<svg width='{W}' height='{height}' id='plot-experts'>"
            + "".join(cells) + "</svg>")
