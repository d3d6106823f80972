"""Group-wise integer formats for compressed-tensors / vLLM / the Triton kernels: IntGroup(b = 2..8), Int4Group.

IntGroup(bits_per_code, group_size, symmetric, scale_dtype); Int4Group(group_size, symmetric, scale_dtype) is
IntGroup(4, ...). Packed layout (the Triton int4 kernels implement exactly this; do not change it):
  bits = 4:   qdata uint8 [N, K // 2]   k = 2j in the LOW nibble, k = 2j + 1 in the HIGH nibble, u in [0, 15]
  bits != 4:  qdata uint8 [N, K]        one code u per byte, u in [0, 2^b - 1] (int3 / int2 are for quality
                                        studies; no kernel reads them, so they are not bit-packed)
              scale scale_dtype [N, K // g]   (bfloat16 default; float16 / float32 allowed)
              zero  uint8 [N, K // g]         asymmetric only; symmetric means zero = 2^(b-1) (8 for int4)
  w = scale * (u - zero)
Symmetric: u - zero in [-(2^(b-1) - 1), 2^(b-1) - 1], scale = absmax / (2^(b-1) - 1) (the code -2^(b-1) is unused,
as in compressed-tensors). Asymmetric: the group's range [min(w, 0), max(w, 0)] over 2^b - 1 steps, zero =
round(-min / scale). Grid (base.py): q = u - zero_sym, offset 0 (symmetric) or q = u, offset = -scale * zero;
with bf16 / fp16 scales scale * q + offset equals scale * (u - zero) exactly (a product of <= 20 bits).
With importance the symmetric scale is chosen by an importance-weighted search (base.search_scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, QuantFormat, search_scale, weighted_importance

SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class IntGroup(QuantFormat):
    bits_per_code: int = 4
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if not 2 <= self.bits_per_code <= 8:
            raise ValueError(f"IntGroup supports 2..8 bits, got {self.bits_per_code}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"IntGroup group_size must be a positive even number, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"IntGroup scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype}")

    @property
    def block(self) -> int:
        return self.group_size

    @property
    def name(self) -> str:
        return f"int{self.bits_per_code}_g{self.group_size}_{'sym' if self.symmetric else 'asym'}"

    @property
    def bits(self) -> float:  # codes + the scale (+ the zero) of each group
        extra = torch.finfo(self.scale_dtype).bits + (0 if self.symmetric else 8)
        return self.bits_per_code + extra / self.group_size

    @property
    def zero_point(self) -> int:
        """The implicit zero of the symmetric grid: 2^(b-1)."""
        return 1 << (self.bits_per_code - 1)

    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        self.check(w)
        N, K = w.shape
        b = w.float().view(N, K // self.group_size, self.group_size)  # [N, G, g]
        store = lambda s: s.to(self.scale_dtype)  # noqa: E731
        if self.symmetric:
            m = self.zero_point - 1
            s = b.abs().amax(-1) / m
            if importance is not None:
                imp = weighted_importance(w, importance).view_as(b)
                return {"scale": search_scale(b, imp, -m, m, s, store=store)}
            return {"scale": store(s)}
        qmax = (1 << self.bits_per_code) - 1
        lo, hi = b.amin(-1).clamp(max=0), b.amax(-1).clamp(min=0)
        s = store((hi - lo) / qmax)
        sf = s.float()
        zero = torch.where(sf == 0, torch.zeros_like(lo), torch.floor(-lo / torch.where(sf == 0, 1.0, sf) + 0.5))
        return {"scale": s, "zero": zero.clamp(0, qmax).to(torch.uint8)}

    def grid(self, params: dict):
        s = params["scale"].float()
        if self.symmetric:
            m = self.zero_point - 1
            return s, torch.zeros_like(s), -m, m
        return s, -s * params["zero"].float(), 0, (1 << self.bits_per_code) - 1

    def pack(self, codes: Tensor, params: dict) -> Packed:
        u = (codes + (self.zero_point if self.symmetric else 0)).to(torch.uint8)  # unsigned code u
        if self.bits_per_code == 4:
            u = u[:, 0::2] | (u[:, 1::2] << 4)
        data = {"qdata": u.contiguous(), "scale": params["scale"].to(self.scale_dtype).contiguous()}
        if not self.symmetric:
            data["zero"] = params["zero"].to(torch.uint8).contiguous()
        return Packed(self, (codes.shape[0], codes.shape[1]), data)

    def unsigned(self, p: Packed) -> Tensor:
        """The stored codes u [N, K] int32, unpacked from the nibbles for int4."""
        q = p.data["qdata"]
        if self.bits_per_code == 4:
            q = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(q.shape[0], -1)
        return q.to(torch.int32)

    def codes(self, p: Packed) -> Tensor:
        return self.unsigned(p) - (self.zero_point if self.symmetric else 0)

    def params(self, p: Packed) -> dict:
        return {k: v for k, v in p.data.items() if k != "qdata"}


def Int4Group(group_size: int = 32, symmetric: bool = True, scale_dtype: torch.dtype = torch.bfloat16) -> IntGroup:
    """int4 group-wise: IntGroup(4, group_size, symmetric, scale_dtype) (group_size 32, 64 or 128 in FORMATS)."""
    return IntGroup(4, group_size, symmetric, scale_dtype)
