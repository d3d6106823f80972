"""GGUF K-quants under 4 bits: Q3_K (ggml-common.h block_q3_K), 256-weight super-blocks of 16 sub-blocks of 16.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, ReferenceQuantizer, check_importance
from gemmaquant.formats.ggml_ref import div, make_q3_quants, make_qx_quants, max_abs, nearest_int, seqsum, sqrtf

QK = 256


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

    def codes(self, p: Packed) -> Tensor:
        return p.data["codes"]

    def params(self, p: Packed) -> dict:
        return {k: v for k, v in p.data.items() if k != "codes"}

    # ---- ggml block bytes ----
    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        N, K = p.shape
        S = K // QK
        q = p.data["codes"].cpu().numpy().astype(np.uint8).reshape(N, S, 8, 32)  # [.., h, l]: weight 32 h + l
        hmask = ((q >> 2) << np.arange(8, dtype=np.uint8)[:, None]).sum(-2, dtype=np.uint8)  # [N, S, 32]
        low = (q & 3).reshape(N, S, 2, 4, 32)  # [.., c, i, l]: weight 128 c + 32 i + l
        qs = (low << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2, dtype=np.uint8).reshape(N, S, 64)
        scales = _pack_scales(p.data["sc"].cpu()).numpy().astype(np.uint8).reshape(N, S, 12)
        d = p.data["d"].cpu().numpy().reshape(N, S, 1).view(np.uint8)
        return np.concatenate([hmask, qs, scales, d], -1).reshape(N, S * 110)

    def from_gguf_bytes(self, raw: np.ndarray, shape) -> Packed:
        N, K = shape
        S = K // QK
        b = np.ascontiguousarray(raw).reshape(N, S, 110)
        hmask, qs = b[..., :32], b[..., 32:96].reshape(N, S, 2, 1, 32)
        high = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [N, S, 8, 32]
        low = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [N, S, 2, 4, 32]
        q = (low.reshape(N, S, 8, 32) | (high << 2)).reshape(N, K).astype(np.int32)
        sc = _unpack_scales(torch.from_numpy(b[..., 96:108].astype(np.int32))).to(torch.uint8)
        d = torch.from_numpy(b[..., 108:110].copy().view(np.float16)[..., 0].copy())
        return Packed(self, (N, K), {"codes": torch.from_numpy(q), "d": d, "sc": sc})


Q3_K = Q3K("Q3_K")
