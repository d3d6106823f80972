"""Deterministic safetensors files: the same tensors and metadata give the same bytes every time (the library's
own `__metadata__` order comes from a Rust HashMap, reseeded per map, so it changes from one call to the next even
inside one process), and files get the usual permissions."""

import os
import stat

import safetensors.torch
import torch
from safetensors import safe_open

from gemmaquant.safetensors_write import save_file

META = {**{f"gemmaquant.key{i}": "v" * i for i in range(12)}, "format": "pt"}
TENSORS = {"a": torch.arange(6, dtype=torch.bfloat16), "b": torch.ones(3, dtype=torch.int64)}


def _bytes(writer, path, n=5):
    out = set()
    for _ in range(n):
        writer(TENSORS, str(path), metadata=META)
        out.add(path.read_bytes())
    return out


def test_same_input_same_bytes(tmp_path):
    f = tmp_path / "x.safetensors"
    assert len(_bytes(save_file, f)) == 1
    with safe_open(str(f), framework="pt") as g:
        assert g.metadata() == META
        assert torch.equal(g.get_tensor("a"), TENSORS["a"]) and torch.equal(g.get_tensor("b"), TENSORS["b"])


def test_the_library_alone_is_not_deterministic(tmp_path):
    """Why this module exists: if this starts to fail, safetensors sorts its metadata and the rewrite can go."""
    assert len(_bytes(safetensors.torch.save_file, tmp_path / "y.safetensors")) > 1


def test_header_keys_sorted_and_mode_follows_umask(tmp_path):
    f = tmp_path / "x.safetensors"
    old = os.umask(0o022)
    try:
        save_file({"t": torch.zeros(2)}, f, metadata={"z": "1", "a": "2", "m": "3"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644  # the library alone creates 0600
    n = int.from_bytes(f.read_bytes()[:8], "little")
    header = f.read_bytes()[8:8 + n].decode()
    assert header.index('"a"') < header.index('"m"') < header.index('"z"')
