"""A `quantize --out` directory as a user meets it: what the run says on a non-terminal stderr, `eval` and `bench`
on the directory itself, and one bits-per-weight figure per file (the dry run's prediction is the written file's)."""

import contextlib
import io
import json

import pytest
from typer.testing import CliRunner

from gemmaquant.cli import app
from gemmaquant.export.inspect import file_bits, inspect_file
from gemmaquant.workflow import model_config, run_quantize

RECIPE = 'name = "tiny-rtn"\nmethod = "rtn"\nweight_format = "int4_g32_sym"\nn_samples = 2\nseq_len = 32\n'
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """quantize tiny-dense (RTN, a small calibration set, no evaluation) with stderr captured as a pipe would."""
    tmp = tmp_path_factory.mktemp("outputs")
    (tmp / "recipe.toml").write_text(RECIPE)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        res = run_quantize("tiny-dense", recipe_file=tmp / "recipe.toml", out=tmp / "out", evaluate=False)
    return res, err.getvalue(), tmp


def test_progress_and_stages_show_when_stderr_is_not_a_terminal(run):
    res, err, _ = run
    lines = err.splitlines()
    assert lines[0] == "quantizing on cpu", err
    assert lines[1] == "quantize: 0/6 layers" and lines[-2].startswith("quantize: 6/6 layers, "), err
    assert lines[-1] == f"exporting gguf and safetensors into {res['out']}", err


def test_eval_and_bench_take_the_output_directory(run):
    res, _, _ = run
    r = runner.invoke(app, ["eval", "tiny-dense", res["out"], "--n-seq", "2", "--seq-len", "32", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["measured_on"] == res["files"]["safetensors"] and out["kl_mean"] > 0  # the packed export
    r = runner.invoke(app, ["bench", res["out"], "--prompt-len", "4", "--new-tokens", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["model"] == res["files"]["safetensors"]


def test_output_directory_with_only_a_gguf(run, tmp_path):
    res, _, _ = run
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "m.gguf").symlink_to(res["files"]["gguf"])
    r = runner.invoke(app, ["eval", "tiny-dense", str(tmp_path / "only"), "--n-seq", "2", "--seq-len", "32"])
    assert r.exit_code == 0 and "measured on " + str(tmp_path / "only" / "m.gguf") in r.output, r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["eval", "tiny-dense", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no model here" in r.output and "Traceback" not in r.output


def test_dry_run_bits_per_weight_are_the_written_files(run):
    res, _, tmp = run
    r = runner.invoke(app, ["quantize", "tiny-dense", "--recipe", str(tmp / "recipe.toml"), "--dry-run", "--json"])
    dry = json.loads(r.output)
    for kind in ("gguf", "safetensors"):
        written = file_bits(res["files"][kind])
        assert (dry[kind]["bytes"], dry[kind]["weights"]) == (written["bytes"], written["weights"]), kind
        assert f"{written['bits_per_weight']:.3f}" in inspect_file(res["files"][kind])  # inspect's total row
        assert f"{written['bits_per_weight']:.3f} bits/weight" in res["text"]
    # the 192-wide embedding cannot hold Q6_K's 256-blocks: llama.cpp's fallback, Q8_0, in the plan and the file
    assert dry["gguf"]["params_by_type"]["Q8_0"] == 4096 * 192
    assert "GGUF gets Q8_0" in dry["float_tensors"]["embed_tokens.weight"]
    assert any(line.split()[:2] == ["token_embd.weight", "Q8_0"]
               for line in inspect_file(res["files"]["gguf"]).splitlines() if line.strip())


def test_report_names_the_file_its_kl_was_measured_on(run, tmp_path):
    from gemmaquant.evaluate_run import evaluate_and_report
    from gemmaquant.plan import make_plan
    from gemmaquant.quantize import QuantizeResult
    from gemmaquant.recipe import Recipe

    res, _, _ = run
    recipe = Recipe.from_dict(res["recipe"])
    (tmp_path / "work").mkdir()  # the evaluation's figures are kept there (eval.json), the report drawn from them
    result = QuantizeResult(tmp_path / "work", make_plan(model_config("tiny-dense"), recipe), res["calibration_sha256"], [], 0.0)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rep = evaluate_and_report("tiny-dense", result, recipe, res["files"], tmp_path, n_seq=2, seq_len=16)
    gguf = res["files"]["gguf"]
    assert err.getvalue().splitlines()[0].startswith(f"evaluating {gguf} against the float model")
    assert "comparison: round-to-nearest int8" in err.getvalue()
    assert rep["measured_on"] == gguf and rep["compared"][0]["file"] == gguf
    assert rep["compared"][0]["bits_per_weight"] == file_bits(gguf)["bits_per_weight"]
    md = (tmp_path / "report.md").read_text()
    assert f"Measured on {gguf} (read back as a user loads it; {file_bits(gguf)['bits_per_weight']:.3f} bits" in md
    assert "Bits per weight of the plan" not in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["measured_on"] == gguf
    assert saved["files"]["safetensors"]["bits_per_weight"] == file_bits(res["files"]["safetensors"])["bits_per_weight"]


def test_a_run_started_before_the_embedding_type_reached_the_exporter_still_resumes():
    from gemmaquant.recipe import Recipe

    saved = {**Recipe().to_dict(), "embedding_gguf_type": "Q6_K"}  # every state.json written before had this
    assert Recipe().same_as(saved)
    assert not Recipe(method="rtn").same_as(saved)


def test_a_qat_output_directory_runs_the_qat_result_not_the_gptq_start(tmp_path):
    from gemmaquant.outputs import exported_model

    for work in ("quantized", ".gemmaquant-work"):  # what qat --out holds: QAT's result and GPTQ's work directory
        (tmp_path / work).mkdir()
        (tmp_path / work / "state.json").write_text("{}")
        (tmp_path / work / "globals.safetensors").write_bytes(b"")
    assert exported_model(tmp_path) == tmp_path / "quantized"
    assert exported_model(tmp_path / "quantized") == tmp_path / "quantized"


def test_rerun_with_nothing_to_do_says_so(run):
    """The same command again finds its finished exports: it says there is nothing to redo instead of claiming to
    have quantized and exported again."""
    res, _, tmp = run
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        again = run_quantize("tiny-dense", recipe_file=tmp / "recipe.toml", out=tmp / "out", evaluate=False)
    assert err.getvalue().splitlines() == [f"{res['out']} already holds this run's exports: checking that recipe, "
                                           "calibration and weights are the same"], err.getvalue()
    assert again["text"].startswith(f"nothing to redo: {res['out']} already holds tiny-dense with rtn onto "
                                    "int4_g32_sym"), again["text"]
    assert again["files"] == res["files"] and not res["finished_earlier"]
