"""GGUF non-linear 4-bit types IQ4_NL and IQ4_XS (ggml-common.h block_iq4_nl / block_iq4_xs).

Both store 4-bit indices into llama.cpp's fixed codebook kvalues_iq4nl (16 int8 values, ggml-common.h):
    LEVELS = -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113
so the grid of a 32-weight block is w = scale * LEVELS[q], q in [0, 15] (`QuantFormat.levels`: the grid is
non-uniform, denser near 0, where most weights are).

Packed.data:
  codes int32 [N, K]          the stored index q in [0, 15]
  d     fp16  [N, K // 32]    IQ4_NL: the block scale                       w = d * LEVELS[q]
        fp16  [N, K // 256]   IQ4_XS: the super-block scale
  sc    uint8 [N, K // 256, 8]  IQ4_XS: 6-bit sub-block scales ls           w = (d * (ls - 32)) * LEVELS[q]
Block bytes (little-endian):
  IQ4_NL  18 B: d | qs[16]: byte j = q[j] | q[j + 16] << 4
  IQ4_XS 136 B: d | scales_h u16 (bits 2i, 2i + 1: bits 4-5 of ls[i]) | scales_l[4] (byte i // 2: bits 0-3 of
         ls[i], in the low nibble for even i, the high one for odd i) | qs[128]: 16 bytes per 32-block as IQ4_NL

`quantize(w)` (no params) is what llama-quantize writes: ggml's quantize_iq4_nl / quantize_iq4_xs (both
quantize_row_iq4_nl_impl with ntry = 7; weights x^2, or with `importance` qw * sqrt(sigma2 + x^2), sigma2 =
2 mean(x^2) over the 32- or 256-weight super-block), ported op for op: byte-identical to llama.cpp
(tests/formats/test_llamacpp.py). Indices are chosen with ggml's best_index_int8 (nearest level, ties to the
upper one), on the fp32 scale before it is stored as fp16, as C does; `encode` rounds on the stored scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, ReferenceQuantizer, check_importance, nearest_level
from gemmaquant.formats.ggml_ref import GROUP_MAX_EPS, div, max_abs, nearest_int, seqsum, sqrtf

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
LEVELS = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs search 2 * 7 + 1 scales around max / LEVELS[0]
# type -> (super-block: weights that share the stored fp16 d, block bytes)
LAYOUT = {"IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}


def best_index(x: Tensor) -> Tensor:
    """ggml best_index_int8(16, kvalues_iq4nl, x) for every x: the nearest level, a tie to the upper one."""
    return nearest_level(x, LEVELS)


def _block_search(x: Tensor, weight: Tensor) -> Tensor:
    """The per-32-block scale search of quantize_row_iq4_nl_impl (ntry > 0), x, weight [32, B] -> scale [B]."""
    amax, mx = max_abs(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    v0 = float(KVALUES_IQ4NL[0])

    def sums(iscale):
        q = LEVELS.to(x.device)[best_index(iscale * x)]
        wq = weight * q
        return seqsum(wq * x, wq * q)

    d = div(-mx, v0)  # -max / values[0]
    sumqx, sumq2 = sums(div(1.0, d))
    d = torch.where(sumq2 > 0, div(sumqx, torch.where(sumq2 > 0, sumq2, 1.0)), 0.0)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums(div(float(itry + KVALUES_IQ4NL[0]), mx))  # id = (itry + values[0]) / max
        upd = (sumq2 > 0) & ((sumqx * sumqx) > (best * sumq2))
        d = torch.where(upd, div(sumqx, torch.where(upd, sumq2, 1.0)), d)
        best = torch.where(upd, d * sumqx, best)
    return torch.where(zero, 0.0, d)


def _inverse(d: Tensor) -> Tensor:
    """`d ? 1/d : 0`."""
    return torch.where(d != 0, div(1.0, torch.where(d != 0, d, 1.0)), 0.0)


@dataclass(frozen=True)
class IQ4(ReferenceQuantizer):
    """IQ4_NL (type_name "IQ4_NL", 32-block) or IQ4_XS ("IQ4_XS", 256 super-block, 6-bit sub-block scales)."""

    type_name: str = "IQ4_NL"
    block = 32
    zero_code = 8  # best_index_int8(0): what ggml stores in a block whose scale is 0 (LEVELS[8] = 1)
    levels = LEVELS

    def __post_init__(self):
        if self.type_name not in LAYOUT:
            raise ValueError(f"IQ4 type_name must be one of {list(LAYOUT)}, got {self.type_name!r}")

    ggml_type = property(lambda self: gguf.GGMLQuantizationType[self.type_name])
    name = property(lambda self: self.type_name.lower())
    bits = property(lambda self: LAYOUT[self.type_name][1] * 8 / LAYOUT[self.type_name][0])
    row_block = property(lambda self: LAYOUT[self.type_name][0])
    super_block = property(lambda self: LAYOUT[self.type_name][0])  # GPTQ fits the parameters per super-block
    qmax = 15

    def _reference(self, w: Tensor, importance: Tensor | None) -> tuple[Tensor, dict]:
        """ggml quantize_iq4_nl / quantize_iq4_xs (quant_weights = importance) -> (codes [N, K], params)."""
        N, K = w.shape
        sbs = LAYOUT[self.type_name][0]
        x = w.reshape(-1, 32).T.contiguous()  # [32, B]: column b is block b, in (row, block) order
        if importance is None:
            weight = x * x
        else:
            qw = check_importance(importance, w).reshape(-1, 32).T.contiguous()
            xs = w.reshape(-1, sbs).T.contiguous()  # [sbs, N K / sbs]
            sigma2 = seqsum(xs * xs) * float(np.float32(2.0) / np.float32(sbs))  # sigma2 *= 2.f/super_block_size
            weight = qw * sqrtf(sigma2.repeat_interleave(sbs // 32) + x * x)
        scales = _block_search(x, weight)  # [B] fp32
        if self.type_name == "IQ4_NL":
            codes = best_index(_inverse(scales) * x)
            params = {"d": scales.to(torch.float16).view(N, K // 32)}
        else:
            S = N * K // sbs
            _, max_scale = max_abs(scales.view(S, 8).T.contiguous())  # the scale of largest |d|, the first one
            d = div(-max_scale, 32.0)
            l = nearest_int(_inverse(d).repeat_interleave(8) * scales).clamp(-32, 31)
            dl = d.repeat_interleave(8) * l.float()
            codes = best_index(_inverse(dl) * x)
            params = {"d": d.to(torch.float16).view(N, K // sbs), "sc": (l + 32).to(torch.uint8).view(N, K // sbs, 8)}
        return codes.T.reshape(N, K).to(torch.int32), params

    def grid(self, params: dict):
        """(scale [N, K // 32], offset 0, 0, 15): w = scale * LEVELS[q]."""
        d = params["d"].float()
        if self.type_name == "IQ4_XS":
            d = (d[..., None] * (params["sc"].float() - 32)).reshape(d.shape[0], -1)
        return d, torch.zeros_like(d), 0, 15

    def dequantize(self, p: Packed) -> Tensor:
        """ggml dequantize_row_iq4_*: dl * kvalues[q] with dl = d (NL) or d * (ls - 32) (XS), in fp32."""
        N, K = p.shape
        scale = self.grid(self.params(p))[0]
        v = LEVELS.to(scale.device)[p.data["codes"].long()].view(N, K // 32, 32)
        return (scale[:, :, None] * v).reshape(N, K)

    def pack(self, codes: Tensor, params: dict) -> Packed:
        data = {"codes": codes.to(torch.int32).contiguous(), "d": params["d"].to(torch.float16).contiguous()}
        if self.type_name == "IQ4_XS":
            data["sc"] = params["sc"].to(torch.uint8).contiguous()
        return Packed(self, (codes.shape[0], codes.shape[1]), data)

    # ---- ggml block bytes ----
    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        N, K = p.shape
        sbs, nbytes = LAYOUT[self.type_name]
        S = K // sbs
        q = p.data["codes"].cpu().numpy().astype(np.uint8).reshape(N, S, sbs // 32, 32)
        qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(N, S, sbs // 2)
        parts = [p.data["d"].cpu().numpy().reshape(N, S, 1).view(np.uint8)]
        if self.type_name == "IQ4_XS":
            ls = p.data["sc"].cpu().numpy().astype(np.uint16).reshape(N, S, 8)
            scales_h = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(-1, dtype=np.uint16)
            scales_l = ((ls[..., 0::2] & 0xF) | ((ls[..., 1::2] & 0xF) << 4)).astype(np.uint8)
            parts += [scales_h.reshape(N, S, 1).view(np.uint8), scales_l]
        return np.concatenate(parts + [qs], -1).reshape(N, S * nbytes)

    def from_gguf_bytes(self, raw: np.ndarray, shape) -> Packed:
        N, K = shape
        sbs, nbytes = LAYOUT[self.type_name]
        S = K // sbs
        b = np.ascontiguousarray(raw).reshape(N, S, nbytes)
        qs = b[..., -(sbs // 2):].reshape(N, S, sbs // 32, 16)
        q = np.concatenate([qs & 0xF, qs >> 4], -1).reshape(N, K).astype(np.int32)
        data = {"d": torch.from_numpy(b[..., 0:2].copy().view(np.float16)[..., 0].copy())}
        if self.type_name == "IQ4_XS":
            scales_h = b[..., 2:4].copy().view(np.uint16).astype(np.int32)  # [N, S, 1]
            scales_l = b[..., 4:8].astype(np.int32)
            low = np.stack([scales_l & 0xF, scales_l >> 4], -1).reshape(N, S, 8)
            high = (scales_h >> (2 * np.arange(8))) & 3
            data["sc"] = torch.from_numpy((low | (high << 4)).astype(np.uint8))
        return Packed(self, (N, K), {"codes": torch.from_numpy(q), **data})


IQ4_NL, IQ4_XS = IQ4("IQ4_NL"), IQ4("IQ4_XS")
