"""compressed-tensors "pack-quantized" tensors: int4 / int8 codes packed into int32, as vLLM and transformers read them.

Layout (compressed_tensors/compressors/pack_quantized/helpers.py `pack_to_int32`): signed codes q in
[-2^(b-1), 2^(b-1)) are offset to unsigned (q + 2^(b-1)) and packed densely along the input dimension, element k of
a row at bits b*k of the row's bit stream (int32 little-endian words): 8 codes per word for int4, 4 for int8.
    weight_packed  int32 [N, K*b/32]
    weight_scale   model dtype [N, K/group] (int4, group strategy) or [N, 1] (int8, channel strategy)
    weight_shape   int64 [2] = (N, K)
Dequantization: w = q * scale. Consumers evaluate the product in the dtype they hold the scale in: transformers
loading in float32 holds float32 scales and gets the exact product; vLLM and transformers in bf16 round it to bf16
(compressed-tensors `_dequantize` multiplies in the scale's dtype). The exact product (it has at most 8 + 8
significant bits, so it is exact in float32) rounded to the model dtype is therefore what every consumer runs.
"""

from __future__ import annotations

import torch

from gemmaquant.export.errors import ExportError


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [N, K] (K * bits a multiple of 32) -> int32 [N, K * bits / 32]."""
    per = 32 // bits
    n, k = q.shape
    if k % per:
        raise ExportError(f"{k} inputs cannot be packed {per} per int32 word")
    u = (q.to(torch.int64) + (1 << (bits - 1))).reshape(n, k // per, per)  # unsigned codes
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)  # < 2^32
    return (words - ((words >= (1 << 31)).to(torch.int64) << 32)).to(torch.int32)  # reinterpret as int32


def unpack_int32(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 [N, K*bits/32] -> signed codes int8 [N, K]."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :k] - (1 << (bits - 1))).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [N, K], scale [N, G] -> the exact w = q * scale [N, K], float32."""
    n, k = q.shape
    g = k // scale.shape[1]
    return (q.float().reshape(n, scale.shape[1], g) * scale.float()[..., None]).reshape(n, k)


def codes_from_packed(p, bits: int, group: int | None, name: str, dtype: torch.dtype):
    """A Packed value in the matching gemmaquant format -> (int8 codes [N, K], scale [N, G] in `dtype`), bit-for-bit.

    The codes are read back from the format's own dequantization (w / scale, which is exact for a symmetric grid),
    and checked: the value must be on the grid and its scales must be representable in `dtype`."""
    from gemmaquant.export.gguf_repack import grid_codes

    n, k = p.shape
    w, scale, offset, q = grid_codes(p, name)
    if offset is not None:
        raise ExportError(f"{name}: {type(p.fmt).__name__} is asymmetric; pack-quantized W4A16/W8A16 here are "
                          "symmetric")
    if group is not None and scale.shape[1] * group != k:
        raise ExportError(f"{name}: packed with {k // scale.shape[1]}-wide groups, the scheme asks for {group}")
    if group is None and scale.shape[1] != 1:
        raise ExportError(f"{name}: packed with {scale.shape[1]} scales per row, int8 channel needs 1")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    s = scale.double().repeat_interleave(k // scale.shape[1], dim=1)
    if not torch.equal(q * s, w) or q.min() < lo or q.max() > hi:
        raise ExportError(f"{name}: {type(p.fmt).__name__} values are not w = q * scale with q in [{lo}, {hi}]")
    out_scale = scale.to(dtype)
    if not torch.equal(out_scale.double(), scale.double()):
        raise ExportError(f"{name}: scales are not representable in {dtype} (the exported model's dtype)")
    return q.to(torch.int8), out_scale
