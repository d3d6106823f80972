"""The steps after the layers (each export, the evaluation, the report), resumable: `work/steps.json`.

    steps.json   step -> {"key":     what the step's output depends on (file names, types, the inputs' hashes),
                          "outputs": {path relative to out: {sha256, size, stat}}}

A step is complete when its record exists, its key is this run's, and every file it recorded is there with the
recorded bytes and nothing else is under an output directory it wrote. A file whose stat is unchanged is trusted;
otherwise it is re-hashed (the record then takes its new stat). A step writes its files atomically and records
itself after them, so a kill in between only costs the step again, and it writes the same bytes.

When every step is done, the work directory is pruned to its records (state.json, source.json, layers.json,
steps.json, eval.json: kilobytes), so that a rerun of the same command recognises the directory as its own and
finished. A step found incomplete after that needs the layers again, which are recomputed from the first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from gemmaquant.fingerprint import RACY_NS, STAT_KEYS, file_stat
from gemmaquant.quantized import read_record, write_json_atomic

STEPS_FILE = "steps.json"
WRITE_TEST = ".gemmaquant-write-test"
PRUNED = ("acts_*.safetensors", "layer_*.safetensors", "layer_*.json", "globals.safetensors", ".*.tmp")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _files_under(out: Path, rel: str) -> list[str]:
    p = out / rel
    if p.is_dir():
        return sorted(str(f.relative_to(out)) for f in p.rglob("*") if f.is_file())
    return [rel] if p.is_file() else []


class Steps:
    """The step records of the work directory `out/<WORK_DIR>`."""

    def __init__(self, out: str | Path):
        from gemmaquant.quantize import WORK_DIR

        self.out = Path(out)
        self.path = self.out / WORK_DIR / STEPS_FILE
        self.data: dict[str, dict] = read_record(self.path, {})

    def complete(self, step: str, key: dict) -> bool:
        rec = self.data.get(step)
        if rec is None or rec["key"] != key:
            return False
        files = [f for rel in rec["roots"] for f in _files_under(self.out, rel)]
        if sorted(files) != sorted(rec["outputs"]):
            return False
        refreshed = False
        for rel, want in rec["outputs"].items():
            now = file_stat(self.out / rel)
            if want["mtime_ns"] < want["seen_ns"] - RACY_NS and all(want[k] == now[k] for k in STAT_KEYS):
                continue
            if now["size"] != want["size"] or sha256_file(self.out / rel) != want["sha256"]:
                return False
            rec["outputs"][rel] = {**now, "sha256": want["sha256"]}
            refreshed = True
        if refreshed:
            self._save()
        return True

    def record(self, step: str, key: dict, roots: list[str]) -> None:
        """Record `step` as done with `key`; `roots`: its outputs (files or directories) relative to out."""
        outputs = {}
        for rel in [f for r in roots for f in _files_under(self.out, r)]:
            stat = file_stat(self.out / rel)  # before hashing: a write after it shows in the stat next time
            outputs[rel] = {**stat, "sha256": sha256_file(self.out / rel)}
        self.data[step] = {"key": key, "roots": list(roots), "outputs": outputs}
        self._save()

    def sha256(self, step: str) -> str:
        """One hash of everything `step` wrote (its recorded outputs), to key the steps that read them."""
        outputs = self.data[step]["outputs"]
        return hashlib.sha256(json.dumps({k: v["sha256"] for k, v in sorted(outputs.items())}).encode()).hexdigest()

    def roots(self) -> set[str]:
        """Top-level names in out that recorded steps wrote."""
        return {Path(r).parts[0] for rec in self.data.values() for r in rec["roots"]}

    def _save(self) -> None:
        write_json_atomic(self.data, self.path)


def is_leftover(entry: str, names: set[str]) -> bool:
    """A temporary file or directory an interrupted step left in out: `.<output name>.tmp...` (the exporters'
    and the report's temporary names) or the writability probe."""
    return entry == WRITE_TEST or any(entry.startswith(f".{n}.tmp") for n in names)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prune_layers(work: Path) -> None:
    """Delete the layer files, activations and globals of `work` (what the exports were made from), keeping the
    records. A kill half-way leaves records and some layer files, which `quantize` treats as pruned."""
    for pattern in PRUNED:
        for p in sorted(Path(work).glob(pattern)):
            p.unlink(missing_ok=True)
