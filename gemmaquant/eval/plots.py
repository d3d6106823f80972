"""The reports' plots, drawn with matplotlib and returned as inline SVG, so that report.html stays one file that
opens offline.

matplotlib's object API (`Figure`, no pyplot): no global backend is chosen or changed, no window ever opens, and
the figures are freed when the function returns. Text stays text (`svg.fonttype: none`), ids are salted with a
fixed string and the date left out, so the same report gives the same bytes.

    size_kl(compared)        bits per weight against KL divergence (log scale), one labelled point per variant
    sqnr(layers)             weight SQNR (dB) per layer, one line per tensor kind (the worst tensor of that kind)
    expert_heatmap(layers)   calibration tokens routed to each expert of each MoE layer, forced routing outlined
    training_curve(log)      QAT: KL to the float model per step, with its moving mean
"""

from __future__ import annotations

import io
import math
import re

RC = {"svg.fonttype": "none", "svg.hashsalt": "gemmaquant", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}


def _figure(width: float = 6.4, height: float = 3.4):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_svg(fig, plot_id: str) -> str:
    """The figure as an <svg> element (XML prolog and DOCTYPE dropped) with id=`plot_id`."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight", pad_inches=0.1)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # matplotlib numbers its ids per figure (figure_1, axes_1, ...): prefix them, so that several plots in one
    # page keep unique ids and each reference (url(#..), xlink:href="#..") finds its own plot's definition
    text = re.sub(r'\bid="([^"]+)"', rf'id="{plot_id}-\1"', text)
    text = re.sub(r'url\(#([^)]+)\)', rf"url(#{plot_id}-\1)", text)
    text = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{plot_id}-\1"', text)
    return re.sub(r"^<svg ", f"<svg id='{plot_id}' role='img' ", text, count=1)


def size_kl(points: list[dict]) -> str:
    """[{label, bits_per_weight, kl_mean}] -> scatter, KL on a log axis; the first point (the exported model)
    in red, the others (references) in grey."""
    points = [p for p in points if p.get("kl_mean") is not None and p.get("bits_per_weight") is not None]
    if not points:
        return ""
    with _rc():
        fig = _figure()
        ax = fig.add_subplot()
        for j, p in enumerate(points):
            kl = max(p["kl_mean"], 1e-8)
            ax.scatter([p["bits_per_weight"]], [kl], s=36, color="#c0392b" if j == 0 else "#7f8c8d", zorder=3,
                       label=("this model" if j == 0 else "references") if j < 2 else None)
            # points of one size (GPTQ and RTN at 4 bits): the highest labelled above, the lowest below, so the
            # labels never overlap
            same = sorted((q["kl_mean"] for q in points if abs(q["bits_per_weight"] - p["bits_per_weight"]) < 1e-9),
                          reverse=True)
            rank = same.index(p["kl_mean"])
            dy, va = ((4, "bottom") if rank == 0 else (-4, "top") if rank == len(same) - 1 else (0, "center")) \
                if len(same) > 1 else (0, "center")
            ax.annotate(f"{p['label']}: KL {p['kl_mean']:.4g}", (p["bits_per_weight"], kl), xytext=(7, dy),
                        textcoords="offset points", fontsize=8, va=va)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("KL divergence to the float model (mean)")
        xs = [p["bits_per_weight"] for p in points]
        span = (max(xs) - min(xs)) or 1.0
        ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.6 * span)  # room on the right for the labels
        ax.margins(y=0.35)
        ax.legend(fontsize=8, loc="best")
        return to_svg(fig, "plot-size-kl")


def tensor_kind(name: str) -> str:
    """`self_attn.q_proj.weight` -> `self_attn.q_proj`; `experts.down_proj` stays (apart from `mlp.down_proj`)."""
    return name.removesuffix(".weight")


def sqnr(layers: list[dict]) -> str:
    """Per-layer weight SQNR: for each tensor kind, its value in every layer that has it."""
    kinds = sorted({tensor_kind(k) for info in layers for k in (info.get("sqnr_db") or {})})
    if not kinds:
        return ""
    with _rc():
        fig = _figure(7.2, 3.6)
        ax = fig.add_subplot()
        for kind in kinds:
            xs, ys = [], []
            for info in layers:
                v = [s for k, s in (info.get("sqnr_db") or {}).items() if tensor_kind(k) == kind and math.isfinite(s)]
                if v:
                    xs.append(info["layer"])
                    ys.append(min(v))
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=kind)
        ax.set_xlabel("layer")
        ax.set_ylabel("weight SQNR (dB, higher is better)")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        return to_svg(fig, "plot-sqnr")


def expert_heatmap(layers: list[dict]) -> str:
    """Tokens routed to each expert (columns) of each MoE layer (rows), colour bar in tokens; experts whose
    statistics needed forced routing outlined in red."""
    rows = [info for info in layers if info.get("expert_tokens")]
    if not rows:
        return ""
    import numpy as np
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    counts = np.array([r["expert_tokens"] for r in rows], dtype=float)  # [moe layers, experts]
    E = counts.shape[1]
    with _rc():
        fig = _figure(7.2, 1.2 + 0.28 * len(rows))
        ax = fig.add_subplot()
        img = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0,
                        extent=(-0.5, E - 0.5, len(rows) - 0.5, -0.5))
        forced = 0
        for i, r in enumerate(rows):
            for e in r.get("forced_experts") or []:
                ax.add_patch(Rectangle((e - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
                forced += 1
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.grid(False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ticks = list(range(len(rows)))
        if len(rows) > 16:
            ticks = ticks[::math.ceil(len(rows) / 16)]
        ax.set_yticks(ticks, [str(rows[i]["layer"]) for i in ticks])
        fig.colorbar(img, ax=ax, label="calibration tokens", pad=0.01, aspect=max(20, 3 * len(rows)))  # a thin bar
        if forced:
            ax.legend(handles=[Patch(fill=False, edgecolor="red", label="forced routing")],
                      loc="upper left", bbox_to_anchor=(0, -0.25 if len(rows) < 6 else -0.1), fontsize=8,
                      frameon=False)
        return to_svg(fig, "plot-experts")


def training_curve(log: list[dict], window: int = 20) -> str:
    """QAT: the training batches' KL to the float model per step, and its mean over `window` steps."""
    steps = [e["step"] for e in log if "kl" in e]
    kl = [e["kl"] for e in log if "kl" in e]
    if not steps:
        return ""
    with _rc():
        fig = _figure()
        ax = fig.add_subplot()
        ax.plot(steps, kl, color="#95a5a6", linewidth=0.8, label="KL of the step's batch")
        if len(kl) >= window:
            mean = [sum(kl[i - window + 1:i + 1]) / window for i in range(window - 1, len(kl))]
            ax.plot(steps[window - 1:], mean, color="#c0392b", linewidth=1.6, label=f"mean of {window} steps")
        ax.set_xlabel("step")
        ax.set_ylabel("KL divergence to the float model")
        ax.set_yscale("log")
        ax.legend(fontsize=8, frameon=False)
        return to_svg(fig, "plot-training")


def _rc():
    import matplotlib

    return matplotlib.rc_context(RC)
