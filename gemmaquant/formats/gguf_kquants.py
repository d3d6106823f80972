"""GGUF K-quants (ggml-common.h block_q4_K, block_q5_K, block_q6_K): 256-weight super-blocks.

Packed.data: codes int32 [N, K]; d fp16 [N, K // 256]; sc uint8/int8 [N, K // 256, 8 or 16] (sub-block scales);
             dmin fp16 and mn uint8 [N, K // 256, 8] (Q4_K, Q5_K sub-block mins)
Sub-block grids (the affine pair of each sub-block, exactly as gguf.quants.dequantize computes it):
  Q4_K  8 x 32, q in [0, 15]:  w = (d * sc) * q - (dmin * mn)      144 B: d | dmin | scales[12] | qs[128]
  Q5_K  8 x 32, q in [0, 31]:  same, q = low 4 bits | qh bit << 4  176 B: d | dmin | scales[12] | qh[32] | qs[128]
  Q6_K 16 x 16, q in [0, 63]:  w = (d * sc) * (q - 32), sc int8   210 B: ql[128] | qh[64] | scales[16] | d
scales[12] packs the 6-bit sc and mn (ggml get_scale_min_k4). qs: for each 64-weight chunk c, byte l holds
weight 64c + l in its low nibble and 64c + 32 + l in its high nibble.

`fit` here is a plain min/max fit of each sub-block followed by 6-bit quantization of the sub-block parameters
against the super-block d/dmin (optionally importance-weighted); it is NOT llama.cpp's make_qkx2_quants search,
so RTN bytes differ from llama-quantize's (packing and dequantization are exact: tests/formats).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, QuantFormat, weighted_importance

T = gguf.GGMLQuantizationType
QK = 256


def _r(x: Tensor) -> Tensor:  # nearest_int: round half away from zero
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


@dataclass(frozen=True)
class KQuant(QuantFormat):
    type_name: str = "Q4_K"

    @property
    def ggml_type(self):
        return T[self.type_name]

    @property
    def name(self) -> str:
        return self.type_name.lower()

    @property
    def block(self) -> int:  # the affine sub-block
        return 16 if self.type_name == "Q6_K" else 32

    @property
    def bits(self) -> float:
        return {"Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}[self.type_name]

    @property
    def qmax(self) -> int:
        return {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[self.type_name]

    @property
    def zero_code(self) -> int:
        return 32 if self.type_name == "Q6_K" else 0

    def _check(self, w: Tensor):
        if w.shape[1] % QK:
            raise ValueError(f"{self.type_name}: {w.shape[1]} inputs are not a multiple of the 256-weight super-block")

    def quantize(self, w, params=None, importance=None):
        self._check(w)
        return super().quantize(w, params, importance)

    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        self._check(w)
        N, K = w.shape
        S, sub = K // QK, self.block
        b = w.float().view(N, S, QK // sub, sub)
        imp = weighted_importance(w, importance).view_as(b)
        if self.type_name == "Q6_K":
            amax = b.abs().amax(-1)
            s = amax / 31  # q - 32 in [-32, 31]
            d = (s.abs().amax(-1) / 127).to(torch.float16)
            df = d.float()[..., None]
            sc = torch.where(df == 0, 0.0, _r(s / torch.where(df == 0, 1.0, df))).clamp(-128, 127)
            return {"d": d, "sc": sc.to(torch.int8)}
        # weighted least squares would go here for importance; we weight the min/max choice by shrinking the range
        lo = b.amin(-1).clamp(max=0)
        hi = b.amax(-1)
        s = (hi - lo) / self.qmax
        mn = -lo
        d = (s.amax(-1) / 63).to(torch.float16)
        dmin = (mn.amax(-1) / 63).to(torch.float16)
        df, dmf = d.float()[..., None], dmin.float()[..., None]
        sc = torch.where(df == 0, 0.0, _r(s / torch.where(df == 0, 1.0, df))).clamp(0, 63)
        # round the mins up so that the sub-block's range still covers its smallest weight
        m = torch.where(dmf == 0, 0.0, torch.ceil(mn / torch.where(dmf == 0, 1.0, dmf))).clamp(0, 63)
        return {"d": d, "sc": sc.to(torch.uint8), "dmin": dmin, "mn": m.to(torch.uint8)}

    def grid(self, params: dict):
        N, S = params["d"].shape
        d = params["d"].float()[..., None]
        if self.type_name == "Q6_K":
            scale = (d * params["sc"].float()).reshape(N, -1)
            return scale, -32 * scale, 0, 63
        scale = (d * params["sc"].float()).reshape(N, -1)
        offset = -(params["dmin"].float()[..., None] * params["mn"].float()).reshape(N, -1)
        return scale, offset, 0, self.qmax

    def pack(self, codes: Tensor, params: dict) -> Packed:
        return Packed(self, (codes.shape[0], codes.shape[1]),
                      {"codes": codes.to(torch.int32).contiguous(), **{k: v.contiguous() for k, v in params.items()}})

    def codes(self, p):
        return p.data["codes"]

    def params(self, p):
        return {k: v for k, v in p.data.items() if k != "codes"}

    # ---- ggml block bytes ----
    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        N, K = p.shape
        S = K // QK
        q = p.data["codes"].numpy().astype(np.uint8).reshape(N, S, QK)
        d = p.data["d"].numpy().reshape(N, S, 1).view(np.uint8)
        if self.type_name == "Q6_K":
            ql = np.zeros((N, S, 128), np.uint8)
            qh = np.zeros((N, S, 64), np.uint8)
            for h in range(2):  # two halves of 128 weights
                y = q[..., 128 * h:128 * (h + 1)]
                lo, hi = y & 0xF, y >> 4
                ql[..., 64 * h:64 * h + 32] = lo[..., 0:32] | (lo[..., 64:96] << 4)
                ql[..., 64 * h + 32:64 * h + 64] = lo[..., 32:64] | (lo[..., 96:128] << 4)
                qh[..., 32 * h:32 * h + 32] = (hi[..., 0:32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4)
                                                | (hi[..., 96:128] << 6))
            sc = p.data["sc"].numpy().astype(np.int8).view(np.uint8).reshape(N, S, 16)
            return np.concatenate([ql, qh, sc, d], -1).reshape(N, S * 210)
        dmin = p.data["dmin"].numpy().reshape(N, S, 1).view(np.uint8)
        sc = p.data["sc"].numpy().astype(np.uint8).reshape(N, S, 8)
        mn = p.data["mn"].numpy().astype(np.uint8).reshape(N, S, 8)
        scales = np.zeros((N, S, 12), np.uint8)  # get_scale_min_k4, inverted
        scales[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
        scales[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
        scales[..., 8:12] = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
        lo = q & 0xF
        qs = np.concatenate([lo[..., 64 * c:64 * c + 32] | (lo[..., 64 * c + 32:64 * c + 64] << 4) for c in range(4)], -1)
        parts = [d, dmin, scales]
        if self.type_name == "Q5_K":
            hb = (q >> 4) & 1
            qh = np.zeros((N, S, 32), np.uint8)
            for c in range(4):
                qh |= (hb[..., 64 * c:64 * c + 32] << (2 * c)) | (hb[..., 64 * c + 32:64 * c + 64] << (2 * c + 1))
            parts.append(qh)
        parts.append(qs)
        return np.concatenate(parts, -1).reshape(N, -1)

    def from_gguf_bytes(self, raw: np.ndarray, shape) -> Packed:
        N, K = shape
        S = K // QK
        size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[self.type_name]
        b = np.ascontiguousarray(raw).reshape(N, S, size)
        if self.type_name == "Q6_K":
            ql, qh, sc, d = b[..., :128], b[..., 128:192], b[..., 192:208], b[..., 208:210]
            q = np.zeros((N, S, QK), np.int32)
            for h in range(2):
                l0, l1 = ql[..., 64 * h:64 * h + 32].astype(np.int32), ql[..., 64 * h + 32:64 * h + 64].astype(np.int32)
                hh = qh[..., 32 * h:32 * h + 32].astype(np.int32)
                base = 128 * h
                q[..., base:base + 32] = (l0 & 0xF) | ((hh & 3) << 4)
                q[..., base + 32:base + 64] = (l1 & 0xF) | (((hh >> 2) & 3) << 4)
                q[..., base + 64:base + 96] = (l0 >> 4) | (((hh >> 4) & 3) << 4)
                q[..., base + 96:base + 128] = (l1 >> 4) | (((hh >> 6) & 3) << 4)
            data = {"d": torch.from_numpy(d.copy().view(np.float16)[..., 0].copy()),
                    "sc": torch.from_numpy(sc.copy().view(np.int8))}
        else:
            d, dmin, scales = b[..., 0:2], b[..., 2:4], b[..., 4:16].astype(np.uint8)
            sc = np.concatenate([scales[..., 0:4] & 63, (scales[..., 8:12] & 0xF) | ((scales[..., 0:4] >> 6) << 4)], -1)
            mn = np.concatenate([scales[..., 4:8] & 63, (scales[..., 8:12] >> 4) | ((scales[..., 4:8] >> 6) << 4)], -1)
            pos = 16
            hb = None
            if self.type_name == "Q5_K":
                qh = b[..., 16:48].astype(np.int32)
                hb = np.concatenate([np.concatenate([(qh >> (2 * c)) & 1, (qh >> (2 * c + 1)) & 1], -1)
                                     for c in range(4)], -1)
                pos = 48
            qs = b[..., pos:pos + 128].astype(np.int32)
            q = np.concatenate([np.concatenate([qs[..., 32 * c:32 * c + 32] & 0xF, qs[..., 32 * c:32 * c + 32] >> 4], -1)
                                for c in range(4)], -1)
            if hb is not None:
                q = q | (hb << 4)
            data = {"d": torch.from_numpy(d.copy().view(np.float16)[..., 0].copy()),
                    "sc": torch.from_numpy(sc.copy()),
                    "dmin": torch.from_numpy(dmin.copy().view(np.float16)[..., 0].copy()),
                    "mn": torch.from_numpy(mn.copy())}
        return Packed(self, (N, K), {"codes": torch.from_numpy(q.reshape(N, K).astype(np.int32)), **data})


Q4_K, Q5_K, Q6_K = KQuant("Q4_K"), KQuant("Q5_K"), KQuant("Q6_K")
