"""The HTML reports (PTQ report.html, QAT qat-report.html) read as a user expects: the title first, each plot in
its own section, axes with tick values, labels whole and inside the picture, a colour scale on the expert heat
map, no Python reprs; one file that opens offline and is the same bytes for the same report."""

import re
from html.parser import HTMLParser

import pytest

from gemmaquant.eval.qat_report import save_qat_report
from gemmaquant.eval.report import Report


class Page(HTMLParser):
    """Headings and plots in document order, and the text drawn inside each plot."""

    def __init__(self):
        super().__init__()
        self.order, self.plot_text, self.urls = [], {}, []
        self._svg, self._heading, self._depth = None, None, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and self._svg is None:
            self._svg, self._depth = a.get("id"), 0
            self.order.append(("svg", self._svg))
            self.plot_text[self._svg] = []
        if tag == "svg":
            self._depth += 1
        if tag in ("h1", "h2"):
            self._heading = tag
            self.order.append((tag, ""))
        for k, v in attrs:
            if k in ("src", "href", "xlink:href") and v and not v.startswith(("#", "data:")):
                self.urls.append(v)

    def handle_endtag(self, tag):
        if tag == "svg" and self._svg is not None:
            self._depth -= 1
            if self._depth == 0:
                self._svg = None
        if tag in ("h1", "h2"):
            self._heading = None

    def handle_data(self, data):
        if self._heading:
            kind, text = self.order[-1]
            self.order[-1] = (kind, text + data)
        elif self._svg is not None and data.strip():
            self.plot_text[self._svg].append(data.strip())


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    return p


def numbers(texts):
    return [t for t in texts if re.fullmatch(r"[-+]?\d+(\.\d+)?", t)]


def ptq_report():
    layers = [{"layer": i, "sqnr_db": {"self_attn.q_proj.weight": 20.0 + i, "mlp.up_proj.weight": 18.0,
                                       "experts.down_proj": 17.0 - i},
               "expert_tokens": [5, 0, 7, 30], "forced_experts": [1],
               "expert_sqnr_db": {"experts.gate_up_proj": [12.0, 11.5, 13.0, 14.0],
                                  "experts.down_proj": [10.0, 9.0, 9.5, 8.0]}} for i in range(3)]
    metrics = {"kl_mean": 0.01, "kl_p99": 0.1, "kl_max": 0.5, "top1": 0.9, "ppl_ref": 10.0, "ppl_test": 10.2,
               "tokens": 100}
    compared = [{"label": "gptq int4_g32_sym", "bits_per_weight": 4.5, "kl_mean": 0.01, "top1": 0.9},
                {"label": "rtn int8", "bits_per_weight": 8.5, "kl_mean": 0.00012, "top1": 0.99},
                {"label": "rtn int4_g32_sym", "bits_per_weight": 4.5, "kl_mean": 0.03, "top1": 0.85}]
    return Report(model="tiny-moe", recipe={"method": "gptq", "weight_format": "int4_g32_sym", "n_samples": 8,
                                            "seq_len": 64},
                  versions={"torch": "x"}, calibration_sha256="ab" * 32,
                  plan={"bits_per_weight": 4.5, "float_tensors": {"norm.weight": "norm"}}, metrics=metrics,
                  compared=compared, layers=layers, files={"gguf": {"path": "x.gguf", "bytes": 1000}})


def inside(svg: str):
    """(text, x, font px, anchor, width) for every horizontal label of a plot."""
    width = float(re.search(r'viewBox="0 0 ([\d.]+) ', svg).group(1))
    for m in re.finditer(r"<text style=\"([^\"]*)\" x=\"([-\d.]+)\"[^>]*rotate\(-?0 [^>]*>([^<]+)</text>", svg):
        px = float(re.search(r"font-size: ([\d.]+)px", m.group(1)).group(1))
        anchor = re.search(r"text-anchor: (\w+)", m.group(1))
        yield m.group(3), float(m.group(2)), px, anchor.group(1) if anchor else "start", width


def test_ptq_report_title_first_and_each_plot_in_its_section(tmp_path):
    page = parse(ptq_report().save(tmp_path)["html"].read_text())
    assert page.order[0] == ("h1", "gemmaquant report: tiny-moe")
    section = {}
    for (kind, text), nxt in zip(page.order, page.order[1:]):
        if nxt[0] == "svg":
            section[nxt[1]] = text
    assert section == {"plot-size-kl": "Size against quality", "plot-sqnr": "Per-layer weight SQNR (dB)",
                       "plot-experts": "Expert coverage (calibration tokens routed per expert)"}
    assert not page.urls  # nothing to fetch (the heat map is an inline data: image): opens offline


