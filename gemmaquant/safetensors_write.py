"""`save_file` for safetensors that writes the same bytes in every process, with the usual file permissions.

The safetensors library keeps `__metadata__` in a Rust HashMap, whose iteration order is seeded per process: two
runs that write the same tensors and the same metadata produce headers with the keys in different orders (the
tensor entries and data are already in a fixed order). Here the header is rewritten with the metadata keys sorted;
the JSON has the same characters, so the same length, and the data does not move. The library also creates its
files with mode 0600; a written file gets 0666 minus the umask, as `open()` would give it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file as _save_file

from gemmaquant.errors import GemmaquantError


class HeaderError(GemmaquantError, ValueError):
    """The safetensors library wrote a header this module cannot reorder (names the file)."""


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (+ `metadata`) to `path` exactly as safetensors does, except that the metadata keys are in
    sorted order, so equal inputs give equal bytes. Not atomic: write to a temporary name and rename."""
    path = Path(path)
    _save_file(tensors, str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        sort_metadata(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def sort_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file `path` in place with its `__metadata__` keys sorted."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        text = raw.decode("utf-8")
        header = json.loads(text)  # dicts keep the file's order: tensor entries stay where they are
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        if next(iter(header)) != "__metadata__":  # keep the library's layout: metadata first
            header = {"__metadata__": header.pop("__metadata__"), **header}
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        body = text.rstrip(" ").encode("utf-8")  # the library pads the header with spaces to 8 bytes
        if len(new) != len(body):
            raise HeaderError(f"{path}: reordered safetensors header is {len(new)} bytes, the original "
                              f"{len(body)}; not rewritten")
        f.seek(8)
        f.write(new)
