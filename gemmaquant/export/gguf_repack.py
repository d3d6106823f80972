"""Packed values in gemmaquant's own int grids, repacked losslessly onto the ggml block that *is* the same grid:

    int4 symmetric, group a multiple of 32:  w = s * q, q in [-8, 7]           -> Q4_0  (d = s, stored q + 8)
    int4 asymmetric, group a multiple of 32: w = s * q + m, q in [0, 15]       -> Q4_1  (d = s, m = min or -s * zero)
    int8 symmetric per channel / group:      w = s * q, q in [-127, 127]       -> Q8_0  (d = s in every block)

ggml stores d (and m) as fp16, so a scale that fp16 cannot hold exactly cannot be repacked: that is an error, never
a silent requantization. Every repack is verified by dequantizing the blocks with gguf-py and comparing bit for bit
with the format's own dequantization.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from gemmaquant.export.errors import ExportError


class _Blocks:
    """A ggml block tensor already serialised: what gguf_pack needs from a format (ggml_type, to_gguf_bytes)."""

    def __init__(self, type_name: str):
        self.ggml_type = gguf.GGMLQuantizationType[type_name]

    def to_gguf_bytes(self, p) -> np.ndarray:
        return p.data["blocks"]


class _Repacked:
    def __init__(self, type_name: str, shape, blocks: np.ndarray):
        self.fmt, self.shape, self.data = _Blocks(type_name), tuple(shape), {"blocks": blocks}


def _fp16_exact(x: torch.Tensor, what: str, name: str) -> np.ndarray:
    h = x.to(torch.float16)
    if not torch.equal(h.double(), x.double()):
        bad = x.flatten()[(h.double() != x.double()).flatten()][0].item()
        raise ExportError(f"{name}: {what} {bad!r} is not exactly representable in fp16, so it cannot be stored "
                          f"losslessly in a GGUF block (ggml keeps block scales in fp16)")
    return h.numpy().view(np.uint8)


def grid_codes(p, name: str):
    """A Packed value on an affine int grid -> (w float64 [N, K], scale [N, G], offset [N, G] or None, codes
    float64 [N, K]) with w = scale * codes + offset per group. The codes are read back from the format's own
    dequantization (so any storage layout works); callers verify the result reproduces w exactly."""
    n, k = p.shape
    if "scale" not in p.data:
        raise ExportError(f"{name}: {type(p.fmt).__name__} has no GGUF block type and no 'scale' to repack from")
    scale = p.data["scale"].reshape(n, -1)
    g = k // scale.shape[1]
    if "min" in p.data:
        offset = p.data["min"].reshape(n, -1).double()
    elif "zero" in p.data:
        offset = -scale.double() * p.data["zero"].reshape(n, -1).double()
    else:
        offset = None
    w = p.fmt.dequantize(p).double()
    s = scale.double().repeat_interleave(g, dim=1)
    o = 0.0 if offset is None else offset.repeat_interleave(g, dim=1)
    q = torch.where(s != 0, (w - o) / torch.where(s != 0, s, 1.0), torch.zeros_like(w)).round()
    return w, scale, offset, q


def to_block_type(p, name: str):
    """A Packed in an int grid -> an equivalent Packed-like value in Q4_0 / Q4_1 / Q8_0 (raises if not exact)."""
    n, k = p.shape
    w, scale, offset, q = grid_codes(p, name)
    g = k // scale.shape[1]
    if g % 32:
        raise ExportError(f"{name}: groups of {g} do not fill whole 32-weight GGUF blocks")
    # by the grid, not by the values it happens to use
    bits = getattr(p.fmt, "bits_per_code", None) or (8 if type(p.fmt).__name__ == "Int8Channel" else None)
    rep = lambda t: t.repeat_interleave(g // 32, dim=1)  # noqa: E731  one scale per 32-block
    nb = k // 32
    if bits == 8 and offset is None:
        t = "Q8_0"
        d = _fp16_exact(rep(scale), "scale", name).reshape(n, nb, 2)
        blocks = np.concatenate([d, q.to(torch.int8).numpy().view(np.uint8).reshape(n, nb, 32)], axis=2)
    elif bits == 4 and offset is None and q.min() >= -8 and q.max() <= 7:
        t = "Q4_0"
        d = _fp16_exact(rep(scale), "scale", name).reshape(n, nb, 2)
        u = (q + 8).to(torch.uint8).numpy().reshape(n, nb, 32)
        blocks = np.concatenate([d, u[..., :16] | (u[..., 16:] << 4)], axis=2)
    elif bits == 4 and offset is not None and q.min() >= 0 and q.max() <= 15:
        t = "Q4_1"
        d = _fp16_exact(rep(scale), "scale", name).reshape(n, nb, 2)
        m = _fp16_exact(rep(offset), "group minimum", name).reshape(n, nb, 2)
        u = q.to(torch.uint8).numpy().reshape(n, nb, 32)
        blocks = np.concatenate([d, m, u[..., :16] | (u[..., 16:] << 4)], axis=2)
    else:
        raise ExportError(f"{name}: {type(p.fmt).__name__} is not an int4/int8 grid that a GGUF block type holds")
    blocks = np.ascontiguousarray(blocks.reshape(n, -1))
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[t]).reshape(n, k)
    if not np.array_equal(back.astype(np.float64), w.numpy()):
        raise ExportError(f"{name}: {type(p.fmt).__name__} cannot be stored losslessly as {t} "
                          f"(max |Δ| {np.abs(back - w.numpy()).max():.3g})")
    return _Repacked(t, p.shape, blocks)