def test_ptq_plots_have_tick_values_whole_labels_and_a_colour_scale(tmp_path):
    text = ptq_report().save(tmp_path)["html"].read_text()
    page = parse(text)
    kl, sq, ex = (page.plot_text[k] for k in ("plot-size-kl", "plot-sqnr", "plot-experts"))
    assert "bits per weight" in kl and len(numbers(kl)) >= 3  # x ticks 4 .. 9 (y: log ticks as 10^k)
    assert {"rtn int8: KL 0.00012", "gptq int4_g32_sym: KL 0.01", "rtn int4_g32_sym: KL 0.03"} <= set(kl)  # whole
    assert {"layer", "0", "1", "2"} <= set(sq) and len(numbers(sq)) >= 6 and "experts.down_proj" in sq
    # the heat map: both axes named, expert and layer ticks, a colour bar with its unit and its own ticks
    assert {"expert", "layer", "calibration tokens", "forced routing"} <= set(ex)
    assert {"0", "10", "20", "30"} <= set(ex)
    for plot_id in page.plot_text:
        svg = text[text.index(f"<svg id='{plot_id}'"):]
        svg = svg[:svg.index("</svg>")]
        for label, x, px, anchor, width in inside(svg):
            # a conservative width (0.45 em a character): a label running off the picture fails
            w = 0.45 * px * len(label)
            left, right = {"start": (x, x + w), "middle": (x - w / 2, x + w / 2), "end": (x - w, x)}[anchor]
            assert 0 <= left and right <= width, f"{plot_id}: {label!r} cut off ({left:.0f}..{right:.0f} of {width})"


def test_ptq_report_has_no_python_reprs(tmp_path):
    paths = ptq_report().save(tmp_path)
    md = paths["md"].read_text()
    assert "| 0 | 5, 0, 7, 30 | 1 | gate_up_proj 11.5, down_proj 8.0 |" in md
    page_text = re.sub(r"<svg.*?</svg>", "", paths["html"].read_text(), flags=re.S)
    for text in (md, page_text):
        assert not re.search(r"[\[{]'|\[\d+, \d+", text), "a Python list or dict repr in the report"


def test_report_is_the_same_text_twice():
    assert ptq_report().html() == ptq_report().html()  # no dates, no random ids in the plots


def qat_rep(moe=True):
    m = {"kl_mean": 0.02, "kl_p99": 0.2, "kl_max": 0.9, "top1": 0.8, "ppl_ref": 40.0, "ppl_test": 41.0, "tokens": 128}
    q = {**m, "kl_mean": 0.01, "top1": 0.85, "ppl_test": 40.5}
    if moe:
        m["routing"] = {"flips": [0.05, 0.1], "kl_ref_routing": 0.01, "routing_share": 0.5}
        q["routing"] = {"flips": [0.03, 0.06], "kl_ref_routing": 0.006, "routing_share": 0.4}
    log = [{"step": s, "kl": 0.05 / (1 + s / 10), "loss": 0.05} for s in range(40)]
    return {"model": "tiny-moe", "format": "int4_g32_sym", "steps": 40, "seconds": 12.0, "kl_head": 0.04,
            "kl_tail": 0.01, "log": log, "ptq": m, "qat": q,
            "gap_removed": {"share": 0.5, "ci95": [0.4, 0.6], "windows": 2},
            "recipe": {"bits": 4, "lr": 1e-4, "gguf_type": None, "expert_lr_scale": [1.0, 2.0]},
            "files": {"gguf": "out/tiny-moe-Q4_0.gguf", "quantized": "out/quantized"}}


@pytest.mark.parametrize("moe", [True, False])
def test_qat_report_md_and_html(tmp_path, moe):
    paths = save_qat_report(qat_rep(moe), tmp_path)
    md, text = paths["md"].read_text(), paths["html"].read_text()
    page = parse(text)
    assert page.order[0] == ("h1", "gemmaquant QAT report: tiny-moe")
    assert [t for k, t in page.order if k == "svg"] == ["plot-training"]
    assert {"step", "KL divergence to the float model"} <= set(page.plot_text["plot-training"])
    assert "| QAT | 0.01000 |" in md and "QAT removes 50.0% of GPTQ's KL" in md
    assert "| expert_lr_scale | 1.0, 2.0 |" in md and "| gguf_type | - |" in md
    assert ("| QAT | 3.0% | 6.0% | 40% |" in md) == moe
    assert not re.search(r"[\[{]'|\[\d", re.sub(r"<svg.*?</svg>", "", text, flags=re.S))
