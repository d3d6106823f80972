"""Long runs say what they do when stderr is not a terminal (a pipe, a log file), and Ctrl-C says how to resume."""

import io

from typer.testing import CliRunner

from gemmaquant import workflow
from gemmaquant.cli import app
from gemmaquant.progress import progress, stage


def test_plain_lines_when_not_a_terminal():
    f = io.StringIO()  # isatty() is False, as for a pipe
    bar = progress(range(2, 5), desc="quantize", unit="layer", total=5, initial=2, interval=0, file=f)
    for i in bar:
        bar.set_postfix(kl=f"{0.5 / i:.3f}")
    lines = f.getvalue().splitlines()
    assert lines[0] == "quantize: 2/5 layers"
    assert lines[1].startswith("quantize: 3/5 layers, ") and "left" in lines[1] and lines[1].endswith("kl=0.250")
    assert lines[-1].startswith("quantize: 5/5 layers, ") and "left" not in lines[-1] and len(lines) == 4
    assert "\r" not in f.getvalue()


def test_lines_are_rate_limited_but_the_last_is_always_written():
    f = io.StringIO()
    list(progress(range(100), desc="qat", unit="step", total=100, interval=3600, file=f))
    assert f.getvalue().splitlines()[0] == "qat: 0/100 steps" and len(f.getvalue().splitlines()) == 2
    assert f.getvalue().splitlines()[1].startswith("qat: 100/100 steps, ")


def test_disabled_progress_and_stages_write_nothing():
    f = io.StringIO()
    assert list(progress(range(3), desc="x", unit="step", total=3, enabled=False, file=f)) == [0, 1, 2]
    stage("exporting", enabled=False, file=f)
    assert f.getvalue() == ""
    stage("exporting", file=f)
    assert f.getvalue() == "exporting\n"


def test_ctrl_c_says_rerunning_resumes(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "run_quantize", interrupted)
    r = CliRunner().invoke(app, ["quantize", "tiny-dense", "--out", str(tmp_path / "q")])
    assert r.exit_code == 130
    assert "run the same command again to resume after the last finished layer" in r.output
    assert "Traceback" not in r.output
    monkeypatch.setattr(workflow, "run_qat", interrupted)
    r = CliRunner().invoke(app, ["qat", "tiny-dense", "--data", "x.txt", "--out", str(tmp_path / "qat")])
    assert r.exit_code == 130 and "run the same command again to resume from the last saved step" in r.output
