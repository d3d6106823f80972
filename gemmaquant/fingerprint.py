"""What a work directory was computed from: a fingerprint of the source weights, `work/source.json`.

    tensors  name -> {file, sha256}   sha256 of each tensor's bytes (dtype and shape included), hashed when the
                                      quantizer reads it for its layer: the bytes are in memory then, so it costs
                                      one pass of SHA-256 (about 1-2 GB/s a core), nothing extra from disk
    files    shard -> os.stat         size, mtime, ctime, inode, device of every shard, taken before this run read
                                      anything, and when it was taken

A resumed run (or a rerun of a finished one) checks the tensors its finished layers were computed from. A shard
whose stat is unchanged is trusted, so the common resume costs one stat per shard. Any write to a file changes its
mtime and ctime (ctime cannot be set from user space), and a replaced file has another inode, so a shard whose stat
differs is re-read and its recorded tensors re-hashed: a shard merely touched or copied passes, a changed weight is
refused with the tensor's name. (Header hashes and sampled bytes would be cheaper to re-check but miss a change
between the samples; hashing at read time makes the exact check free, and it is only paid when a stat changed.)
A stat whose mtime lies within RACY_NS of when it was taken is not trusted: a write in the same clock tick could
leave the mtime as it was (git's "racily clean" index entries).

A model object given to `quantize` has no files: its recorded tensors are always re-hashed (from memory).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from gemmaquant.errors import GemmaquantError

from gemmaquant.quantized import read_record, write_json_atomic

RECORD = "source.json"
RACY_NS = 2_000_000_000
STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")


class SourceChanged(GemmaquantError, ValueError):
    """The source's weights differ from those a work directory was computed from (names file and tensor)."""


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (CPU copy for other devices)."""
    t = t.detach()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def file_stat(path: Path) -> dict:
    seen = time.time_ns()
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev, "seen_ns": seen}


class SourceFingerprint:
    """The fingerprint record of `work` for the source `src` (a Checkpoint, or the quantizer's ModuleSource)."""

    def __init__(self, work: Path, src):
        self.work, self.src = Path(work), src
        self.path = self.work / RECORD
        rec = read_record(self.path, {})
        self.tensors: dict[str, dict] = rec.get("tensors", {})
        self.files: dict[str, dict] = rec.get("files", {})
        self.root = Path(src.path) if hasattr(src, "weight_map") else None  # a Checkpoint: shards on disk
        # before anything is read: a shard written while this run reads it then differs from this stat next time
        self.now = {f: file_stat(self.root / f) for f in sorted(set(src.weight_map.values()))} if self.root else {}

    def _file(self, name: str) -> str | None:
        return self.src.weight_map.get(self.src.full_name(name)) if self.root else None

    def _trusted(self, file: str | None) -> bool:
        old, new = self.files.get(file), self.now.get(file)
        if old is None or new is None or old["mtime_ns"] >= old["seen_ns"] - RACY_NS:
            return False
        return all(old[k] == new[k] for k in STAT_KEYS)

    def verify(self, done_layers: int, globals_done: bool) -> None:
        """Check the recorded tensors of layers 0..done_layers-1 (and of the globals) against the source now;
        raise SourceChanged at the first that differs. Then record the shards' stats taken at construction."""
        for name, rec in self.tensors.items():
            if name.startswith("layers."):
                if int(name.split(".")[1]) >= done_layers:
                    continue
            elif not globals_done:
                continue
            file = self._file(name)
            if file is not None and file == rec["file"] and self._trusted(file):
                continue
            where = self.root / file if file else (self.root or "the model object")
            try:
                digest = tensor_digest(self.src.get(name))
            except (KeyError, ValueError) as e:
                raise SourceChanged(f"{where}: tensor {name!r} cannot be read any more ({e}); "
                                    f"{self._remedy()}") from None
            if digest != rec["sha256"]:
                raise SourceChanged(f"{where}: tensor {name!r} differs from the weights {self.work} was computed "
                                    f"from (sha256 {rec['sha256'][:12]}..., now {digest[:12]}...); {self._remedy()}")
        self.files = dict(self.now)
        self._save()

    def _remedy(self) -> str:
        return (f"the finished layers would mix old and new weights. Restore the weights, or start over "
                f"(gemmaquant quantize --overwrite, or remove {self.work})")

    def add(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Record the digests of tensors just read (names relative to `prefix`)."""
        for n, t in tensors.items():
            self.tensors[prefix + n] = {"file": self._file(prefix + n), "sha256": tensor_digest(t)}
        self._save()

    def _save(self) -> None:
        write_json_atomic({"files": self.files, "tensors": self.tensors}, self.path)
