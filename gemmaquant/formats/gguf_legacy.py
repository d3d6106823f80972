"""GGUF legacy block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (ggml-common.h block_q8_0 ... block_q5_1): 32 weights a block.

Packed.data:  codes int32 [N, K] (the stored q),  d fp16 [N, K // 32],  m fp16 [N, K // 32] (Q4_1, Q5_1 only)
Block bytes (little-endian) and grid (exactly what gguf.quants.dequantize computes):
  Q8_0  34 B: d | qs int8[32]                                   w = d * q,          q in [-128, 127]
  Q4_0  18 B: d | qs[16]: byte j = q[j] | q[j + 16] << 4        w = d * (q - 8),    q in [0, 15]
  Q4_1  20 B: d | m | qs[16] as Q4_0                            w = d * q + m,      q in [0, 15]
  Q5_0  22 B: d | qh u32 (bit j = bit 4 of q[j]) | qs[16]       w = d * (q - 16),   q in [0, 31]
  Q5_1  24 B: d | m | qh u32 | qs[16]                           w = d * q + m,      q in [0, 31]
(d * (q - 8) = d * q - 8 d exactly: an fp16 d times a 5-bit integer fits in fp32.)

`quantize(w)` (no params) is ggml's quantize_row_*_ref, ported op for op to torch (the `gguf` package's numpy
quantizers are a port of the same code): codes are rounded with the fp32 1/d before d is stored as fp16.
With `importance` (imatrix [K] or [N, K]) it is llama.cpp's quantize_row_*_impl: weights qw * sqrt(sigma2 + x^2)
(sigma2 = mean x^2 over the row), make_qx_quants (Q4_0, Q5_0) or make_qkx3_quants (Q4_1, Q5_1); Q8_0 ignores
importance, as llama.cpp's quantize_q8_0 does. Both are byte-identical to llama.cpp (tests/formats).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, ReferenceQuantizer, check_importance
from gemmaquant.formats.ggml_ref import div, first_min, make_qkx_quants, make_qx_quants, max_abs, roundf, seqsum, sqrtf

# type -> (block bytes, has min m, bits, code offset: w = d * (q - offset) for the symmetric types)
LAYOUT = {"Q8_0": (34, False, 8, 0), "Q4_0": (18, False, 4, 8), "Q4_1": (20, True, 4, 0),
          "Q5_0": (22, False, 5, 16), "Q5_1": (24, True, 5, 0)}


@dataclass(frozen=True)
class GGUFLegacy(ReferenceQuantizer):
    type_name: str = "Q4_0"
    block = 32

    def __post_init__(self):
        if self.type_name not in LAYOUT:
            raise ValueError(f"GGUFLegacy type_name must be one of {list(LAYOUT)}, got {self.type_name!r}")

    ggml_type = property(lambda self: gguf.GGMLQuantizationType[self.type_name])
    name = property(lambda self: self.type_name.lower())
    bits = property(lambda self: LAYOUT[self.type_name][0] * 8 / 32)
    zero_code = property(lambda self: LAYOUT[self.type_name][3])  # what ggml stores for an all-zero block

    def _reference(self, w: Tensor, importance: Tensor | None) -> tuple[Tensor, dict]:
        """ggml quantize_row_*_ref, or llama.cpp quantize_row_*_impl with importance -> (codes [N, K], params)."""
        N, K = w.shape
        nbytes, has_min, bits, off = LAYOUT[self.type_name]
        qw = None if importance is None else check_importance(importance, w)
        m = None
        if qw is not None and self.type_name != "Q8_0":
            x = w.reshape(-1, 32).T.contiguous()  # [32, B]: column b is block b (ggml_ref's layout)
            sigma2 = div(seqsum(w.T * w.T), float(K))  # [N] mean x^2 over the row (strided rows of w.T: no copy)
            weight = (qw * sqrtf(sigma2[:, None] + w * w)).reshape(-1, 32).T.contiguous()
            if has_min:
                d, m, q = make_qkx_quants(x, weight, (1 << bits) - 1, -0.9, 0.05, 36)
                m = -m  # y.m = -min
            else:
                d, q = make_qx_quants(x, off, weight)
            q = q.T  # [B, 32]
        else:  # _ref: block by block, in the row layout x [B, 32] (one block a row: no transposed copies)
            x = w.reshape(-1, 32)
            if self.type_name == "Q8_0":
                d = div(x.abs().amax(-1), 127.0)
                q = roundf(x * _inverse(d)[:, None])
            elif has_min:
                m = first_min(x, -1)
                d = div(x.amax(-1) - m, float((1 << bits) - 1))
                q = torch.trunc((x - m[:, None]) * _inverse(d)[:, None] + 0.5)  # (int8_t) / (uint8_t)(x0 + 0.5f)
            else:
                d = div(max_abs(x, -1)[1], float(-off))  # max / -8, max / -16
                q = torch.trunc(x * _inverse(d)[:, None] + (off + 0.5))  # (int8_t)(x0 + 8.5f): one add of 8.5
        q = q.clamp(-128 if bits == 8 else 0, 127 if bits == 8 else (1 << bits) - 1)  # MIN(15, ...) / MIN(31, ...)
        params = {"d": d.to(torch.float16).view(N, K // 32)}
        if has_min:
            params["m"] = m.to(torch.float16).view(N, K // 32)
        return q.reshape(N, K).to(torch.int32), params

    def grid(self, params: dict):
        d = params["d"].float()
        nbytes, has_min, bits, off = LAYOUT[self.type_name]
        if has_min:
            return d, params["m"].float(), 0, (1 << bits) - 1
        if bits == 8:
            return d, torch.zeros_like(d), -128, 127
        return d, -off * d, 0, (1 << bits) - 1

    def dequantize(self, p: Packed) -> Tensor:
        """ggml's dequantize_row_*: d * (q - offset), or d * q + m. The same values as the grid's scale * q +
        offset, and the same bits, signed zeros included (d * (q - 8) is -0.0 for q = 8 and d < 0)."""
        N, K = p.shape
        nbytes, has_min, bits, off = LAYOUT[self.type_name]
        d = p.data["d"].float()[:, :, None]
        q = p.data["codes"].float().view(N, K // 32, 32)
        w = d * q + p.data["m"].float()[:, :, None] if has_min else d * (q - off)
        return w.reshape(N, K)

    def pack(self, codes: Tensor, params: dict) -> Packed:
        data = {"codes": codes.to(torch.int32).contiguous(), "d": params["d"].to(torch.float16).contiguous()}
        if LAYOUT[self.type_name][1]:
            data["m"] = params["m"].to(torch.float16).contiguous()
        return Packed(self, (codes.shape[0], codes.shape[1]), data)

    # ---- ggml block bytes ----
    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        N, K = p.shape
        G = K // 32
        nbytes, has_min, bits, off = LAYOUT[self.type_name]
        q = p.data["codes"].cpu().numpy().reshape(N, G, 32)
        parts = [p.data["d"].cpu().numpy().reshape(N, G, 1).view(np.uint8)]
        if has_min:
            parts.append(p.data["m"].cpu().numpy().reshape(N, G, 1).view(np.uint8))
        if bits == 8:
            parts.append(q.astype(np.int8).view(np.uint8))
        else:
            u = q.astype(np.uint8)  # codes are in [0, 31]
            if bits == 5:  # qh: little-endian u32 whose bit j is bit 4 of q[j], i.e. 4 bytes of 8 bits, LSB first
                parts.append(np.packbits((u >> 4) & 1, axis=-1, bitorder="little"))
            lo = u & 0xF
            parts.append(lo[..., :16] | (lo[..., 16:] << 4))
        return np.concatenate(parts, axis=-1).reshape(N, G * nbytes)

    def from_gguf_bytes(self, raw: np.ndarray, shape) -> Packed:
        N, K = shape
        G = K // 32
        nbytes, has_min, bits, off = LAYOUT[self.type_name]
        b = np.ascontiguousarray(raw).reshape(N, G, nbytes)
        f16 = lambda a: torch.from_numpy(a.copy().view(np.float16)[..., 0].copy())  # noqa: E731
        data = {"d": f16(b[..., 0:2])}
        if has_min:
            data["m"] = f16(b[..., 2:4])
        pos = 4 if has_min else 2
        if bits == 8:
            q = b[..., pos:].view(np.int8).astype(np.int32)
        else:
            qs = b[..., -16:].astype(np.int32)
            q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
            if bits == 5:
                qh = b[..., pos:pos + 4].copy().view(np.uint32)  # [N, G, 1]
                q = q | (((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4)
        codes = torch.from_numpy(np.ascontiguousarray(q.reshape(N, K)).astype(np.int32))
        return Packed(self, (N, K), {"codes": codes, **data})


def _inverse(d: Tensor) -> Tensor:
    """`id = d ? 1.0f/d : 0.0f`"""
    return torch.where(d != 0, div(1.0, torch.where(d != 0, d, 1.0)), 0.0)


Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = (GGUFLegacy(t) for t in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"))
