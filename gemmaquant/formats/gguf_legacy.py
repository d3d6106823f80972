"""GGUF legacy block types (ggml-common.h block_q8_0 ... block_q5_1), 32 weights per block.

Packed.data for all of them:  codes int32 [N, K] (the stored q), d fp16 [N, K // 32], m fp16 [N, K // 32] (Q4_1, Q5_1)
Block bytes (little-endian):
  Q8_0  34 B: d fp16 | qs int8[32]                                  w = d * q,          q in [-128, 127]
  Q4_0  18 B: d fp16 | qs[16]: byte j = q[j] | q[j+16] << 4         w = d * (q - 8),    q in [0, 15]
  Q4_1  20 B: d fp16 | m fp16 | qs[16] as Q4_0                      w = d * q + m,      q in [0, 15]
  Q5_0  22 B: d fp16 | qh u32 (bit j = bit 4 of q[j]) | qs[16]      w = d * (q - 16),   q in [0, 31]
  Q5_1  24 B: d fp16 | m fp16 | qh u32 | qs[16]                     w = d * q + m,      q in [0, 31]
Round-to-nearest `fit` is ggml's reference quantizer, run through the `gguf` package's numpy port, so RTN output is
byte-identical to gguf.quants.quantize (tests/formats). Dequantization equals gguf.quants.dequantize bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, QuantFormat, check_weight, search_scale, weighted_importance

T = gguf.GGMLQuantizationType
# type -> (block bytes, has min, bits, code offset (q - off is the signed code for symmetric types))
LAYOUT = {T.Q8_0: (34, False, 8, 0), T.Q4_0: (18, False, 4, 8), T.Q4_1: (20, True, 4, 0),
          T.Q5_0: (22, False, 5, 16), T.Q5_1: (24, True, 5, 0)}


@dataclass(frozen=True)
class GGUFLegacy(QuantFormat):
    type_name: str = "Q4_0"
    block = 32

    @property
    def zero_code(self) -> int:
        return self._layout()[3]

    @property
    def ggml_type(self):
        return T[self.type_name]

    @property
    def name(self) -> str:
        return self.type_name.lower()

    @property
    def bits(self) -> float:
        return LAYOUT[self.ggml_type][0] * 8 / 32

    def _layout(self):
        return LAYOUT[self.ggml_type]

    def quantize(self, w: Tensor, params: dict | None = None, importance: Tensor | None = None) -> Packed:
        if params is None and importance is None:  # ggml's reference RTN, codes included (it rounds x / d with
            check_weight(w, 32)                       # the fp32 d, before d is stored as fp16)
            return self.from_gguf_bytes(gguf.quants.quantize(w.float().numpy(), self.ggml_type), tuple(w.shape))
        return super().quantize(w, params, importance)

    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        raw = gguf.quants.quantize(w.float().numpy(), self.ggml_type)  # ggml's reference RTN
        params = self.params(self.from_gguf_bytes(raw, tuple(w.shape)))
        nbytes, has_min, bits, off = self._layout()
        if importance is not None and not has_min:  # importance-weighted choice of d (symmetric types)
            N, K = w.shape
            b = w.float().view(N, K // 32, 32)
            imp = weighted_importance(w, importance).view_as(b)
            qmin, qmax = (-128, 127) if bits == 8 else (-off, off - 1)
            d = search_scale(b, imp, qmin, qmax, params["d"].float())
            params["d"] = d.to(torch.float16)
        return params

    def grid(self, params: dict):
        d = params["d"].float()
        nbytes, has_min, bits, off = self._layout()
        if has_min:
            return d, params["m"].float(), 0, (1 << bits) - 1
        if bits == 8:
            return d, torch.zeros_like(d), -128, 127
        return d, -off * d, 0, (1 << bits) - 1  # w = d*q - off*d = d*(q - off): both terms exact in fp32

    def pack(self, codes: Tensor, params: dict) -> Packed:
        data = {"codes": codes.to(torch.int32).contiguous(), "d": params["d"].to(torch.float16).contiguous()}
        if "m" in params and self._layout()[1]:
            data["m"] = params["m"].to(torch.float16).contiguous()
        return Packed(self, (codes.shape[0], codes.shape[1]), data)

    def codes(self, p: Packed) -> Tensor:
        return p.data["codes"]

    def params(self, p: Packed) -> dict:
        return {k: v for k, v in p.data.items() if k != "codes"}

    # ---- ggml block bytes ----
    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        N, K = p.shape
        G = K // 32
        nbytes, has_min, bits, off = self._layout()
        q = p.data["codes"].numpy().reshape(N, G, 32)
        parts = [p.data["d"].numpy().reshape(N, G, 1).view(np.uint8)]
        if has_min:
            parts.append(p.data["m"].numpy().reshape(N, G, 1).view(np.uint8))
        if bits == 8:
            parts.append(q.astype(np.int8).view(np.uint8))
        else:
            u = q.astype(np.uint32)
            if bits == 5:
                qh = ((u >> 4) & 1) << np.arange(32, dtype=np.uint32)
                parts.append(qh.sum(-1, dtype=np.uint32).reshape(N, G, 1).view(np.uint8))
            lo = (u & 0xF).astype(np.uint8)
            parts.append(lo[..., :16] | (lo[..., 16:] << 4))
        return np.concatenate(parts, axis=-1).reshape(N, G * nbytes)

    def from_gguf_bytes(self, raw: np.ndarray, shape) -> Packed:
        N, K = shape
        G = K // 32
        nbytes, has_min, bits, off = self._layout()
        b = np.ascontiguousarray(raw).reshape(N, G, nbytes)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        pos = 2
        data = {"d": torch.from_numpy(d.copy())}
        if has_min:
            data["m"] = torch.from_numpy(b[..., 2:4].copy().view(np.float16)[..., 0].copy())
            pos = 4
        if bits == 8:
            q = b[..., pos:].view(np.int8).astype(np.int32)
        else:
            qh = None
            if bits == 5:
                qh = b[..., pos:pos + 4].copy().view(np.uint32)[..., 0]
                pos += 4
            qs = b[..., pos:pos + 16].astype(np.int32)
            q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
            if qh is not None:
                q = q | (((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4)
        data["codes"] = torch.from_numpy(np.ascontiguousarray(q.reshape(N, K)).astype(np.int32))
        return Packed(self, (N, K), {"codes": data.pop("codes"), **data})


Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = (GGUFLegacy(t) for t in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"))
