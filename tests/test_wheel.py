"""The built wheel, installed as a user installs it (not the editable checkout the other tests import): it holds
every module and data file, builds without setuptools warnings, and runs `gemmaquant qat` and a QAT step.

Nothing is downloaded: the wheel is built with this environment's setuptools (no build isolation), installed with
--no-deps into a fresh venv, and that venv reaches this environment's dependencies (torch, ...) through a .pth
line, which adds the directory without running the .pth files in it (the editable install's hook stays off).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "out", "*.egg-info", "__pycache__", ".pytest_cache",
                              "tests", "benchmarks", "docs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(wheel path, the build's stderr), built from a clean copy of the tree (no stale build/ files)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    p = subprocess.run([sys.executable, "-c", "import sys; from setuptools.build_meta import build_wheel; "
                        "print(build_wheel(sys.argv[1]))", str(tmp / "dist")],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "dist" / p.stdout.strip().splitlines()[-1], p.stderr


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed; its bin directory."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    site = Path(subprocess.run([env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q",
                        "--no-deps", "--no-index", str(wheel[0])], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return env_dir / "bin"


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel[0]).namelist())
    expected = [f"gemmaquant/{p.relative_to(ROOT / 'gemmaquant')}" for p in (ROOT / "gemmaquant").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    expected += [f"gemmaquant/kernels/{p.relative_to(ROOT / 'kernels')}" for p in (ROOT / "kernels").rglob("*.py")]
    expected += [f"gemmaquant/recipes/{p.relative_to(ROOT / 'recipes')}" for p in (ROOT / "recipes").rglob("*.toml")]
    missing = sorted(n for n in expected if n not in names and not n.endswith(".md"))
    assert not missing, f"{len(missing)} files of the tree are not in the wheel, e.g. {missing[:5]}"
    assert "gemmaquant/qat/train.py" in names


def test_wheel_builds_without_setuptools_warnings(wheel):
    stderr = wheel[1]
    assert "Package would be ignored" not in stderr, stderr[-2000:]
    assert "project.license" not in stderr and "SetuptoolsDeprecationWarning" not in stderr, stderr[-2000:]


def test_installed_wheel_runs_qat(venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    p = subprocess.run([venv / "gemmaquant", "qat", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "--steps" in p.stdout, p.stdout + p.stderr
    script = """
import sys
import gemmaquant
from gemmaquant.qat import qat_train
assert gemmaquant.__file__.startswith(sys.prefix), gemmaquant.__file__  # the wheel's copy, not the checkout's
rep = qat_train("tiny-dense", data=sys.argv[1], steps=1, out="qat", batch_size=2, seq_len=32, calib_samples=2,
                calib_seq_len=32, eval_seqs=0, progress=False)
print(rep["files"]["gguf"])
"""
    data = ROOT / "gemmaquant" / "calibration" / "data" / "train.txt"
    p = subprocess.run([venv / "python", "-c", script, str(data)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / p.stdout.strip().splitlines()[-1]).is_file()
