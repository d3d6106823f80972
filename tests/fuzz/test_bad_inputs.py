"""Damaged inputs through every command and library entry point (issue 28): each ends in exit code 2 and one line
(or a `GemmaquantError`) naming the file, the tensor or the option at fault, before any work is done; none ends in
a traceback or a result, and nothing is left at a final output name. The damaged inputs are made from the bundled
fixture in tests/fuzz/damage.py; the CLI runs in-process (CliRunner), a few checks run the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gemmaquant
from gemmaquant.cli import app
from gemmaquant.errors import GemmaquantError
from gemmaquant.quantize import WORK_DIR
from tests.fuzz import damage
from tests.fuzz.damage import MARKER

runner = CliRunner()
TRAIN = Path(gemmaquant.__file__).parent / "calibration" / "data" / "train.txt"


class Corpus:
    """Builds each damaged input once, on first use."""

    def __init__(self, root: Path):
        (root / "good").mkdir()
        self.root, self.good, self._made = root, damage.Good(root / "good"), {}

    def get(self, table: str, name: str) -> Path:
        key = (table, name)
        if key not in self._made:
            d = self.root / table
            d.mkdir(exist_ok=True)
            if table == "texts":
                self._made[key] = damage.write_text_case(name, d)
            elif table == "recipes":
                self._made[key] = damage.write_recipe_case(name, d)
            else:
                builders = {"checkpoints": damage.CHECKPOINTS, "ggufs": damage.GGUFS, "ct": damage.COMPRESSED}
                path = d / (name + (".gguf" if table == "ggufs" else ""))
                builders[table][name][0](path, self.good)
                self._made[key] = path
        return self._made[key]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus(tmp_path_factory.mktemp("damaged"))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The output directory a case may write (checked afterwards) and a clean working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "out"


def assert_refused_cli(args: list[str], names: str, out: Path):
    r = runner.invoke(app, [str(a) for a in args])
    text = r.output
    assert r.exit_code == 2, f"exit {r.exit_code} for {args}:\n{text[-2000:]}\n{r.exception!r}"
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len([ln for ln in lines if ln.startswith(("error:", "Error:", "│"))]) >= 1, text
    assert names.lower() in text.lower(), f"the message does not name {names!r}:\n{text}"
    assert_nothing_final(out)


def assert_refused_lib(fn, names: str, out: Path | None = None):
    with pytest.raises(GemmaquantError) as e:
        fn()
    assert names.lower() in str(e.value).lower(), f"the message does not name {names!r}: {e.value}"
    if out is not None:
        assert_nothing_final(out)


def assert_nothing_final(out: Path):
    """Nothing at a final output name: the output directory holds at most a resumable work directory, and no
    temporary file is left beside it."""
    if out.exists():
        if out.is_dir():
            assert {p.name for p in out.iterdir()} <= {WORK_DIR}, sorted(p.name for p in out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp" in p.name]
    assert not leftovers, leftovers


# ---- which entry points each damaged input goes through -----------------------------------------------------
def spread(inputs: list[str], entries_of) -> list:
    """(input, entry) params: in the default run each input goes through one entry point (the n-th input through
    the n-th of its entries, round-robin, so every entry point is exercised); under `-m slow`, through all."""
    params = []
    for i, name in enumerate(inputs):
        entries = entries_of(name)
        for j, e in enumerate(entries):
            marks = () if j == i % len(entries) else (pytest.mark.slow,)
            params.append(pytest.param(name, e, marks=marks, id=f"{name}-{e}"))
    return params


def ckpt_entries(name: str) -> list[str]:
    weights = ["quantize", "eval", "bench", "qat", "load", "lib_quantize", "export"]
    if name in damage.TOKENIZERS:
        return ["quantize", "eval", "qat", "lib_quantize"]
    if name in damage.SAFETENSORS:
        return weights + ["checkpoint"] + (["inspect", "inspect_file", "lib_inspect"] if name.startswith("st_") else [])
    if name in damage.CONFIGS and name not in SHAPE_CONFIGS:
        return weights + ["checkpoint", "dry_run"]
    return weights


SHAPE_CONFIGS = {"cfg_hidden_size_wrong", "cfg_vocab_wrong", "cfg_more_layers", "cfg_fewer_layers"}
CKPT_CASES = spread(list(damage.CHECKPOINTS), ckpt_entries)


def run_ckpt_entry(entry: str, ckpt: Path, names: str, out: Path):
    from gemmaquant.checkpoint import Checkpoint
    from gemmaquant.export import export_gguf
    from gemmaquant.export.inspect import inspect_file
    from gemmaquant.export.source import FloatSource

    fixture = damage.fixture_path(damage.FIXTURE)
    cli = {
        "quantize": ["quantize", ckpt, "--method", "rtn", "--out", out, "--no-eval"],
        "dry_run": ["quantize", ckpt, "--dry-run"],
        "eval": ["eval", ckpt, fixture, "--n-seq", "2", "--seq-len", "32"],
        "bench": ["bench", ckpt, "--prompt-len", "8", "--new-tokens", "2"],
        "qat": ["qat", ckpt, "--data", TRAIN, "--steps", "1", "--out", out],
        "inspect": ["inspect", ckpt],
        "inspect_file": ["inspect", ckpt / "model.safetensors"],
    }
    lib = {
        "load": lambda: gemmaquant.load(ckpt),
        "checkpoint": lambda: Checkpoint(ckpt),
        "lib_quantize": lambda: gemmaquant.quantize(ckpt, "default/int4-rtn", out=out),
        "export": lambda: export_gguf(FloatSource(ckpt), out / "x.gguf", type="Q8_0"),
        "lib_inspect": lambda: inspect_file(ckpt),
    }
    if entry in cli:
        assert_refused_cli(cli[entry], names, out)
    else:
        assert_refused_lib(lib[entry], names, out)


@pytest.mark.parametrize("name, entry", CKPT_CASES)
def test_damaged_checkpoint(name, entry, corpus, work):
    ckpt = corpus.get("checkpoints", name)
    run_ckpt_entry(entry, ckpt, damage.CHECKPOINTS[name][1], work)
    assert not (ckpt / MARKER).exists(), "a pickle was executed"


def file_commands(fixture, path) -> dict[str, list]:
    """The commands that read a quantized file: entry -> CLI arguments."""
    return {"eval": ["eval", fixture, path, "--n-seq", "2", "--seq-len", "32"],
            "bench": ["bench", path, "--prompt-len", "8", "--new-tokens", "2"], "inspect": ["inspect", path]}


GGUF_HEADER = [n for n in damage.GGUFS if n.startswith(("gguf_truncated", "gguf_empty", "gguf_bad", "gguf_tensor",
                                                         "gguf_kv", "gguf_garbled", "gguf_text"))]
GGUF_CASES = spread(list(damage.GGUFS), lambda n: ["load", "bench", "eval"] + (
    ["inspect", "lib_inspect", "metadata"] if n in GGUF_HEADER else []))


@pytest.mark.parametrize("name, entry", GGUF_CASES)
def test_damaged_gguf(name, entry, corpus, work):
    from gemmaquant.export.gguf_reader import gguf_metadata
    from gemmaquant.export.inspect import inspect_file

    path, names = corpus.get("ggufs", name), damage.GGUFS[name][1]
    cli = file_commands(damage.fixture_path(damage.FIXTURE), path)
    if entry in cli:
        assert_refused_cli(cli[entry], names, work)
    elif entry == "load":
        assert_refused_lib(lambda: gemmaquant.load(path), names)
    elif entry == "lib_inspect":
        assert_refused_lib(lambda: inspect_file(path), names)
    else:
        assert_refused_lib(lambda: gguf_metadata(path), names)


CT_CASES = spread(list(damage.COMPRESSED), lambda n: ["load", "bench", "eval"] + (
    ["inspect"] if n in ("ct_truncated_half", "ct_config_invalid_json") else []))


@pytest.mark.parametrize("name, entry", CT_CASES)
def test_damaged_compressed_tensors(name, entry, corpus, work):
    path, names = corpus.get("ct", name), damage.COMPRESSED[name][1]
    cli = file_commands(damage.fixture_path(damage.CT_FIXTURE), path)
    if entry in cli:
        assert_refused_cli(cli[entry], names, work)
    else:
        assert_refused_lib(lambda: gemmaquant.load(path), names)


TEXT_CASES = spread(list(damage.TEXTS), lambda n: ["quantize", "qat", "eval"] + (
    ["read_texts"] if n != "txt_too_short" else []))  # a short text reads well; it is too short to calibrate


@pytest.mark.parametrize("name, entry", TEXT_CASES)
def test_damaged_text(name, entry, corpus, work):
    from gemmaquant.calibration import read_texts

    path, names = corpus.get("texts", name), damage.TEXTS[name][2]
    fixture = damage.fixture_path(damage.FIXTURE)
    cli = {"quantize": ["quantize", fixture, "--method", "rtn", "--calib", path, "--out", work, "--no-eval"],
           "eval": ["eval", fixture, fixture, "--heldout", path, "--n-seq", "2", "--seq-len", "32"],
           "qat": ["qat", fixture, "--data", path, "--steps", "1", "--out", work]}
    if entry in cli:
        assert_refused_cli(cli[entry], names, work)
    else:
        assert_refused_lib(lambda: read_texts(path), names)


RECIPE_CASES = spread(list(damage.RECIPES), lambda n: ["quantize", "lib_quantize"] + (
    ["from_file"] if n not in ("calibration_missing_file", "group_not_fitting") else []))  # valid recipes; the
# model or the file system makes them fail


@pytest.mark.parametrize("name, entry", RECIPE_CASES)
def test_bad_recipe(name, entry, corpus, work):
    path, names = corpus.get("recipes", name), damage.RECIPES[name][1]
    fixture = damage.fixture_path(damage.FIXTURE)
    if entry == "quantize":
        assert_refused_cli(["quantize", fixture, "--recipe", path, "--out", work, "--no-eval",
                            "--format", "safetensors"], names, work)
    elif entry == "lib_quantize":
        assert_refused_lib(lambda: gemmaquant.quantize(fixture, path, out=work), names, work)
    else:
        assert_refused_lib(lambda: gemmaquant.Recipe.from_file(path), names)


F = damage.FIXTURE
NUMBERS = [  # (command line, what the error names)
    (["quantize", F, "--bits", "3"], "--bits"),
    (["quantize", F, "--bits", "0"], "--bits"),
    (["quantize", F, "--group-size", "0", "--format", "safetensors"], "--group-size"),
    (["quantize", F, "--group-size", "-32", "--format", "safetensors"], "--group-size"),
    (["quantize", F, "--group-size", "48", "--format", "safetensors"], "--group-size"),
    (["quantize", F, "--method", "sgd"], "sgd"),
    (["quantize", F, "--format", "onnx"], "--format"),
    (["quantize", F, "--format", ""], "--format"),
    (["quantize", F, "--gguf-type", "Q9_K", "--format", "gguf"], "Q9_K"),
    (["quantize", F, "--calib", "/nonexistent/calib.txt"], "calib.txt"),
    (["quantize", F, "--recipe", "/nonexistent/recipe.toml"], "recipe.toml"),
    (["quantize", F, "--bits", "four"], "--bits"),
    (["eval", F, F, "--n-seq", "0"], "--n-seq"),
    (["eval", F, F, "--n-seq", "-1"], "--n-seq"),
    (["eval", F, F, "--seq-len", "0"], "--seq-len"),
    (["eval", F, F, "--seq-len", "-5"], "--seq-len"),
    (["eval", F, F, "--seq-len", "1"], "--seq-len"),
    (["eval", F, F, "--seq-len", "100000", "--n-seq", "1"], "--seq-len"),
    (["eval", F, F, "--heldout", "/nonexistent/heldout.txt"], "heldout.txt"),
    (["eval", F, F, "--n-seq", "1.5"], "--n-seq"),
    (["bench", F, "--prompt-len", "-1"], "--prompt-len"),
    (["bench", F, "--prompt-len", "0"], "--prompt-len"),
    (["bench", F, "--prompt-len", "5000"], "--prompt-len"),
    (["bench", F, "--new-tokens", "-1"], "--new-tokens"),
    (["bench", F, "--new-tokens", "0"], "--new-tokens"),
    (["bench", F, "--prompt-len", "4000", "--new-tokens", "200"], "--new-tokens"),
]
QAT_NUMBERS = [
    (["--steps", "0"], "steps"), (["--steps", "-1"], "steps"),
    (["--lr", "-1"], "lr"), (["--lr", "nan"], "lr"), (["--lr", "inf"], "lr"),
    (["--scale-lr", "-1"], "scale_lr"), (["--expert-lr-scale", "-1"], "expert_lr_scale"),
    (["--attention-lr-scale", "-1"], "attention_lr_scale"), (["--attention-lr-scale", "nan"], "attention_lr_scale"),
    (["--batch-size", "0"], "batch_size"), (["--batch-size", "-2"], "batch_size"),
    (["--micro-batch", "0"], "micro_batch"), (["--batch-size", "4", "--micro-batch", "8"], "micro_batch"),
    (["--average", "1.0"], "average"), (["--average", "-0.1"], "average"), (["--average", "nan"], "average"),
    (["--per-layer-embed-lr", "-1"], "per_layer_embed_lr"), (["--bits", "5"], "bits"),
    (["--format", "int5_g32_sym"], "int5_g32_sym"), (["--gguf-type", "Q9_K"], "Q9_K"),
    (["--embedding-type", "Q7"], "Q7"), (["--bits", "4", "--gguf-type", "Q5_K_M"], "--bits"),
]
CLI_CASES = NUMBERS + [(["qat", F, "--data", str(TRAIN), "--out", "OUT", *a], n) for a, n in QAT_NUMBERS]


@pytest.mark.parametrize("args, names", CLI_CASES, ids=[" ".join(a[:1] + a[2:]) for a, _ in CLI_CASES])
def test_bad_cli_numbers(args, names, work):
    args = [str(work) if a == "OUT" else a for a in args]
    if args[0] == "quantize" and "--out" not in args:
        args += ["--out", str(work), "--no-eval"]
    assert_refused_cli(args, names, work)


def lib_number_cases():
    from gemmaquant.qat import QATRecipe
    from gemmaquant.recipe import Recipe
    from gemmaquant.workflow import run_bench, run_eval

    return {
        "Recipe(act_order='yes')": (lambda: Recipe(act_order="yes"), "act_order"),
        "Recipe(damp=-1)": (lambda: Recipe(damp=-1.0), "damp"),
        "Recipe(moe_min_tokens=-5)": (lambda: Recipe(moe_min_tokens=-5), "moe_min_tokens"),
        "Recipe.from_dict(n_samples='8')": (lambda: Recipe.from_dict({"n_samples": "8"}), "n_samples"),
        "QATRecipe(lr=-1)": (lambda: QATRecipe(lr=-1.0), "lr"),
        "QATRecipe(steps=2.5)": (lambda: QATRecipe(steps=2.5), "steps"),
        "QATRecipe(grad_clip=0)": (lambda: QATRecipe(grad_clip=0.0), "grad_clip"),
        "QATRecipe(scale_grad='x')": (lambda: QATRecipe(scale_grad="x"), "scale_grad"),
        "run_eval(n_seq=0)": (lambda: run_eval(F, damage.fixture_path(F), n_seq=0), "n_seq"),
        "run_bench(new_tokens=-1)": (lambda: run_bench(F, new_tokens=-1), "new_tokens"),
        "load('no/such/dir')": (lambda: gemmaquant.load("no/such/dir"), "no/such/dir"),
        "quantize(recipe='no/such')": (lambda: gemmaquant.quantize(F, "no/such", out="x"), "no/such"),
    }


@pytest.mark.parametrize("name", list(lib_number_cases()))
def test_bad_library_values(name, work):
    fn, names = lib_number_cases()[name]
    assert_refused_lib(fn, names, work)


# ---- the console script: exit codes and stderr as a shell sees them ----------------------------------------
def _script(*args, cwd):
    exe = os.path.join(os.path.dirname(sys.executable), "gemmaquant")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_console_script_one_line_error(corpus, tmp_path):
    ckpt = corpus.get("checkpoints", "st_truncated_half")
    p = _script("bench", ckpt, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "model.safetensors" in p.stderr


@pytest.mark.slow
def test_console_script_debug_and_bad_number(corpus, tmp_path):
    p = _script("--debug", "bench", corpus.get("checkpoints", "st_truncated_half"), cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" in p.stderr and "CheckpointError" in p.stderr
    p = _script("eval", F, F, "--n-seq", "0", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--n-seq" in p.stderr


def test_debug_shows_the_error_itself(corpus):
    r = runner.invoke(app, ["--debug", "bench", str(corpus.get("checkpoints", "st_truncated_half"))])
    assert isinstance(r.exception, GemmaquantError) and "model.safetensors" in str(r.exception)


def test_an_unexpected_exception_is_reported_as_a_bug(monkeypatch):
    """Anything but a gemmaquant error is a bug: exit 1, a request to report it, no traceback (unless --debug)."""
    import gemmaquant.workflow

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(gemmaquant.workflow, "run_bench", boom)
    r = runner.invoke(app, ["bench", F])
    assert r.exit_code == 1 and "internal error: ZeroDivisionError" in r.output and "bug" in r.output
    assert "Traceback" not in r.output and "report" in r.output
    r = runner.invoke(app, ["--debug", "bench", F])
    assert isinstance(r.exception, ZeroDivisionError)
