"""What a new user meets first: the set-up the README describes, the names `variants` lists, the error without
weights, `gemmaquant.qat` after `import gemmaquant`, and the README's library example that writes the GGUF."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemmaquant.cli import app
from gemmaquant.workflow import list_variants

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
runner = CliRunner()


def test_python_version_is_the_same_in_readme_and_pyproject():
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    stated = re.search(r"Python (3\.\d+)\+", README).group(1)
    assert required == f">={stated}", (required, stated)


def test_readme_says_how_to_reach_the_command():
    quick = README[README.index("## Quick start"):README.index("## Use")]
    assert "source .venv/bin/activate" in quick and "TORCH_INDEX=" in quick


@pytest.mark.parametrize("index", ["", "https://download.pytorch.org/whl/cpu"])
def test_makefile_torch_index_is_optional(index, tmp_path):
    args = ["make", "-n", "-C", str(ROOT), "setup", f"VENV={tmp_path / 'venv'}", f"TORCH_INDEX={index}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "torch==" in x).rstrip()
    assert line.endswith("install -q torch==2.13.0" + (f" --index-url {index}" if index else "")), line


def test_no_weights_leaves_nothing_and_names_the_current_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = runner.invoke(app, ["quantize", "e2b", "--out", str(tmp_path / "e2b-out")])
    assert r.exit_code == 2 and "hf download google/gemma-4-E2B-it" in r.output, r.output
    assert "huggingface-cli" not in r.output
    assert not (tmp_path / "e2b-out").exists()


def test_every_listed_name_is_accepted():
    res = list_variants()
    names = [v["name"] for v in res["variants"]]
    assert names == ["e2b", "e4b", "26b-a4b", "31b", "tiny-dense", "tiny-moe", "tiny-edge"]
    for v in res["variants"]:
        r = runner.invoke(app, ["quantize", v["name"], "--dry-run", "--json"])
        assert r.exit_code == 0, (v["name"], r.output)
        assert (v["path"] is None) == (v["hf_repo"] is not None)
        if v["path"]:
            assert (Path(v["path"]) / "config.json").is_file() and v["path"] in res["text"]


def test_qat_is_reachable_after_import_gemmaquant():
    p = subprocess.run([sys.executable, "-c", "import gemmaquant; print(gemmaquant.qat.prepare_qat.__name__)"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "prepare_qat", p.stderr[-2000:]


def test_readme_library_example_writes_the_files(tmp_path):
    import gemmaquant as gq
    from gemmaquant.export.inspect import file_bits

    recipe = gq.Recipe.from_dict({"method": "rtn", "n_samples": 2, "seq_len": 32})
    result = gq.quantize("tiny-dense", recipe, out=tmp_path / "out/26b-int4", progress=False)
    block = README[README.index("from gemmaquant.export import"):]
    block = block[:block.index("\n\n")]  # the export lines of the README's example, run as they are written
    exec(block.replace('"out/', f'"{tmp_path}/out/'), {"result": result})
    assert file_bits(tmp_path / "out/26b-int4/26b-a4b-Q4_0.gguf")["weights"] > 0
    assert (tmp_path / "out/26b-int4/safetensors/config.json").is_file()
