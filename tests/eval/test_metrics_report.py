"""Evaluation metrics against direct fp64 computations, and the report files (offline HTML with three plots)."""

import copy
import json
from html.parser import HTMLParser

import pytest
import torch

from gemmaquant.calibration import CalibrationError
from gemmaquant.config import TINY_VARIANTS
from gemmaquant.eval.metrics import compare_logits, heldout_ids, perplexity, share_removed
from gemmaquant.eval.report import Report
from gemmaquant.fixtures import TOKENIZER_DIR
from gemmaquant.model.testing import random_model

CFG = TINY_VARIANTS["tiny-26b-a4b"]


def ids(n=3, T=12):
    return torch.randint(0, CFG.vocab_size, (n, T), generator=torch.Generator().manual_seed(0))


def test_model_against_itself():
    m = random_model(CFG)
    r = compare_logits(m, m, ids())
    assert r["kl_mean"] == 0 and r["kl_max"] == 0 and r["top1"] == 1.0


def test_kl_and_perplexity_match_direct_computation():
    m = random_model(CFG)
    p = copy.deepcopy(m)
    with torch.no_grad():
        p.norm.weight.mul_(3.0)
        p.layers[0].mlp.up_proj.weight.add_(0.1 * torch.randn_like(p.layers[0].mlp.up_proj.weight))
    x = ids()
    r = compare_logits(m, p, x, batch_size=3, windows=True)
    with torch.no_grad():
        lr, lt = torch.log_softmax(m(x).double(), -1)[:, :-1], torch.log_softmax(p(x).double(), -1)[:, :-1]
    kl = (lr.exp() * (lr - lt)).sum(-1)
    assert torch.allclose(torch.tensor(r["kl_windows"], dtype=torch.float64), kl.mean(-1), rtol=1e-9, atol=0)
    assert "kl_windows" not in compare_logits(m, p, x)
    # in batches of 2 the windows keep their order (fp32 logits of another batch shape differ by ~1e-7)
    split = compare_logits(m, p, x, batch_size=2, windows=True)["kl_windows"]
    assert torch.allclose(torch.tensor(split, dtype=torch.float64), kl.mean(-1), rtol=1e-5, atol=0)
    assert r["kl_mean"] > 1e-3
    assert abs(r["kl_mean"] - kl.mean().item()) < 1e-9 * kl.mean().item()
    assert abs(r["kl_max"] - kl.max().item()) < 1e-9 * kl.max().item()
    nll = -lr.gather(-1, x[:, 1:, None]).mean().item()
    assert abs(perplexity(m, x) - torch.exp(torch.tensor(nll)).item()) < 1e-6 * perplexity(m, x)


def test_share_removed_and_its_paired_bootstrap_interval():
    g = torch.Generator().manual_seed(1)
    base = (0.01 + 0.02 * torch.rand(200, generator=g, dtype=torch.float64))
    new = base * (0.5 + 0.1 * torch.randn(200, generator=g, dtype=torch.float64))  # about half removed, noisily
    r = share_removed(base.tolist(), new.tolist())
    assert r["share"] == pytest.approx(1 - (new.mean() / base.mean()).item(), abs=1e-12) and r["windows"] == 200
    lo, hi = r["ci95"]
    assert lo < r["share"] < hi and 0.4 < lo and hi < 0.6
    # the interval narrows as windows are added (about as 1/sqrt(n)); the same seed gives the same interval
    few = share_removed(base[:50].tolist(), new[:50].tolist())
    assert few["ci95"][1] - few["ci95"][0] > 1.5 * (hi - lo)
    assert share_removed(base.tolist(), new.tolist()) == r
    # a model that removes the same share from every window: a point, not an interval
    same = share_removed(base.tolist(), (0.3 * base).tolist())
    assert same["share"] == pytest.approx(0.7) and same["ci95"] == pytest.approx([0.7, 0.7])
    with pytest.raises(ValueError, match="same"):
        share_removed([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="nothing to remove"):
        share_removed([0.0, 0.0], [0.1, 0.1])


def test_short_heldout_text_raises(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("two words")
    with pytest.raises(CalibrationError, match="too short"):
        heldout_ids(TOKENIZER_DIR, f, 4, 64)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.svgs, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "svg":
            self.svgs.append(dict(attrs).get("id"))
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.urls.append(v)


def test_report_files(tmp_path):
    layers = [{"layer": i, "sqnr_db": {"self_attn.q_proj.weight": 20.0 + i, "mlp.up_proj.weight": 18.0},
               "expert_tokens": [5, 0, 7], "forced_experts": [1]} for i in range(3)]
    metrics = {"kl_mean": 0.01, "kl_p99": 0.1, "kl_max": 0.5, "top1": 0.9, "ppl_ref": 10.0, "ppl_test": 10.2,
               "tokens": 100}
    rep = Report(model="m", recipe={"method": "gptq", "weight_format": "int4_g32_sym"}, versions={"torch": "x"},
                 calibration_sha256="ab" * 32, plan={"bits_per_weight": 4.5, "float_tensors": {"norm.weight": "norm"}},
                 metrics=metrics, compared=[{"label": "a", "bits_per_weight": 4.5, "kl_mean": 0.01, "top1": 0.9},
                                            {"label": "b", "bits_per_weight": 8.5, "kl_mean": 0.001, "top1": 0.99}],
                 layers=layers, files={"gguf": {"path": "x.gguf", "bytes": 1000}})
    paths = rep.save(tmp_path)
    assert json.loads(paths["json"].read_text())["metrics"]["kl_mean"] == 0.01
    c = _Collect()
    c.feed(paths["html"].read_text())
    assert c.svgs == ["plot-size-kl", "plot-sqnr", "plot-experts"]
    assert not c.urls  # nothing to fetch: opens offline
    assert "| 0.01000 |" in paths["md"].read_text()


def test_report_timings_stand_apart(tmp_path):
    """The same command writes the same report apart from its timings, which come last: the `timings` key of
    report.json and the section under TIMINGS_HEADING in report.md / report.html."""
    from gemmaquant.eval.report import TIMINGS_HEADING

    metrics = {"kl_mean": 0.01, "kl_p99": 0.1, "kl_max": 0.5, "top1": 0.9, "ppl_ref": 10.0, "ppl_test": 10.2,
               "tokens": 100}
    saved = []
    for k, speed in enumerate((100.0, 250.0)):
        rep = Report(model="m", recipe={"method": "rtn"}, versions={}, calibration_sha256="ab" * 32,
                     plan={"bits_per_weight": 4.5, "float_tensors": {}}, metrics=metrics,
                     layers=[{"layer": 0, "sqnr_db": {"w": 20.0}}],
                     timings={"latency": {"float": {"prefill_tokens_per_s": speed, "decode_tokens_per_s": speed}},
                              "layer_seconds": [speed / 100]})
        (tmp_path / str(k)).mkdir()
        saved.append(rep.save(tmp_path / str(k)))
    a, b = (json.loads(p["json"].read_text()) for p in saved)
    assert list(a)[-1] == "timings" and a != b and {**a, "timings": None} == {**b, "timings": None}
    for kind, head in (("md", TIMINGS_HEADING), ("html", f"<h2>{TIMINGS_HEADING.lstrip('# ')}</h2>")):
        a, b = (p[kind].read_text() for p in saved)
        assert a != b and a.split(head)[0] == b.split(head)[0] and a.count(head) == 1, kind
        assert "250.0" in b.split(head)[1] and "250.0" not in b.split(head)[0]
