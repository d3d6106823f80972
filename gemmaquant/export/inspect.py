"""`gemmaquant inspect FILE`: what a GGUF file or a compressed-tensors / safetensors directory holds: every tensor's
type, shape, size and bits per weight, totals per type, and the metadata (hyperparameters, recipe, tokenizer).

    print(inspect_file("model-Q4_K_M.gguf"))          # or a directory, or one .safetensors file
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from gemmaquant.checkpoint import DTYPE_BYTES, read_json
from gemmaquant.export.errors import ExportError


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(rows: list[tuple], header: tuple) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*map(str, r)) for r in rows)]


def _summary(per_type: dict[str, list[int]], total_w: int, total_b: int) -> list[str]:
    rows = [(t, f"{n:,}", _size(b), f"{8 * b / max(n, 1):.2f}") for t, (n, b) in sorted(per_type.items())]
    # the file's bits per weight (file_bits), to the three decimals the dry run and the report print
    rows.append(("total", f"{total_w:,}", _size(total_b), f"{8 * total_b / max(total_w, 1):.3f}"))
    return _table(rows, ("type", "weights", "size", "bits/weight"))


def inspect_gguf(path: Path) -> str:
    from gemmaquant.export.gguf_reader import open_gguf

    r = open_gguf(path)
    lines = [f"{path}: GGUF v{r.fields['GGUF.version'].contents()}, {len(r.tensors)} tensors, "
             f"{_size(path.stat().st_size)}",
             "", "metadata:"]
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        if isinstance(v, list) and len(v) > 8:
            v = f"[{len(v)} items: {', '.join(repr(x)[:40] for x in v[:3])}, ...]"
        elif isinstance(v, str) and (len(v) > 100 or "\n" in v):
            v = f"{v.splitlines()[0][:60]!r}... ({len(v)} chars)"
        lines.append(f"  {k} = {v}")
    rows, per_type = [], defaultdict(lambda: [0, 0])
    for name, kind, shape, n, b in _gguf_tensors(r):
        rows.append((name, kind, "x".join(map(str, shape)), _size(b), f"{8 * b / max(n, 1):.2f}"))
        per_type[kind][0] += n
        per_type[kind][1] += b
    lines += ["", "tensors (shape in PyTorch order):"]
    lines += ["  " + x for x in _table(rows, ("name", "type", "shape", "size", "bits/weight"))]
    lines += ["", "by type:"] + ["  " + x for x in _summary(per_type, sum(v[0] for v in per_type.values()),
                                                           sum(v[1] for v in per_type.values()))]
    return "\n".join(lines)


def _gguf_tensors(r) -> list[tuple[str, str, list[int], int, int]]:
    """(name, type, shape in PyTorch order, weights, bytes) of every tensor of a gguf.GGUFReader."""
    return [(t.name, t.tensor_type.name, list(reversed([int(x) for x in t.shape])), int(t.n_elements),
             int(t.n_bytes)) for t in r.tensors]


def _safetensors_headers(files: list[Path]) -> dict[str, dict]:
    """name -> {dtype, shape, file, metadata} over safetensors files, each header checked against its file's
    length (a truncated file is refused, not listed)."""
    from gemmaquant.checkpoint import read_safetensors_header

    out = {}
    for f in files:
        header = read_safetensors_header(f)
        for name, info in header["tensors"].items():
            out[name] = {"dtype": info["dtype_name"], "shape": info["shape"], "file": f.name,
                         "metadata": header["metadata"]}
    return out


def inspect_dir(path: Path, files: list[Path] | None = None) -> str:
    """A checkpoint directory's safetensors files (or only `files` of it) with its config's quantization."""
    from gemmaquant.export.compressed_tensors_reader import quantization_config

    cfg = read_json(path / "config.json", "config") if (path / "config.json").is_file() else {}
    qc = quantization_config(cfg)
    headers = _safetensors_headers(files if files is not None else sorted(path.glob("*.safetensors")))
    if not headers:
        raise ExportError(f"{path}: no *.safetensors files")
    if files is not None:
        path = files[0]
    lines = [f"{path}: safetensors, {len(headers)} tensors in {len({h['file'] for h in headers.values()})} file(s)"]
    for group in (qc or {}).get("config_groups", {}).values():  # one per scheme (a per-layer mix has several)
        g = group.get("weights", {})
        lines.append(f"quantization: {qc.get('quant_method')} / {qc.get('format')}, {g.get('num_bits')}-bit "
                     f"{'symmetric' if g.get('symmetric') else 'asymmetric'} {g.get('type')}, strategy "
                     f"{g.get('strategy')}, group_size {g.get('group_size')}; targets {group.get('targets')}")
    if qc:
        lines.append(f"ignore: {qc.get('ignore')}")
    meta = next(iter(headers.values()))["metadata"]
    if meta:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
    rows, per_type = [], defaultdict(lambda: [0, 0])
    for name, kind, shape, n, nbytes in _safetensors_tensors(headers, qc):
        rows.append((name, kind, "x".join(map(str, shape)) or "scalar", _size(nbytes),
                     f"{8 * nbytes / max(n, 1):.2f}"))
        per_type[kind][0] += n
        per_type[kind][1] += nbytes
    lines += ["", "tensors:"] + ["  " + x for x in _table(rows, ("name", "type", "shape", "size", "bits/weight"))]
    lines += ["", "by type:"] + ["  " + x for x in _summary(per_type, sum(v[0] for v in per_type.values()),
                                                           sum(v[1] for v in per_type.values()))]
    return "\n".join(lines)


def _safetensors_tensors(headers: dict[str, dict], qc: dict | None) -> list[tuple[str, str, list[int], int, int]]:
    """(name, type, shape, weights, bytes) of every weight of a safetensors checkpoint; a compressed-tensors
    module (weight_packed + weight_scale + weight_shape) is one weight of its unpacked shape."""
    modules: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, h in headers.items():
        base, _, leaf = name.rpartition(".")
        if leaf in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            modules[base][leaf] = h
        else:
            modules[name][""] = h
    from gemmaquant.export.ct_targets import scheme_of

    rows = []
    for base, parts in sorted(modules.items()):
        bits = (scheme_of(qc, base) or {}).get("num_bits") if qc else None  # a per-layer mix: each module its own
        if "weight_packed" in parts and "weight_scale" in parts and bits in (4, 8) and \
                len(parts["weight_packed"]["shape"]) == 2:
            packed = parts["weight_packed"]["shape"]
            entries = [(base + ".weight", f"int{bits}+{parts['weight_scale']['dtype'].lower()} scale",
                        [packed[0], packed[1] * 32 // bits], parts.values())]
        else:  # a plain tensor, or the parts of a packed one that cannot be read as one (listed as they are)
            entries = [(f"{base}.{leaf}" if leaf else base, h["dtype"], h["shape"], [h]) for leaf, h in parts.items()]
        for name, kind, shape, stored in entries:
            nbytes = sum(int(np.prod(h["shape"])) * DTYPE_BYTES.get(h["dtype"], 1) for h in stored)
            rows.append((name, kind, list(shape), int(np.prod(shape)) if shape else 1, nbytes))
    return rows


def file_bits(path: str | os.PathLike) -> dict:
    """{"weights", "bytes", "bits_per_weight"} of a written GGUF file or safetensors directory: every tensor's
    bytes (scales, norms, rope_freqs included; headers not) times 8 over its weights, the "total" row of
    `gemmaquant inspect` and the figure the dry run predicts (gemmaquant.export.sizes)."""
    from gemmaquant.export.compressed_tensors_reader import quantization_config

    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from gemmaquant.export.gguf_header import read_header

        rows = [(t.name, t.type, t.shape, t.n_elements, t.n_bytes) for t in read_header(p)[1]]
    elif p.is_dir():
        cfg = read_json(p / "config.json", "config") if (p / "config.json").is_file() else {}
        headers = _safetensors_headers(sorted(p.glob("*.safetensors")))
        if not headers:
            raise ExportError(f"{p}: no *.safetensors files")
        rows = _safetensors_tensors(headers, quantization_config(cfg))
    else:
        raise ExportError(f"{p}: expected a .gguf file or a safetensors directory")
    n, b = sum(r[3] for r in rows), sum(r[4] for r in rows)
    return {"weights": n, "bytes": b, "bits_per_weight": 8 * b / max(n, 1)}


def inspect_file(path: str | os.PathLike) -> str:
    """A human-readable report of a GGUF file or a (compressed-tensors) safetensors checkpoint directory."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return inspect_gguf(p)
    if p.is_dir():
        return inspect_dir(p)
    if p.is_file() and p.suffix == ".safetensors":
        return inspect_dir(p.parent, [p])
    raise ExportError(f"{p}: expected a .gguf or .safetensors file or a checkpoint directory")
