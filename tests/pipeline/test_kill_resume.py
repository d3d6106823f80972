"""kill -9 at any point of `gemmaquant quantize`, then the same command: it finishes, and every output file is
byte-identical to an uninterrupted run's.

"Byte-identical": the GGUF and every file of the safetensors directory exactly; report.json / .md / .html exactly
once their timings (the `timings` key of report.json, the last section of report.md / .html, see
gemmaquant.eval.report) are cut off. Nothing else may be left in the output directory (temporary files of the
killed step included); the work directory's records are compared only by their presence.

The command runs in a subprocess through a harness that installs the kill at a named point (KILL_POINTS) and makes
the evaluation small (2 x 32 held-out tokens, an 8-token latency probe) for every run alike. The default suite
kills one run after another at four late points and finishes with the fifth (one run's work in all); `-m slow`
kills a fresh run at each of the ten points.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gemmaquant.eval.report import TIMINGS_HEADING

RECIPE = 'method = "rtn"\nweight_format = "int4_g32_sym"\nn_samples = 4\nseq_len = 32\nbatch_size = 4\n'

HARNESS = textwrap.dedent("""
    import os, signal, sys
    point, calls = os.environ.get("GQ_KILL_AT", ""), {}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_on(module, attr, nth=1, before=True, when=lambda *a, **k: True):
        real = getattr(module, attr)
        def hook(*a, **k):
            if when(*a, **k):
                calls[attr] = calls.get(attr, 0) + 1
                if before and calls[attr] == nth:
                    die()
            r = real(*a, **k)
            if not before and when(*a, **k) and calls[attr] == nth:
                die()
            return r
        setattr(module, attr, hook)

    import gemmaquant.eval.latency as latency, gemmaquant.eval.metrics as metrics, gemmaquant.eval.report as report
    import gemmaquant.evaluate_run as evaluate_run, gemmaquant.export.compressed_tensors as ct
    import gemmaquant.export.gguf as gguf, gemmaquant.resume as resume, gemmaquant.safetensors_write as stw
    q = sys.modules["gemmaquant.quantize"]
    evaluate_run.evaluate_and_report.__defaults__ = (None, 2, 32, None)  # progress, n_seq, seq_len, steps
    real_latency = latency.measure_latency
    latency.measure_latency = lambda m, prompt_len, new_tokens: real_latency(m, prompt_len=8, new_tokens=2)

    step = lambda name: (lambda self, s, *a, **k: s == name)
    if point == "layer":                 # after layer 1's inputs were written, before the layer
        kill_on(q, "save_layer", when=lambda work, i, *a: i == 1)
    elif point == "gguf-mid":            # half-way through the GGUF's tensor data, in its temporary file
        kill_on(gguf, "_write", nth=40)
    elif point == "gguf-unrecorded":     # the GGUF renamed into place, its step not yet recorded
        kill_on(resume.Steps, "record", when=step("gguf"))
    elif point == "safetensors-mid":     # safetensors tensors being gathered, in the temporary directory
        kill_on(ct.ShardWriter, "add", nth=30)
    elif point == "safetensors-shard":   # a shard written by the library, before its header is made deterministic
        kill_on(stw, "sort_metadata")
    elif point == "safetensors-unrecorded":
        kill_on(resume.Steps, "record", when=step("safetensors"))
    elif point == "evaluate-mid":        # between the float model's and the RTN references' logits
        kill_on(metrics, "compare_logits", nth=2)
    elif point == "evaluate-unrecorded":  # eval.json written, its step not recorded
        kill_on(resume.Steps, "record", when=step("evaluate"))
    elif point == "report-mid":          # report.json written, report.md not
        kill_on(report, "_write", nth=2)
    elif point == "prune-mid":           # the work directory half pruned after the last step
        def prune_half(work):
            for p in sorted(work.glob("layer_0000[01].*")):
                p.unlink()
            die()
        resume.prune_layers = prune_half

    from gemmaquant.cli import app
    app(prog_name="gemmaquant", args=sys.argv[1:])
""")

KILL_POINTS = ["layer", "gguf-mid", "gguf-unrecorded", "safetensors-mid", "safetensors-shard",
               "safetensors-unrecorded", "evaluate-mid", "evaluate-unrecorded", "report-mid", "prune-mid"]
CHAIN = ["gguf-mid", "safetensors-shard", "evaluate-unrecorded", "report-mid"]


def _run(out: Path, recipe: Path, point: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", HARNESS, "quantize", "tiny-moe", "--recipe", str(recipe), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "GQ_KILL_AT": point})


def without_timings(rel: str, data: bytes) -> bytes:
    if rel == "report.json":
        d = json.loads(data)
        d.pop("timings")
        return json.dumps(d).encode()
    if rel == "report.md":
        return data.split(TIMINGS_HEADING.encode())[0]
    if rel == "report.html":
        return data.split(f"<h2>{TIMINGS_HEADING.lstrip('# ')}</h2>".encode())[0]
    return data


def outputs(out: Path) -> dict[str, bytes]:
    """Every file in out except the work directory's records and the lock, timings cut from the report."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.is_file() and not rel.startswith((".gemmaquant-work", ".gemmaquant.lock")):
            files[rel] = without_timings(rel, p.read_bytes())
    return files


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    recipe = root / "rtn.toml"
    recipe.write_text(RECIPE)
    p = _run(root / "out", recipe)
    assert p.returncode == 0, p.stderr[-3000:]
    base = outputs(root / "out")
    assert {"report.json", "report.md", "report.html", "tiny-moe-Q4_0.gguf", "safetensors/model.safetensors"} <= set(base)
    assert all(TIMINGS_HEADING.encode() not in v for v in base.values())  # the cut happened: timings are there
    shutil.rmtree(root / "out")
    return root, recipe, base


def _same_as_baseline(out: Path, base: dict, what: str) -> None:
    got = outputs(out)
    assert sorted(got) == sorted(base), f"{what}: files differ: {set(got) ^ set(base)}"
    differ = [rel for rel in base if got[rel] != base[rel]]
    assert not differ, f"{what}: not byte-identical: {differ}"


def test_killed_again_and_again_in_the_late_steps(baseline):
    """Each run resumes the one killed before it and is killed at the next point; the last one finishes."""
    root, recipe, base = baseline
    out = root / "out"  # the same path as the uninterrupted run: the report names its files by path
    try:
        for point in CHAIN:
            killed = _run(out, recipe, point)
            assert killed.returncode == -9, f"not killed at {point}: {killed.stderr[-3000:]}"
        resumed = _run(out, recipe)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _same_as_baseline(out, base, " -> ".join(CHAIN))
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_then_the_same_command_gives_identical_files(baseline, point):
    root, recipe, base = baseline
    out = root / "out"
    try:
        killed = _run(out, recipe, point)
        assert killed.returncode == -9, f"not killed at {point}: {killed.stderr[-3000:]}"
        resumed = _run(out, recipe)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _same_as_baseline(out, base, point)
    finally:
        shutil.rmtree(out, ignore_errors=True)
