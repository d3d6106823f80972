"""The repository's kernels/ folder must not shadow the `kernels` package on PyPI.

From a clone's root (pytest, `python -m`), kernels/ is importable as a top-level `kernels`. transformers >= 5.25
installs Hugging Face's `kernels` package and imports it (`from kernels import CUDAProperties`), so the folder
hands that import over to the installed package (kernels/__init__.py). A stand-in package plays the PyPI one here.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_from_root(tmp_path, code):
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    # -c puts the working directory (the repository root) first on sys.path, ahead of PYTHONPATH.
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_top_level_kernels_is_the_installed_package(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed kernels package'\n")
    code = ("import sys; print(sys.path[0] == ''); from kernels import CUDAProperties; "
            "print(CUDAProperties == 'the installed kernels package')")
    assert _import_from_root(tmp_path, code) == ["True", "True"]


def test_gemmaquant_kernels_is_still_ours(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    code = ("import kernels, gemmaquant.kernels.int4_matmul as m; print(kernels.__file__.startswith(%r)); "
            "print(hasattr(m, 'int4_matmul_ref'))" % str(tmp_path))
    assert _import_from_root(tmp_path, code) == ["True", "True"]
