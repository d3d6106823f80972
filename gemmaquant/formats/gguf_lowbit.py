"""GGUF K-quants under 4 bits: Q3_K and Q2_K (ggml-common.h block_q3_K / block_q2_K), 256-weight super-blocks
of 16 sub-blocks of 16.

Q3_K

Packed.data (S = K // 256 super-blocks per row):
  codes int32 [N, K]          the stored q in [0, 7] (2 low bits in qs, the third in hmask)
  d     fp16  [N, S]          super-block scale
  sc    uint8 [N, S, 16]      6-bit sub-block scales ls in [0, 63]
Grid of sub-block j:  w = (d * (ls[j] - 32)) * (q - 4)      (symmetric, 8 levels; 3.4375 bits per weight)
Block bytes (110 B, little-endian): hmask[32] | qs[64] | scales[12] | d
  hmask: bit h of byte l is bit 2 of weight 32 h + l.  qs: in each 128-weight half c, byte 32 c + l holds the
  2 low bits of weights 128 c + 32 i + l at shift 2 i (i = 0..3).  scales[12]: byte j (j < 8) holds the low
  nibbles of ls[j] (bits 0-3) and ls[j + 8] (bits 4-7); byte 8 + j % 4 holds ls[j] >> 4 at shift 2 (j // 4).

`quantize(w)` (no params) is llama.cpp's quantize_row_q3_K_ref (make_q3_quants per sub-block, the sub-scales
against the largest one), with `importance` quantize_row_q3_K_impl (make_qx_quants with weights
qw * sqrt(sigma2 + x^2), the sub-scales by make_qx_quants weighted by each sub-block's summed weight), ported op
for op (ggml_ref.py): byte-identical to llama.cpp (tests/formats/test_llamacpp.py). A sub-block whose scale is 0
keeps the search's codes, as C does; `encode` gives 0 there (what an all-zero super-block stores).

Q2_K
Packed.data:  codes int32 [N, K] (q in [0, 3]),  d, dmin fp16 [N, S],  sc, mn uint8 [N, S, 16] (4-bit each)
Grid of sub-block j:  w = (d * sc[j]) * q - (dmin * mn[j])      (asymmetric, 4 levels; 2.625 bits per weight)
Block bytes (84 B): scales[16] (byte j: sc[j] | mn[j] << 4) | qs[64] (as Q3_K's 2 low bits) | d | dmin
`quantize(w)` is quantize_row_q2_K_ref (make_qkx2_quants with weights |x| and the absolute error, sub-scales and
mins against their largest), with `importance` quantize_row_q2_K_impl (make_qkx3_quants, make_qp_quants for the
sub-scales and mins), ported op for op and byte-identical to llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, ReferenceQuantizer, check_importance
from gemmaquant.formats.ggml_ref import (div, make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants, max_abs,
                                         nearest_int, seqsum, sqrtf)

QK = 256


def _pack_low_bits(q: np.ndarray) -> np.ndarray:
    """codes [N, S, 256] -> qs [N, S, 64]: byte 32 c + l holds the 2 low bits of weights 128 c + 32 i + l at
    shift 2 i."""
    N, S = q.shape[:2]
    low = (q & 3).reshape(N, S, 2, 4, 32)
    return (low << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2, dtype=np.uint8).reshape(N, S, 64)


def _unpack_low_bits(qs: np.ndarray) -> np.ndarray:
    """qs [N, S, 64] -> the 2 low bits of every code [N, S, 256]."""
    N, S = qs.shape[:2]
    low = (qs.reshape(N, S, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [N, S, 2, 4, 32]
    return low.reshape(N, S, 256)


def _pack_scales(ls: Tensor) -> Tensor:
    """16 6-bit sub-scales [.., 16] -> scales[12] [.., 12] (int32 byte values), as quantize_row_q3_K does."""
    ls = ls.int()
    low = (ls[..., :8] & 0xF) | ((ls[..., 8:] & 0xF) << 4)
    high = ls >> 4  # [.., 16] 2 bits each
    hi = high[..., 0:4] | (high[..., 4:8] << 2) | (high[..., 8:12] << 4) | (high[..., 12:16] << 6)
    return torch.cat([low, hi], -1)


def _unpack_scales(b: Tensor) -> Tensor:
    b = b.int()
    low = torch.cat([b[..., :8] & 0xF, b[..., :8] >> 4], -1)  # [.., 16]
    hi = torch.cat([(b[..., 8:12] >> (2 * k)) & 3 for k in range(4)], -1)  # j = 4k + j % 4
    return low | (hi << 4)


@dataclass(frozen=True)
class Q3K(ReferenceQuantizer):
    """GGUF Q3_K: 16-weight affine sub-blocks (zero point fixed at 4) in 256-weight super-blocks."""

    type_name: str = "Q3_K"
    block = 16
    super_block = QK
    zero_code = 0
    qmax = 7
    bits = 110 * 8 / QK
    trainable_ints = {"sc": (0, 63)}

    ggml_type = property(lambda self: gguf.GGMLQuantizationType[self.type_name])
    name = property(lambda self: self.type_name.lower())
    row_block = property(lambda self: QK)

    def _reference(self, w: Tensor, importance: Tensor | None) -> tuple[Tensor, dict]:
        """quantize_row_q3_K_ref (importance None) or quantize_row_q3_K_impl -> (codes [N, K], params)."""
        N, K = w.shape
        S = K // QK
        x = w.reshape(-1, 16).T.contiguous()  # [16, B]: column b is sub-block b, in (row, super-block, j) order
        if importance is None:
            scales, L = make_q3_quants(x, 4)  # [B], [16, B] in [0, 7]
            _, max_scale = max_abs(scales.view(N * S, 16).T.contiguous())
            nz = max_scale != 0
            iscale = div(-32.0, torch.where(nz, max_scale, 1.0))
            l = (nearest_int(iscale[:, None] * scales.view(N * S, 16)).clamp(-32, 31) + 32)
            ls = torch.where(nz[:, None], l, 0)  # memset(y[i].scales, 0, 12) when max_scale is 0
            d16 = torch.where(nz, div(1.0, iscale), 0.0).to(torch.float16)
        else:
            qw = check_importance(importance, w).reshape(-1, 16).T.contiguous()
            xs = w.reshape(N * S, QK).T.contiguous()  # [256, N S]
            sigma2 = div(2 * seqsum(xs * xs), float(QK))
            weight = qw * sqrtf(sigma2.repeat_interleave(16) + x * x)
            sw = seqsum(weight).view(N * S, 16).T.contiguous()  # [16, N S]
            scales, L = make_qx_quants(x, 4, weight)
            d, ls = make_qx_quants(scales.view(N * S, 16).T.contiguous(), 32, sw)  # ls [16, N S] in [0, 63]
            ls, d16 = ls.T, d.to(torch.float16)
        sc = ls.to(torch.uint8)  # [N S, 16]
        dd = (d16.float()[:, None] * (sc.float() - 32)).reshape(-1)  # [B] sub-block scale
        q = nearest_int(div(x, torch.where(dd == 0, 1.0, dd))).clamp(-4, 3) + 4  # nearest_int(x / d)
        codes = torch.where(dd != 0, q, L)  # `if (!d) continue;` keeps the search's codes
        return codes.T.reshape(N, K).int(), {"d": d16.view(N, S), "sc": sc.view(N, S, 16)}

    def grid(self, params: dict):
        d = params["d"].float()[..., None]
        scale = (d * (params["sc"].float() - 32)).reshape(d.shape[0], -1)  # [N, K // 16]
        return scale, -4 * scale, 0, 7

    def dequantize(self, p: Packed) -> Tensor:
        """dequantize_row_q3_K: (d * (ls - 32)) * (q - 4), signed zeros included."""
        N, K = p.shape
        scale = self.grid(self.params(p))[0]
        q = p.data["codes"].float().view(N, K // 16, 16)
        return (scale[:, :, None] * (q - 4)).reshape(N, K)

    def pack(self, codes: Tensor, params: dict) -> Packed:
        data = {"codes": codes.to(torch.int32).contiguous(), "d": params["d"].to(torch.float16).contiguous(),
                "sc": params["sc"].to(torch.uint8).contiguous()}
        return Packed(self, (codes.shape[0], codes.shape[1]), data)

    # ---- ggml block bytes ----
    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        N, K = p.shape
        S = K // QK
        q = p.data["codes"].cpu().numpy().astype(np.uint8).reshape(N, S, 8, 32)  # [.., h, l]: weight 32 h + l
        hmask = ((q >> 2) << np.arange(8, dtype=np.uint8)[:, None]).sum(-2, dtype=np.uint8)  # [N, S, 32]
        qs = _pack_low_bits(q.reshape(N, S, QK))
        scales = _pack_scales(p.data["sc"].cpu()).numpy().astype(np.uint8).reshape(N, S, 12)
        d = p.data["d"].cpu().numpy().reshape(N, S, 1).view(np.uint8)
        return np.concatenate([hmask, qs, scales, d], -1).reshape(N, S * 110)

    def from_gguf_bytes(self, raw: np.ndarray, shape) -> Packed:
        N, K = shape
        S = K // QK
        b = np.ascontiguousarray(raw).reshape(N, S, 110)
        hmask = b[..., :32]
        high = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [N, S, 8, 32]
        q = (_unpack_low_bits(b[..., 32:96]) | (high.reshape(N, S, QK) << 2)).reshape(N, K).astype(np.int32)
        sc = _unpack_scales(torch.from_numpy(b[..., 96:108].astype(np.int32))).to(torch.uint8)
        d = torch.from_numpy(b[..., 108:110].copy().view(np.float16)[..., 0].copy())
        return Packed(self, (N, K), {"codes": torch.from_numpy(q), "d": d, "sc": sc})


@dataclass(frozen=True)
class Q2K(ReferenceQuantizer):
    """GGUF Q2_K: 16-weight asymmetric sub-blocks (4-bit scale and min) in 256-weight super-blocks."""

    type_name: str = "Q2_K"
    block = 16
    super_block = QK
    zero_code = 0
    qmax = 3
    bits = 84 * 8 / QK
    trainable_ints = {"sc": (0, 15), "mn": (0, 15)}

    ggml_type = property(lambda self: gguf.GGMLQuantizationType[self.type_name])
    name = property(lambda self: self.type_name.lower())
    row_block = property(lambda self: QK)

    def _reference(self, w: Tensor, importance: Tensor | None) -> tuple[Tensor, dict]:
        """quantize_row_q2_K_ref (importance None) or quantize_row_q2_K_impl -> (codes [N, K], params)."""
        N, K = w.shape
        S = K // QK
        x = w.reshape(-1, 16).T.contiguous()  # [16, B]: column b is sub-block b
        if importance is None:
            scales, mins, L = make_qkx_quants(x, x.abs(), 3, -0.5, 0.1, 15, use_mad=True)
            scales, mins = scales.view(N * S, 16), mins.view(N * S, 16)
            max_scale = torch.where(scales.amax(-1) > 0, scales.amax(-1), 0.0)  # `if (s > max) max = s;` from 0
            max_min = torch.where(mins.amax(-1) > 0, mins.amax(-1), 0.0)
            ps, pm = max_scale > 0, max_min > 0
            ls = torch.where(ps[:, None], nearest_int(div(15.0, torch.where(ps, max_scale, 1.0))[:, None] * scales), 0)
            lm = torch.where(pm[:, None], nearest_int(div(15.0, torch.where(pm, max_min, 1.0))[:, None] * mins), 0)
            byte = (ls & 0xFF) | ((lm << 4) & 0xFF)  # y.scales[j] = l; y.scales[j] |= l << 4 (uint8)
            d16 = torch.where(ps, div(max_scale, 15.0), 0.0).to(torch.float16)
            dmin16 = torch.where(pm, div(max_min, 15.0), 0.0).to(torch.float16)
        else:
            qw = check_importance(importance, w).reshape(-1, 16).T.contiguous()
            xs = w.reshape(N * S, QK).T.contiguous()
            sigma2 = div(seqsum(xs * xs), float(QK))
            weight = qw * sqrtf(sigma2.repeat_interleave(16) + x * x)
            sw = seqsum(weight).view(N * S, 16).T.contiguous()  # [16, N S]
            scales, mins, L = make_qkx_quants(x, weight, 3, -0.9, 0.05, 36)
            dm, ls = make_qp_quants(scales.view(N * S, 16).T.contiguous(), 15, sw)
            mm, lm = make_qp_quants(mins.view(N * S, 16).T.contiguous(), 15, sw)
            byte = (ls.T | (lm.T << 4)) & 0xFF
            d16, dmin16 = dm.to(torch.float16), mm.to(torch.float16)
        sc, mn = byte & 0xF, byte >> 4  # what the block stores, read back as C reads it
        dd = (d16.float()[:, None] * sc.float()).reshape(-1)  # [B]
        dm_ = (dmin16.float()[:, None] * mn.float()).reshape(-1)
        q = nearest_int(div(x + dm_, torch.where(dd == 0, 1.0, dd))).clamp(0, 3)
        codes = torch.where(dd != 0, q, L)  # `if (!d) continue;` keeps the search's codes
        return codes.T.reshape(N, K).int(), {"d": d16.view(N, S), "sc": sc.to(torch.uint8).view(N, S, 16),
                                             "dmin": dmin16.view(N, S), "mn": mn.to(torch.uint8).view(N, S, 16)}

    def grid(self, params: dict):
        d = params["d"].float()[..., None]
        N = d.shape[0]
        scale = (d * params["sc"].float()).reshape(N, -1)
        offset = -(params["dmin"].float()[..., None] * params["mn"].float()).reshape(N, -1)
        return scale, offset, 0, 3

    def dequantize(self, p: Packed) -> Tensor:
        """dequantize_row_q2_K: (d sc) q - (dmin mn)."""
        N, K = p.shape
        scale, offset, _, _ = self.grid(self.params(p))
        q = p.data["codes"].float().view(N, K // 16, 16)
        return (scale[:, :, None] * q - (-offset)[:, :, None]).reshape(N, K)

    def pack(self, codes: Tensor, params: dict) -> Packed:
        data = {"codes": codes.to(torch.int32).contiguous(), "d": params["d"].to(torch.float16).contiguous(),
                "sc": params["sc"].to(torch.uint8).contiguous(), "dmin": params["dmin"].to(torch.float16).contiguous(),
                "mn": params["mn"].to(torch.uint8).contiguous()}
        return Packed(self, (codes.shape[0], codes.shape[1]), data)

    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        N, K = p.shape
        S = K // QK
        q = p.data["codes"].cpu().numpy().astype(np.uint8).reshape(N, S, QK)
        scales = (p.data["sc"].cpu().numpy() | (p.data["mn"].cpu().numpy() << 4)).astype(np.uint8).reshape(N, S, 16)
        d = p.data["d"].cpu().numpy().reshape(N, S, 1).view(np.uint8)
        dmin = p.data["dmin"].cpu().numpy().reshape(N, S, 1).view(np.uint8)
        return np.concatenate([scales, _pack_low_bits(q), d, dmin], -1).reshape(N, S * 84)

    def from_gguf_bytes(self, raw: np.ndarray, shape) -> Packed:
        N, K = shape
        S = K // QK
        b = np.ascontiguousarray(raw).reshape(N, S, 84)
        q = _unpack_low_bits(b[..., 16:80]).reshape(N, K).astype(np.int32)
        f16 = lambda a: torch.from_numpy(a.copy().view(np.float16)[..., 0].copy())  # noqa: E731
        return Packed(self, (N, K), {"codes": torch.from_numpy(q), "d": f16(b[..., 80:82]),
                                     "sc": torch.from_numpy(b[..., :16] & 0xF), "dmin": f16(b[..., 82:84]),
                                     "mn": torch.from_numpy(b[..., :16] >> 4)})


Q3_K = Q3K("Q3_K")
Q2_K = Q2K("Q2_K")
