"""The command line as a user meets it: one-line errors with exit code 2, dry runs on real aliases without
weights, and the main command end to end on a bundled fixture."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gemmaquant.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_unknown_alias_lists_valid_ones():
    r = run("quantize", "gemma-9000", "--dry-run")
    assert r.exit_code == 2
    assert "unknown model 'gemma-9000'" in r.output and "26b-a4b" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args, msg", [
    (["--gguf-type", "Q4_K_M"], "compressed-tensors cannot hold"),
    (["--bits", "3"], "choose 4 or 8"),
    (["--group-size", "128"], "no lossless GGUF"),
    (["--format", "onnx"], "choose from"),
    (["--bits", "8", "--gguf-type", "Q4_K_M", "--format", "gguf"], "conflicts"),
])
def test_conflicting_flags(args, msg):
    r = run("quantize", "tiny-dense", "--dry-run", *args)
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


def test_non_empty_output_refused_without_overwrite(tmp_path):
    (tmp_path / "something").write_text("x")
    r = run("quantize", "tiny-dense", "--out", str(tmp_path), "--no-eval")
    assert r.exit_code == 2 and "--overwrite" in r.output


@pytest.mark.parametrize("alias", ["26b-a4b", "31b", "e2b", "e4b"])
def test_dry_run_on_real_aliases_without_weights(alias, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no weights anywhere
    r = run("quantize", alias, "--bits", "4", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert 4.0 < res["gguf"]["bits_per_weight"] < 7.0
    assert res["peak_memory_bytes_estimate"] > 0 and res["time_seconds_estimate"] > 0
    assert any("router" in n for n in res["float_tensors"]) == (alias == "26b-a4b")


def test_dry_run_q4_k_m_plan_has_the_256_block_fallbacks(tmp_path, monkeypatch):
    r = run("quantize", "26b-a4b", "--gguf-type", "Q4_K_M", "--format", "gguf", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    by_type = json.loads(r.output)["gguf"]["params_by_type"]
    assert "Q4_K" in by_type and ("Q5_0" in by_type or "Q8_0" in by_type)  # ffn_down (2112) / experts (704)


def test_dry_run_says_why_each_family_gets_its_type(tmp_path, monkeypatch):
    """26B-A4B Q4_K_M: the published file's size, and each family's type with the fallback that chose it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    r = run("quantize", "26b-a4b", "--gguf-type", "Q4_K_M", "--format", "gguf", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    g = res["gguf"]
    assert f"{g['bytes'] / 2**30:.2f}" == "15.63" and f"{g['bits_per_weight']:.2f}" == "5.32"
    fam = {(f["family"], f["type"]): f for f in g["families"]}
    down = fam[("blk.*.ffn_down_exps", "Q5_0")]
    assert down["why"] == "row of 704: 704 % 256 = 192, Q4_K impossible -> Q5_0"
    assert down["layers"] == "3-4,6-7,9-10,12-13,15-16,18-19,21-22,24-25" and down["bits_per_weight"] == 5.5
    assert fam[("blk.*.ffn_down_exps", "Q8_0")]["why"].endswith("row of 704: 704 % 256 = 192, Q6_K impossible -> Q8_0")
    assert fam[("blk.*.ffn_down", "Q5_0")]["why"] == "row of 2112: 2112 % 256 = 64, Q4_K impossible -> Q5_0"
    assert fam[("blk.*.ffn_gate_up_exps", "Q4_K")]["why"] == ""  # the default type
    rope = 4 * 512 // 2  # rope_freqs, the one tensor outside the families
    assert sum(f["bytes"] for f in g["families"]) == g["bytes"] - rope
    assert abs(sum(f["share"] for f in g["families"]) - 1) < 1e-6
    assert "blk.*.ffn_down_exps [layers 3-4,6-7" in res["text"] and "Q4_K impossible -> Q5_0" in res["text"]


def test_dry_run_iq4_xs_falls_back_to_iq4_nl_on_704_and_2112_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    r = run("quantize", "26b-a4b", "--gguf-type", "IQ4_XS", "--format", "gguf", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    fam = {(f["family"], f["type"]): f for f in json.loads(r.output)["gguf"]["families"]}
    assert fam[("blk.*.ffn_down_exps", "IQ4_NL")]["why"] == "row of 704: 704 % 256 = 192, IQ4_XS impossible -> IQ4_NL"
    assert fam[("blk.*.ffn_gate_up_exps", "IQ4_XS")]["bits_per_weight"] == 4.25


def test_variants():
    r = run("variants", "--json")
    names = {v["name"]: v for v in json.loads(r.output)["variants"]}
    assert round(names["26b-a4b"]["params_total"] / 1e9, 1) == 25.2
    assert round(names["26b-a4b"]["params_active"] / 1e9, 1) == 3.8


def test_main_command_end_to_end(tmp_path):
    """The console script, as the README runs it: GGUF, safetensors and a report, then inspect and eval."""
    exe = os.path.join(os.path.dirname(sys.executable), "gemmaquant")
    out = tmp_path / "q"
    p = subprocess.run([exe, "quantize", "tiny-moe", "--bits", "4", "--method", "rtn", "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    for kind in ("gguf", "safetensors"):
        assert os.path.exists(res["files"][kind])
    for f in ("report.json", "report.md", "report.html"):
        assert (out / f).is_file()
    work = out / ".gemmaquant-work"  # pruned to its records: no layer, activation or globals files are left
    assert not list(work.glob("*.safetensors")) and (work / "steps.json").is_file()
    m = res["report"]["metrics"]
    assert 0 < m["kl_mean"] < 0.2 and m["top1"] > 0.7
    rt = m["routing"]  # an MoE model: the report says how much of the KL is expert choices that flip
    assert len(rt["flips"]) == 4 and max(rt["flips"]) > 0 and 0 < rt["kl_ref_routing"] < m["kl_mean"]
    md = (out / "report.md").read_text()
    assert "## Routing (MoE)" in md
    assert "## GGUF types per tensor family" in md and "int4_g32_sym stored losslessly as Q4_0" in md
    r = run("inspect", res["files"]["gguf"])
    assert r.exit_code == 0 and "Q4_0" in r.output
    r = run("eval", "tiny-moe", res["files"]["gguf"], "--json", "--n-seq", "4", "--seq-len", "64")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["kl_mean"] > 0 and len(json.loads(r.output)["routing"]["flips"]) == 4
