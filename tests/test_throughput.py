"""The dry-run time estimate comes from throughput measured on the run's device (gemmaquant.throughput): it scales
with what was measured (injected measurements, no timing asserted), says its basis, and the probes' results are
cached and reused."""

import json

import pytest
import torch
from typer.testing import CliRunner

import gemmaquant.throughput as tp
from gemmaquant.cli import app
from gemmaquant.config import get_variant
from gemmaquant.estimate import estimate
from gemmaquant.plan import make_plan
from gemmaquant.recipe import Recipe
from gemmaquant.throughput import PROBE_K, Throughput, gptq_key


def _rates(cfg, plan, a, c, b):
    keys = {gptq_key(p.fmt.name, min(p.shape[-1], PROBE_K), True) for p in plan.values()
            if p.fmt is not None and p.name.startswith("layers.")}
    return {k: {"a": a, "c": c, "b": b} for k in keys}


def test_the_estimate_scales_with_the_measured_throughput():
    cfg = get_variant("26b-a4b")
    r = Recipe.from_dict({"method": "gptq"})
    plan = make_plan(cfg, r)
    slow = Throughput("fake", 10.0, _rates(cfg, plan, 1.0, 1e-3, 1e-3), basis="injected", acc_gflops=4.0)
    fast = Throughput("fake", 20.0, _rates(cfg, plan, 0.5, 5e-4, 5e-4), basis="injected", acc_gflops=8.0)
    dev = torch.device("cpu")
    e_slow = estimate(cfg, plan, r, ("gguf",), device=dev, throughput=slow)
    e_fast = estimate(cfg, plan, r, ("gguf",), device=dev, throughput=fast)
    ps, pf = e_slow["time_parts_seconds"], e_fast["time_parts_seconds"]
    assert ps["gptq"] > 0 and ps["forward"] > 0 and ps["statistics"] > 0
    for part in ("forward", "statistics", "gptq"):
        assert pf[part] == pytest.approx(ps[part] / 2, rel=1e-12), part
    only_acc = Throughput("fake", 10.0, slow.gptq, basis="injected", acc_gflops=8.0)
    po = estimate(cfg, plan, r, ("gguf",), device=dev, throughput=only_acc)["time_parts_seconds"]
    assert po["statistics"] == pytest.approx(ps["statistics"] / 2, rel=1e-12) and po["forward"] == ps["forward"]
    assert e_slow["time_seconds_estimate"] == pytest.approx(2 * e_fast["time_seconds_estimate"], rel=1e-12)
    assert "injected on fake" in e_slow["time_basis"] and "throughput injected on fake" in e_slow["text"]
    rtn = estimate(cfg, make_plan(cfg, Recipe.from_dict({"method": "rtn"})), Recipe.from_dict({"method": "rtn"}),
                   ("gguf",), device=dev, throughput=slow)
    assert rtn["time_parts_seconds"]["gptq"] == 0  # RTN: no sweep


def test_gptq_time_model_per_matrix():
    t = Throughput("fake", 1.0, {gptq_key("q4_0", PROBE_K, True): {"a": 2.0, "c": 0.5, "b": 3.0},
                                  gptq_key("q4_0", 512, True): {"a": 1.0, "c": 0.25, "b": 1.0}})
    assert t.gptq_seconds("q4_0", 10, 512) == 1.0 + 0.25 * 512 + 1.0 * 10  # measured width: as measured
    K = 2 * PROBE_K  # beyond the widest probe: factorization as K^3, per-row work as K^2, per-column as K
    assert t.gptq_seconds("q4_0", 10, K) == 2.0 * 8 + 0.5 * K + 3.0 * 10 * 4
    # 8 experts in batches of 4: every expert's factorization and rows, the per-column cost once per batch
    assert t.gptq_seconds("q4_0", 10, 512, experts=8, batch=4) == 8 * (1.0 + 10) + 2 * 0.25 * 512


def test_dry_run_says_which_measurement_it_used(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMAQUANT_CACHE", str(tmp_path))  # nothing measured before
    runner = CliRunner()
    first = json.loads(runner.invoke(app, ["quantize", "tiny-moe", "--dry-run", "--json", "--device", "cpu"]).output)
    again = json.loads(runner.invoke(app, ["quantize", "tiny-moe", "--dry-run", "--json", "--device", "cpu"]).output)
    assert first["time_basis"].startswith("measured now on cpu")
    assert "cached in" in again["time_basis"] and "throughput measured" in again["text"]
    assert again["time_seconds_estimate"] == first["time_seconds_estimate"]


@pytest.mark.real_throughput
def test_real_probes_are_cached_and_reused(tmp_path, monkeypatch):
    from gemmaquant.formats import get_format

    monkeypatch.setenv("GEMMAQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(tp, "_MEMO", {})
    f = get_format("int4_g32_sym")
    dev = torch.device("cpu")
    got = tp.measure(dev, torch.float32, 64, {(f, 64)})
    assert got.basis == "measured now" and got.gemm_gflops > 0
    rates = got.gptq[gptq_key("int4_g32_sym", 64, True)]
    assert rates["a"] > 0 and rates["b"] >= 0 and rates["c"] >= 0
    assert (tmp_path / "throughput.json").is_file()
    monkeypatch.setattr(tp, "_MEMO", {})  # a new process: the file serves, nothing is probed again
    monkeypatch.setattr(tp, "probe_gemm", lambda *a, **k: pytest.fail("probed again"))
    monkeypatch.setattr(tp, "probe_gptq", lambda *a, **k: pytest.fail("probed again"))
    again = tp.measure(dev, torch.float32, 64, {(f, 64)})
    assert again.gemm_gflops == got.gemm_gflops and again.gptq == got.gptq and "cached in" in again.basis
