"""The quantizer's own on-disk state: one safetensors file per finished layer, written atomically, from which
a run resumes and from which the exporters read (`QuantizedSource`).

    work/
      state.json              recipe, source, calibration hash, config; the fingerprint a resume must match
      globals.safetensors     embeddings, final norm, PLE tables (float, as the recipe keeps them)
      layer_00007.safetensors one layer: float tensors under their names; a quantized weight `W` as
                              `W::<key>` for every key of its Packed data (expert tensors: stacked over experts);
                              int32 `codes` whose values fit a byte are stored as uint8 / int8 (the format's
                              metadata says which) and read back as int32
      layer_00007.json        its formats, coverage (tokens per expert), weight SQNR per tensor
      acts_00008.safetensors  calibration activations entering the next layer (+ shared K/V), for resume
Every file is written to a temporary name and renamed, so a kill at any point leaves a consistent state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from gemmaquant.config import Gemma4Config
from gemmaquant.errors import GemmaquantError
from gemmaquant.formats.base import Packed
from gemmaquant.safetensors_write import save_file

Quantized = Packed | list  # a 2-D Packed, or one Packed per expert for fused [E, N, K] expert tensors


def format_spec(fmt) -> dict:
    fields = {}
    for f in dataclasses.fields(fmt):
        v = getattr(fmt, f.name)
        fields[f.name] = str(v) if isinstance(v, torch.dtype) else v
    return {"class": type(fmt).__name__, "fields": fields}


def format_from_spec(spec: dict):
    import gemmaquant.formats as formats

    cls = getattr(formats, spec["class"])
    kw = {k: (getattr(torch, v.removeprefix("torch.")) if isinstance(v, str) and v.startswith("torch.") else v)
          for k, v in spec["fields"].items()}
    return cls(**kw)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class DamagedWorkDir(GemmaquantError):
    """A record or layer file of a work directory that cannot be read: it was not written by gemmaquant (every
    write is atomic), so it was changed or damaged afterwards; resuming from it is refused."""


def damaged_work_file(path: Path, why: str) -> DamagedWorkDir:
    return DamagedWorkDir(f"{path}: damaged ({why}); the run cannot resume from this work directory: run the same "
                          f"command with --overwrite to start again (or remove {path.parent})")


def read_record(path: Path, default=None):
    """A JSON record of the work directory (state, layers, steps, source fingerprint); `default` when absent."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged_work_file(path, f"not the JSON gemmaquant wrote: {e}") from None
    if default is not None and type(rec) is not type(default):
        raise damaged_work_file(path, f"a JSON {type(rec).__name__} where gemmaquant writes a {type(default).__name__}")
    return rec


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_layer(work: Path, i: int, values: dict[str, torch.Tensor | Quantized], info: dict) -> None:
    tensors, formats = {}, {}
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            tensors[name] = v
            continue
        packs = v if isinstance(v, list) else [v]
        formats[name] = {"format": format_spec(packs[0].fmt), "shape": list(packs[0].shape),
                         "experts": len(packs) if isinstance(v, list) else 0}
        for key in packs[0].data:
            stacked = torch.stack([p.data[key] for p in packs]) if isinstance(v, list) else packs[0].data[key]
            if key == "codes" and stacked.dtype == torch.int32:
                stacked, narrow = _narrow(stacked)
                if narrow is not None:
                    formats[name]["codes_dtype"] = narrow
            tensors[f"{name}::{key}"] = stacked
    save_atomic(tensors, work / f"layer_{i:05d}.safetensors", {"formats": json.dumps(formats)})
    write_json_atomic({**info, "formats": {n: f["format"] for n, f in formats.items()}}, work / f"layer_{i:05d}.json")


def _narrow(codes: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """int32 codes as uint8 or int8 when every value fits (a quarter of the bytes to write and read back)."""
    if codes.numel() == 0:
        return codes, None
    lo, hi = (int(v) for v in torch.aminmax(codes))
    for dtype, name, (a, b) in ((torch.uint8, "uint8", (0, 255)), (torch.int8, "int8", (-128, 127))):
        if a <= lo and hi <= b:
            return codes.to(dtype), name
    return codes, None


def read_values(path: Path) -> dict[str, torch.Tensor | Quantized]:
    try:
        with safe_open(str(path), framework="pt") as f:
            formats = json.loads((f.metadata() or {}).get("formats", "{}"))
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for a damaged header or body)
        raise damaged_work_file(Path(path), f"{type(e).__name__}: {e}") from None
    out: dict = {k: v for k, v in raw.items() if "::" not in k}
    for name, spec in formats.items():
        fmt = format_from_spec(spec["format"])
        data = {k.split("::", 1)[1]: v for k, v in raw.items() if k.startswith(name + "::")}
        if spec.get("codes_dtype"):  # stored narrow (save_layer): Packed codes are int32
            data["codes"] = data["codes"].to(torch.int32)
        shape = tuple(spec["shape"])
        if spec["experts"]:
            out[name] = [Packed(fmt, shape, {k: v[e] for k, v in data.items()}) for e in range(spec["experts"])]
        else:
            out[name] = Packed(fmt, shape, data)
    return out


def dequantize_value(v: torch.Tensor | Quantized) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, list):
        return torch.stack([p.fmt.dequantize(p) for p in v])
    return v.fmt.dequantize(v)


def finished_layers(work: Path) -> int:
    """Number of consecutive finished layers (a layer is finished when its .json, written last, exists)."""
    i = 0
    while (work / f"layer_{i:05d}.json").is_file() and (work / f"layer_{i:05d}.safetensors").is_file():
        i += 1
    return i


class QuantizedSource:
    """The exporters' view of a finished work directory (see gemmaquant.export: names() / get(name))."""

    def __init__(self, work: str | os.PathLike):
        self.work = Path(work)
        state = read_record(self.work / "state.json", {})
        self.config = Gemma4Config.from_hf_dict(state["config"])
        self.source_dir = Path(state["source_dir"]) if state.get("source_dir") else None
        # work directories written before the keys lost their prefix held "gemmaquant.recipe", ...
        self.metadata = {k.removeprefix("gemmaquant."): str(v) for k, v in state["metadata"].items()}
        self._globals = read_values(self.work / "globals.safetensors")
        self._layer_cache: tuple[int, dict] | None = None

    def names(self) -> list[str]:
        from gemmaquant.checkpoint import expected_shapes

        return list(expected_shapes(self.config))

    def _layer(self, i: int) -> dict:
        if self._layer_cache is None or self._layer_cache[0] != i:  # exporters walk layer by layer: keep one
            self._layer_cache = (i, read_values(self.work / f"layer_{i:05d}.safetensors"))
        return self._layer_cache[1]

    def get(self, name: str):
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            return self._layer(int(i))[rest]
        return self._globals[name]

    def dequantized_state(self) -> dict[str, torch.Tensor]:
        return {n: dequantize_value(self.get(n)) for n in self.names()}
