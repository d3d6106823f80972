"""A GGUF file's tensor table and scalar metadata without materialising its arrays.

gguf-py's GGUFReader builds a numpy view for every part of every metadata value: on a Gemma 4 file the 262,144
vocabulary strings, scores and token types alone take it about 10 s. Sizes (`file_bits`, the summary line of every
`quantize`) and the `gemmaquant.*` keys need none of that, so this reads the header as the format defines it
(ggml/docs/gguf.md, little-endian):

    magic "GGUF" | u32 version (2, 3) | u64 n_tensors | u64 n_kv
    n_kv x       (string key, u32 value type, value)         string = u64 length + UTF-8 bytes
                 array value = u32 element type + u64 count + elements
    n_tensors x  (string name, u32 n_dims, u64 x n_dims ne (ne0 first), u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to its start

Arrays are stepped over (strings by their lengths) and kept as their element count. Anything that does not parse,
or a tensor whose bytes lie outside the file, is a GGUFFormatError naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from gemmaquant.export.gguf_reader import GGUFFormatError

# GGUF metadata value types -> struct format of one element (8: string, 9: array are read apart)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str          # ggml type name: Q4_K, F32, ...
    shape: list[int]   # PyTorch order (the reverse of GGUF's ne)
    n_elements: int
    n_bytes: int
    offset: int        # absolute, in the file


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError(f"{self.path}: the header ends at byte {len(self.buf)} (truncated)")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"{self.path}: a {n}-byte string runs past the end of the file (truncated)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                for _ in range(count):
                    n = self.take("<Q")  # the length, then step over the bytes
                    self.pos += n
            elif etype in _SCALAR:
                self.pos += count * struct.calcsize(_SCALAR[etype])
            else:
                raise GGUFFormatError(f"{self.path}: metadata array of unknown element type {etype}")
            if self.pos > len(self.buf):
                raise GGUFFormatError(f"{self.path}: a {count}-element array runs past the end of the file (truncated)")
            return count
        if vtype not in _SCALAR:
            raise GGUFFormatError(f"{self.path}: metadata value of unknown type {vtype}")
        return self.take(_SCALAR[vtype])


def read_header(path: str | os.PathLike) -> tuple[dict, list[TensorInfo]]:
    """(metadata: key -> scalar, string, or an array's element count; tensors in file order) of a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"{path}: {'a directory' if path.is_dir() else 'no such file'}, expected a GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"{path}: {size} bytes, too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, path)
        if bytes(buf[:4]) != b"GGUF":
            raise GGUFFormatError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        c.pos = 4
        version = c.take("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version}, expected 2 or 3")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.take("<I"))
        raw = []
        for _ in range(n_tensors):
            name = c.string()
            ne = [c.take("<Q") for _ in range(c.take("<I"))]
            raw.append((name, ne, c.take("<I"), c.take("<Q")))
        align = int(meta.get("general.alignment", 32))
        data_start = (c.pos + align - 1) // align * align
    tensors = []
    for name, ne, gtype, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(gtype)
        except ValueError:
            raise GGUFFormatError(f"{path}: tensor {name} has unknown ggml type {gtype}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for d in ne:
            n *= d
        n_bytes = n // block * type_size
        if ne and ne[0] % block:
            raise GGUFFormatError(f"{path}: tensor {name} has rows of {ne[0]}, not a multiple of {qtype.name}'s "
                                  f"{block}-weight block")
        if data_start + offset + n_bytes > size:
            raise GGUFFormatError(f"{path}: tensor {name} ({n_bytes} bytes at offset {data_start + offset}) lies "
                                  f"outside the {size}-byte file (truncated)")
        tensors.append(TensorInfo(name, qtype.name, list(reversed(ne)), n, n_bytes, data_start + offset))
    return meta, tensors
