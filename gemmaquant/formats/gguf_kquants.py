"""GGUF K-quants Q4_K, Q5_K, Q6_K (ggml-common.h block_q4_K / block_q5_K / block_q6_K): 256-weight super-blocks.

Packed.data (S = K // 256 super-blocks per row):
  codes int32 [N, K]          the stored q: Q4_K [0, 15], Q5_K [0, 31], Q6_K [0, 63]
  d     fp16  [N, S]          super-block scale
  sc    uint8 [N, S, 8]       6-bit sub-block scales (Q4_K, Q5_K: 8 sub-blocks of 32)
        int8  [N, S, 16]      8-bit sub-block scales (Q6_K: 16 sub-blocks of 16)
  dmin  fp16  [N, S]          super-block scale of the mins (Q4_K, Q5_K)
  mn    uint8 [N, S, 8]       6-bit sub-block mins (Q4_K, Q5_K)
Grid of sub-block j (what gguf.quants.dequantize computes, bit for bit):
  Q4_K, Q5_K:  w = (d * sc[j]) * q - (dmin * mn[j])
  Q6_K:        w = (d * sc[j]) * (q - 32)        (= (d sc) q - 32 (d sc) exactly: d sc q fits in 24 bits)
Block bytes (little-endian):
  Q4_K 144 B: d | dmin | scales[12] | qs[128]
  Q5_K 176 B: d | dmin | scales[12] | qh[32] | qs[128]
  Q6_K 210 B: ql[128] | qh[64] | scales[16] int8 | d
  scales[12] packs sc/mn (ggml get_scale_min_k4): bytes 0-3 sc[0:4] | (sc[4:8] >> 4) << 6, bytes 4-7 mn[0:4] |
  (mn[4:8] >> 4) << 6, bytes 8-11 (sc[4:8] & 15) | (mn[4:8] & 15) << 4.  qs: in each 64-weight chunk c, byte l holds
  weight 64c + l (low nibble) and 64c + 32 + l (high nibble); Q5_K qh bit 2c (2c + 1) of byte l is bit 4 of weight
  64c + l (64c + 32 + l).  Q6_K: per 128-weight half h, ql[64h + l] = low nibbles of weights l | l + 64 (high),
  ql[64h + 32 + l] = l + 32 | l + 96, qh[32h + l] = bits 4-5 of weights l, l + 32, l + 64, l + 96 at shifts 0, 2, 4, 6.

`quantize(w)` (no params) is llama.cpp's quantize_row_q{4,5,6}_K_ref, and with `importance` (imatrix, [K] or
[N, K]) quantize_row_q{4,5,6}_K_impl, ported op for op (ggml_ref.py): the bytes equal llama.cpp's quantize_q*_K
for the same float32 input (tests/formats/test_llamacpp.py). A sub-block whose scale rounds to 0 keeps the codes
of llama.cpp's search (they all dequantize to the same value); `encode` gives the zero point 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, ReferenceQuantizer, check_importance
from gemmaquant.formats.ggml_ref import (GROUP_MAX_EPS, div, make_qkx_quants, make_qp_quants, make_qx_quants, max_abs,
                                         nearest_int, seqsum, sqrtf)

QK = 256
# type -> (sub-block size, qmax, block bytes)
LAYOUT = {"Q4_K": (32, 15, 144), "Q5_K": (32, 31, 176), "Q6_K": (16, 63, 210)}


def pack_scales(ls: Tensor, lm: Tensor) -> Tensor:
    """quantize_row_q4_K's packing of 8 sub-block scales/mins (uint8 values) into scales[12], as C does it."""
    ls, lm = ls.int(), lm.int()
    return torch.cat([(ls[..., :4] | ((ls[..., 4:] >> 4) << 6)) & 0xFF,
                      (lm[..., :4] | ((lm[..., 4:] >> 4) << 6)) & 0xFF,
                      (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)], -1)


def unpack_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """get_scale_min_k4 for j = 0..7: scales[12] -> (sc [.., 8], mn [.., 8]) 6-bit values."""
    b = b.int()
    sc = torch.cat([b[..., 0:4] & 63, (b[..., 8:12] & 0xF) | ((b[..., 0:4] >> 6) << 4)], -1)
    mn = torch.cat([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)], -1)
    return sc, mn


