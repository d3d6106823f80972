"""Out of device memory mid-layer (torch.cuda.OutOfMemoryError, simulated: there is no GPU here): the command ends
with one line that names the option that lowers memory and says that rerunning resumes, exit code 2, and the
rerun finishes with the bytes of an uninterrupted run."""

import importlib

import torch
from typer.testing import CliRunner

from gemmaquant.cli import app
from gemmaquant.errors import describe

q = importlib.import_module("gemmaquant.quantize")  # the module (the package exports the function of that name)
RECIPE = 'name = "oom"\nmethod = "gptq"\nweight_format = "int4_g32_sym"\nn_samples = 2\nseq_len = 32\nbatch_size = 1\n'


def _cmd(tmp_path, out):
    (tmp_path / "r.toml").write_text(RECIPE)
    return ["quantize", "tiny-moe", "--recipe", str(tmp_path / "r.toml"), "--format", "safetensors", "--no-eval",
            "--device", "cpu", "--out", str(out)]


def _outputs(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def test_out_of_memory_mid_layer_says_what_to_lower_and_the_rerun_resumes(tmp_path, monkeypatch):
    real = q.quantize_one_layer
    calls = []

    def oom_in_layer_2(cfg, i, *args, **kw):
        calls.append(i)
        if i == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, i, *args, **kw)

    runner = CliRunner()
    out = tmp_path / "o"
    monkeypatch.setattr(q, "quantize_one_layer", oom_in_layer_2)
    res = runner.invoke(app, _cmd(tmp_path, out))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "out of memory" in lines[0] and "layer 2" in lines[0] and "--activation-budget 0" in lines[0]
    assert "resumes after layer 1" in lines[0]
    monkeypatch.setattr(q, "quantize_one_layer", real)
    calls.clear()
    monkeypatch.setattr(q, "quantize_one_layer", lambda cfg, i, *a, **k: calls.append(i) or real(cfg, i, *a, **k))
    res = runner.invoke(app, _cmd(tmp_path, out) + ["--activation-budget", "0"])
    assert res.exit_code == 0, res.output
    assert calls[0] == 2  # resumed: layers 0 and 1 were not redone
    whole = tmp_path / "whole"
    assert runner.invoke(app, _cmd(tmp_path, whole)).exit_code == 0
    a, b = _outputs(out), _outputs(whole)
    assert a and a == b


def test_out_of_memory_elsewhere_is_one_line_exit_2():
    code, msg = describe(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB\nmore"))
    assert code == 2 and "\n" not in msg and "--device cpu" in msg and "resumes" in msg


def test_negative_activation_budget_is_refused(tmp_path):
    res = CliRunner().invoke(app, _cmd(tmp_path, tmp_path / "o") + ["--activation-budget", "-1"])
    assert res.exit_code == 2 and "--activation-budget -1" in res.output
