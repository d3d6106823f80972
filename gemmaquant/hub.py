"""Resolve a model argument (an alias or a local path) to a local checkpoint directory or file.

Aliases: the four released variants resolve to their Hugging Face repositories, looked up in the local
Hugging Face cache (HF_HOME / HF_HUB_CACHE); the bundled tiny fixtures resolve to package data.
Nothing is downloaded implicitly: when the weights are not cached, the error says where we looked and how to
fetch them.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemmaquant.config import HF_REPOS
from gemmaquant.errors import GemmaquantError


class ModelNotFound(GemmaquantError, FileNotFoundError):
    pass


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def fixture_names() -> list[str]:
    from gemmaquant.fixtures import FIXTURES

    return list(FIXTURES)


def aliases() -> list[str]:
    return [*HF_REPOS, *fixture_names()]


def resolve(model: str | os.PathLike) -> Path:
    """Alias or path -> an existing local path (checkpoint directory, GGUF file, ...)."""
    p = Path(model)
    if p.exists():
        return p
    name = str(model)
    if name in fixture_names():
        from gemmaquant.fixtures import fixture_path

        return Path(fixture_path(name))
    if name in HF_REPOS:
        repo = HF_REPOS[name]
        snaps = hf_cache_dir() / f"models--{repo.replace('/', '--')}" / "snapshots"
        found = sorted(snaps.glob("*/config.json"), key=lambda f: f.stat().st_mtime) if snaps.is_dir() else []
        if found:
            return found[-1].parent
        raise ModelNotFound(f"weights for {name!r} ({repo}) are not in the Hugging Face cache (looked in {snaps}); "
                            f"get them with `hf download {repo}` (huggingface_hub's CLI; needs network access and the "
                            f"Gemma license accepted), or pass a local checkpoint directory")
    if os.sep in name or name.startswith("."):
        raise ModelNotFound(f"{name}: no such file or directory")
    raise ModelNotFound(f"unknown model {name!r}: not a local path, and not one of the aliases "
                        f"{', '.join(aliases())}")