@dataclass(frozen=True)
class KQuant(ReferenceQuantizer):
    """One of Q4_K, Q5_K, Q6_K (type_name); the affine block is the sub-block (32, or 16 for Q6_K)."""

    type_name: str = "Q4_K"
    super_block = QK  # fit unit: the sub-block parameters are chosen per 256-weight super-block
    zero_code = 0  # what ggml stores in a zero sub-block (Q6_K too: make_qx_quants / memset leave 0, not 32)

    def __post_init__(self):
        if self.type_name not in LAYOUT:
            raise ValueError(f"KQuant type_name must be one of {list(LAYOUT)}, got {self.type_name!r}")

    ggml_type = property(lambda self: gguf.GGMLQuantizationType[self.type_name])
    name = property(lambda self: self.type_name.lower())
    block = property(lambda self: LAYOUT[self.type_name][0])
    bits = property(lambda self: LAYOUT[self.type_name][2] * 8 / QK)
    qmax = property(lambda self: LAYOUT[self.type_name][1])
    row_block = property(lambda self: QK)
    # sub-block scales / mins QAT may train: one unit is about 1/50 of the sub-block's step (6-bit values
    # near the top of [0, 63]); Q6_K's 8-bit scales are signed (ggml's quantizer makes them negative, d too)
    trainable_ints = property(lambda self: {"sc": (-128, 127)} if self.type_name == "Q6_K"
                              else {"sc": (0, 63), "mn": (0, 63)})

    def _reference(self, w: Tensor, importance: Tensor | None) -> tuple[Tensor, dict]:
        """llama.cpp quantize_row_*_K_ref (importance None) or quantize_row_*_K_impl -> (codes [N, K], params)."""
        N, K = w.shape
        S = K // QK
        sub, qmax, _ = LAYOUT[self.type_name]
        x = w.reshape(-1, sub).T.contiguous()  # [sub, B]: column b is sub-block b, in (row, super-block, j) order
        qw = None if importance is None else check_importance(importance, w).reshape(-1, sub).T.contiguous()
        if self.type_name == "Q6_K":
            return self._q6_k(x, qw, N, S)
        if qw is None:  # _ref: weights av_x + |x| with av_x the sub-block's rms
            av_x = sqrtf(div(seqsum(x * x), 32.0))
            weights = av_x + x.abs()
            rmin, rdelta, nstep = (-1.0, 0.1, 20) if qmax == 15 else (-0.5, 0.1, 15)
            scales, mins, L = make_qkx_quants(x, weights, qmax, rmin, rdelta, nstep)
            scales, mins = scales.view(N * S, 8), mins.view(N * S, 8)
            max_scale, max_min = scales.amax(-1), mins.amax(-1)  # `if (s > max_scale) max_scale = s;` from +0.0
            max_scale, max_min = torch.where(max_scale > 0, max_scale, 0.0), torch.where(max_min > 0, max_min, 0.0)
            inv_scale = torch.where(max_scale > 0, div(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
            inv_min = torch.where(max_min > 0, div(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
            ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)  # uint8_t ls = ...; MIN(63, ls)
            lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
            d, dmin = div(max_scale, 63.0), div(max_min, 63.0)
        else:  # _impl: imatrix weights qw * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) over the super-block
            xs = w.reshape(N * S, QK).T.contiguous()  # [256, N * S]
            sigma2 = div(2 * seqsum(xs * xs), 256.0)
            weights = qw * sqrtf(sigma2.repeat_interleave(QK // sub) + x * x)
            sw = seqsum(weights).view(N * S, 8).T.contiguous()  # [8, N * S]
            scales, mins, L = make_qkx_quants(x, weights, qmax, -0.9, 0.05, 36)
            d, ls = make_qp_quants(scales.view(N * S, 8).T.contiguous(), 63, sw)
            dmin, lm = make_qp_quants(mins.view(N * S, 8).T.contiguous(), 63, sw)
            ls, lm = ls.T, lm.T  # [N * S, 8]
            if qmax == 31:  # quantize_row_q5_K_impl clamps, q4_K_impl does not (make_qp_quants keeps <= 63)
                ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        sc, mn = unpack_scales(pack_scales(ls, lm))  # what the block stores, read back as C reads it
        d16, dmin16 = d.to(torch.float16), dmin.to(torch.float16)
        dd = (d16.float()[:, None] * sc.float()).reshape(-1)  # [B] sub-block scale
        dm = (dmin16.float()[:, None] * mn.float()).reshape(-1)
        q = nearest_int(div(x + dm, torch.where(dd == 0, 1.0, dd))).clamp(0, qmax)
        codes = torch.where(dd != 0, q, L)  # `if (!d) continue;` keeps the search's codes
        params = {"d": d16.view(N, S), "sc": sc.to(torch.uint8).view(N, S, 8),
                  "dmin": dmin16.view(N, S), "mn": mn.to(torch.uint8).view(N, S, 8)}
        return codes.T.reshape(N, K).int(), params

    def _q6_k(self, x: Tensor, qw: Tensor | None, N: int, S: int) -> tuple[Tensor, dict]:
        scales, L = make_qx_quants(x, 32, qw)  # [B], [16, B] in [0, 63]
        scales = scales.view(N * S, 16)
        amax, max_scale = max_abs(scales.T)
        zero = amax < GROUP_MAX_EPS  # the whole super-block is stored as zeros
        iscale = div(-128.0, torch.where(zero, 1.0, max_scale))
        d16 = torch.where(zero, 0.0, div(1.0, iscale)).to(torch.float16)
        sc = nearest_int(iscale[:, None] * scales).clamp(max=127)
        sc = torch.where(zero[:, None], 0, ((sc & 0xFF) ^ 0x80) - 0x80)  # int8_t store
        dd = (d16.float()[:, None] * sc.float()).reshape(-1)  # [B]
        q = nearest_int(div(x, torch.where(dd == 0, 1.0, dd))).clamp(-32, 31) + 32
        codes = torch.where(dd != 0, q, L)
        codes = torch.where(zero.repeat_interleave(16), 0, codes)
        return codes.T.reshape(N, -1).int(), {"d": d16.view(N, S), "sc": sc.to(torch.int8).view(N, S, 16)}

    def grid(self, params: dict):
        d = params["d"].float()[..., None]
        N = d.shape[0]
        scale = (d * params["sc"].float()).reshape(N, -1)  # [N, K // block]
        if self.type_name == "Q6_K":
            return scale, -32 * scale, 0, 63
        offset = -(params["dmin"].float()[..., None] * params["mn"].float()).reshape(N, -1)
        return scale, offset, 0, self.qmax

    def dequantize(self, p: Packed) -> Tensor:
        """ggml's dequantize_row_*_K: (d sc) q - (dmin mn), or (d sc) (q - 32) for Q6_K. The grid's values, with
        ggml's bits (signed zeros included)."""
        N, K = p.shape
        scale, offset, _, _ = self.grid(self.params(p))
        q = p.data["codes"].float().view(N, scale.shape[1], self.block)
        if self.type_name == "Q6_K":
            return (scale[:, :, None] * (q - 32)).reshape(N, K)
        return (scale[:, :, None] * q - (-offset)[:, :, None]).reshape(N, K)

    def pack(self, codes: Tensor, params: dict) -> Packed:
        data = {"codes": codes.to(torch.int32).contiguous(), "d": params["d"].to(torch.float16).contiguous(),
                "sc": params["sc"].to(torch.int8 if self.type_name == "Q6_K" else torch.uint8).contiguous()}
        if self.type_name != "Q6_K":
            data["dmin"] = params["dmin"].to(torch.float16).contiguous()
            data["mn"] = params["mn"].to(torch.uint8).contiguous()
        return Packed(self, (codes.shape[0], codes.shape[1]), data)

    # ---- ggml block bytes ----
    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        N, K = p.shape
        S = K // QK
        q = p.data["codes"].cpu().numpy().astype(np.uint8).reshape(N, S, QK)
        d = p.data["d"].cpu().numpy().reshape(N, S, 1).view(np.uint8)
        if self.type_name == "Q6_K":
            lo, hi = q & 0xF, q >> 4
            ql, qh = [], []
            for h in range(2):  # two halves of 128 weights
                a = lambda i: slice(128 * h + 32 * i, 128 * h + 32 * i + 32)  # noqa: E731  quarter i of half h
                ql += [lo[..., a(0)] | (lo[..., a(2)] << 4), lo[..., a(1)] | (lo[..., a(3)] << 4)]
                qh.append(hi[..., a(0)] | (hi[..., a(1)] << 2) | (hi[..., a(2)] << 4) | (hi[..., a(3)] << 6))
            sc = p.data["sc"].cpu().numpy().astype(np.int8).view(np.uint8).reshape(N, S, 16)
            return np.concatenate(ql + qh + [sc, d], -1).reshape(N, S * 210)
        dmin = p.data["dmin"].cpu().numpy().reshape(N, S, 1).view(np.uint8)
        scales = pack_scales(p.data["sc"].cpu(), p.data["mn"].cpu()).numpy().astype(np.uint8).reshape(N, S, 12)
        lo = q & 0xF
        qs = [lo[..., 64 * c:64 * c + 32] | (lo[..., 64 * c + 32:64 * c + 64] << 4) for c in range(4)]
        parts = [d, dmin, scales]
        if self.type_name == "Q5_K":
            hb = (q >> 4) & 1
            qh = np.zeros((N, S, 32), np.uint8)
            for c in range(4):
                qh |= (hb[..., 64 * c:64 * c + 32] << (2 * c)) | (hb[..., 64 * c + 32:64 * c + 64] << (2 * c + 1))
            parts.append(qh)
        return np.concatenate(parts + qs, -1).reshape(N, S * LAYOUT[self.type_name][2])

    def from_gguf_bytes(self, raw: np.ndarray, shape) -> Packed:
        N, K = shape
        S = K // QK
        b = np.ascontiguousarray(raw).reshape(N, S, LAYOUT[self.type_name][2]).astype(np.int32)
        f16 = lambda a: torch.from_numpy(a.astype(np.uint8).copy().view(np.float16)[..., 0].copy())  # noqa: E731
        if self.type_name == "Q6_K":
            ql, qh, sc = b[..., :128], b[..., 128:192], b[..., 192:208]
            quarters = []
            for h in range(2):
                l0, l1, hh = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64], qh[..., 32 * h:32 * h + 32]
                quarters += [(l0 & 0xF) | ((hh & 3) << 4), (l1 & 0xF) | (((hh >> 2) & 3) << 4),
                             (l0 >> 4) | (((hh >> 4) & 3) << 4), (l1 >> 4) | (((hh >> 6) & 3) << 4)]
            q = np.concatenate(quarters, -1)
            data = {"d": f16(b[..., 208:210]), "sc": torch.from_numpy(sc.astype(np.uint8).view(np.int8).copy())}
        else:
            sc, mn = unpack_scales(torch.from_numpy(b[..., 4:16].copy()))
            pos, hb = 16, 0
            if self.type_name == "Q5_K":
                qh = b[..., 16:48]
                hb = np.concatenate([(qh >> s) & 1 for s in range(8)], -1)  # bit s of qh: weights 32s .. 32s + 31
                pos = 48
            qs = b[..., pos:pos + 128]
            q = np.concatenate([h for c in range(4) for h in (qs[..., 32 * c:32 * c + 32] & 0xF,
                                                               qs[..., 32 * c:32 * c + 32] >> 4)], -1) | (hb << 4)
            data = {"d": f16(b[..., 0:2]), "sc": sc.to(torch.uint8), "dmin": f16(b[..., 2:4]), "mn": mn.to(torch.uint8)}
        return Packed(self, (N, K), {"codes": torch.from_numpy(q.reshape(N, K).astype(np.int32)), **data})


Q4_K, Q5_K, Q6_K = KQuant("Q4_K"), KQuant("Q5_K"), KQuant("Q6_K")
