"""A tensor source's values as GGUF tensor data: float tensors cast or quantized (RTN) onto a ggml type, `Packed`
values written bit-for-bit in their own block type, and the few gemmaquant grids that *are* a ggml block type
(int4 symmetric group-32 = Q4_0, int8 per channel = Q8_0) repacked losslessly.

Every producer yields the tensor's bytes in row chunks (ggml rows are independent), so a 4.7 GB PLE table is
quantized and written a few dozen MB at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import torch

from gemmaquant.errors import GemmaquantError
from gemmaquant.export.gguf_mix import BLOCK_SIZE, FLOAT_TYPES

CHUNK_BYTES = 64 << 20  # float bytes quantized per step


class PackError(GemmaquantError, ValueError):
    """A value that cannot be stored as asked (type/shape mismatch, overflow, lossy repack)."""


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def row_bytes(type_name: str, ne0: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ggml_type(type_name)]
    if ne0 % block:
        raise PackError(f"type {type_name} stores rows in blocks of {block}; a row of {ne0} does not fit")
    return ne0 // block * size


def tensor_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * row_bytes(type_name, shape[-1])


def gguf_format(type_name: str):
    """The gemmaquant.formats class instance for a ggml block type (Q4_K, Q8_0, ...)."""
    from gemmaquant.formats import get_format

    for key in (type_name, type_name.lower()):
        try:
            return get_format(key)
        except (KeyError, ValueError):
            continue
    raise PackError(f"gemmaquant.formats has no format for GGUF type {type_name}")


def packed_type(p) -> str | None:
    """The ggml type name a Packed value's format writes, or None when the format is not a GGUF block type."""
    t = getattr(p.fmt, "ggml_type", None)
    if t is None:
        return None
    return gguf.GGMLQuantizationType(int(t)).name if not isinstance(t, str) else t.upper()


# ---------------------------------------------------------------------------------------------------------
# producers: each yields contiguous numpy arrays whose bytes, concatenated, are the tensor data


def float_chunks(w: torch.Tensor, type_name: str, name: str, device: torch.device | None = None
                 ) -> Iterator[np.ndarray]:
    """A float tensor as F32 / F16 / BF16 (no rounding beyond the cast) or RTN-quantized to a block type, on
    `device` (None: where w lies); the chunks come back as host arrays."""
    from gemmaquant.formats.base import REFERENCE_CHUNK, ReferenceQuantizer

    rows = w.reshape(-1, w.shape[-1]) if w.ndim > 1 else w.reshape(1, -1)
    step = max(1, CHUNK_BYTES // (rows.shape[1] * 4))
    if type_name not in FLOAT_TYPES:
        row_bytes(type_name, rows.shape[1])  # raises PackError for rows that do not fit the block
        fmt = gguf_format(type_name)
        if isinstance(fmt, ReferenceQuantizer) and (w.device if device is None else torch.device(device)).type == "cpu":
            # the slice the CPU port works on: converted, fitted and packed while it is in cache, no concatenation
            step = max(1, REFERENCE_CHUNK // rows.shape[1])
    for r in range(0, rows.shape[0], step):
        chunk = rows[r:r + step]
        if type_name == "F32":
            yield chunk.float().contiguous().numpy()
        elif type_name == "F16":
            h = chunk.to(torch.float16)
            if not bool(torch.isfinite(h).all()) and bool(torch.isfinite(chunk).all()):
                raise PackError(f"{name}: values beyond the F16 range (max |w| = {chunk.abs().max().item():.4g}); "
                                f"export as BF16 or F32")
            yield h.contiguous().numpy()
        elif type_name == "BF16":
            yield chunk.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        else:
            chunk = chunk if device is None else chunk.to(device, non_blocking=False)
            yield np.ascontiguousarray(fmt.to_gguf_bytes(fmt.quantize(chunk.float())))


def packed_chunks(values: list, type_name: str, name: str) -> Iterator[np.ndarray]:
    """One Packed (2-D) or one per expert (3-D, expert-major as ggml stores {K, N, E}), written as they are."""
    for p in values:
        t = packed_type(p)
        if t != type_name:
            raise PackError(f"{name}: experts packed in different formats ({t} and {type_name})")
        data = np.ascontiguousarray(p.fmt.to_gguf_bytes(p))
        n, k = p.shape
        if data.dtype != np.uint8 or data.shape != (n, row_bytes(type_name, k)):
            raise PackError(f"{name}: {type(p.fmt).__name__}.to_gguf_bytes gave {data.dtype} {list(data.shape)}, "
                            f"expected uint8 {[n, row_bytes(type_name, k)]}")
        yield data


def block_size(type_name: str) -> int:
    return BLOCK_SIZE[type_name]
