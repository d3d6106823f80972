"""int8 symmetric per output channel (compressed-tensors W8A16 "channel", the int8 Triton kernel's layout).

Packed layout:
  qdata int8        [N, K]   q in [-127, 127] (-128 unused, as in compressed-tensors)
  scale scale_dtype [N]      bfloat16 by default; float16 / float32 allowed
  w = scale[n] * q[n, k]
Grid (base.py): one block per row (block = PER_ROW), offset 0. RTN scale = absmax(row) / 127 rounded to
scale_dtype; with importance, the importance-weighted search of base.search_scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemmaquant.formats.base import PER_ROW, Packed, QuantFormat, search_scale, weighted_importance
from gemmaquant.formats.int_group import SCALE_DTYPES


@dataclass(frozen=True)
class Int8Channel(QuantFormat):
    scale_dtype: torch.dtype = torch.bfloat16
    name = "int8"
    block = PER_ROW  # one (scale, 0) pair per row, whatever K is

    def __post_init__(self):
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"Int8Channel scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype}")

    @property
    def bits(self) -> float:  # the row scale is negligible per weight
        return 8.0

    def expand(self, t: Tensor, K: int, col_start: int = 0) -> Tensor:
        return t[:, :1].expand(-1, K)

    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        self.check(w)
        s = w.float().abs().amax(-1, keepdim=True) / 127  # [N, 1]
        store = lambda s: s.to(self.scale_dtype)  # noqa: E731
        if importance is not None:
            imp = weighted_importance(w, importance)
            return {"scale": search_scale(w.float()[:, None, :], imp[:, None, :], -127, 127, s, store=store)[:, 0]}
        return {"scale": store(s[:, 0])}

    def grid(self, params: dict):
        s = params["scale"].float()[:, None]  # [N, 1]
        return s, torch.zeros_like(s), -127, 127

    def pack(self, codes: Tensor, params: dict) -> Packed:
        return Packed(self, (codes.shape[0], codes.shape[1]),
                      {"qdata": codes.to(torch.int8).contiguous(), "scale": params["scale"].to(self.scale_dtype)})

    def codes(self, p: Packed) -> Tensor:
        return p.data["qdata"].to(torch.int32)

    def params(self, p: Packed) -> dict:
        return {"scale": p.data["scale"]}
