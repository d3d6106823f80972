"""Integer formats for compressed-tensors / vLLM: int-b group-wise (b = 2..8) and int8 per output channel.

IntGroup(bits, group_size, symmetric, scale_dtype)        Int4Group = IntGroup with bits=4
  bits = 4:  qdata uint8 [N, K // 2]   k = 2j in the LOW nibble, k = 2j + 1 in the HIGH nibble, u in [0, 15]
  bits != 4: qdata uint8 [N, K]        one code u per byte, u in [0, 2^bits - 1]
             scale scale_dtype [N, K // g]
             zero  uint8 [N, K // g]   asymmetric only; symmetric means zero = 2^(bits-1) (8 for int4)
  w = scale * (u - zero)
Symmetric int4 g32 with bf16 scales is exactly GGUF Q4_0 (d = scale as fp16, q = u) and compressed-tensors
W4A16 g32 (q = u - 8). Symmetric grids use u - zero in [-(2^(b-1) - 1), 2^(b-1) - 1] (absmax / (2^(b-1) - 1)).

Int8Channel(scale_dtype):  qdata int8 [N, K] (q in [-127, 127]), scale scale_dtype [N];  w = scale[n] * q.
Exactly GGUF Q8_0 (the row scale in every 32-block, as fp16 d) and compressed-tensors W8A16 channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemmaquant.formats.base import Packed, QuantFormat, search_scale, weighted_importance


def _round_scale(s: Tensor, dtype: torch.dtype) -> Tensor:
    return s.to(dtype)


@dataclass(frozen=True)
class IntGroup(QuantFormat):
    bits_per_code: int = 4
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if not 2 <= self.bits_per_code <= 8:
            raise ValueError(f"IntGroup supports 2..8 bits, got {self.bits_per_code}")

    @property
    def block(self) -> int:
        return self.group_size

    @property
    def name(self) -> str:
        return f"int{self.bits_per_code}_g{self.group_size}_{'sym' if self.symmetric else 'asym'}"

    @property
    def bits(self) -> float:
        extra = 16 + (0 if self.symmetric else 8)
        return self.bits_per_code + extra / self.group_size

    @property
    def _zero_sym(self) -> int:
        return 1 << (self.bits_per_code - 1)

    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        N, K = w.shape
        b = w.float().view(N, K // self.group_size, self.group_size)
        if self.symmetric:
            m = self._zero_sym - 1
            s = b.abs().amax(-1) / m
            if importance is not None:
                imp = weighted_importance(w, importance).view_as(b)
                s = search_scale(b, imp, -m, m, s)
            return {"scale": _round_scale(s, self.scale_dtype)}
        qmax = (1 << self.bits_per_code) - 1
        lo, hi = b.amin(-1).clamp(max=0), b.amax(-1).clamp(min=0)
        s = _round_scale((hi - lo) / qmax, self.scale_dtype)
        sf = s.float()
        zero = torch.where(sf == 0, torch.zeros_like(lo), torch.floor(-lo / torch.where(sf == 0, 1.0, sf) + 0.5))
        return {"scale": s, "zero": zero.clamp(0, qmax).to(torch.uint8)}

    def grid(self, params: dict):
        s = params["scale"].float()
        if self.symmetric:
            m = self._zero_sym - 1
            return s, torch.zeros_like(s), -m, m
        z = params["zero"].float()
        return s, -s * z, -int(0), (1 << self.bits_per_code) - 1  # codes are u - 0; offset = -scale * zero

    def pack(self, codes: Tensor, params: dict) -> Packed:
        u = codes + (self._zero_sym if self.symmetric else 0)  # unsigned code u
        u = u.to(torch.uint8)
        if self.bits_per_code == 4:
            u = u[:, 0::2] | (u[:, 1::2] << 4)
        data = {"qdata": u.contiguous(), "scale": params["scale"].contiguous()}
        if not self.symmetric:
            data["zero"] = params["zero"].contiguous()
        return Packed(self, (codes.shape[0], codes.shape[1]), data)

    def unsigned(self, p: Packed) -> Tensor:
        q = p.data["qdata"]
        if self.bits_per_code == 4:
            q = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(q.shape[0], -1)
        return q.to(torch.int32)

    def codes(self, p: Packed) -> Tensor:
        return self.unsigned(p) - (self._zero_sym if self.symmetric else 0)

    def params(self, p: Packed) -> dict:
        return {k: v for k, v in p.data.items() if k != "qdata"}


def Int4Group(group_size: int = 32, symmetric: bool = True, scale_dtype: torch.dtype = torch.bfloat16) -> IntGroup:
    return IntGroup(4, group_size, symmetric, scale_dtype)


@dataclass(frozen=True)
class Int8Channel(QuantFormat):
    scale_dtype: torch.dtype = torch.bfloat16
    name = "int8"

    @property
    def block(self) -> int:
        return 1 << 62  # one block per row, whatever K is

    @property
    def bits(self) -> float:
        return 8.0

    def expand(self, t: Tensor, K: int, col_start: int = 0) -> Tensor:
        return t[:, :1].expand(-1, K)

    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        s = w.float().abs().amax(-1, keepdim=True) / 127
        if importance is not None:
            imp = weighted_importance(w, importance)
            s = search_scale(w.float()[:, None, :], imp[:, None, :], -127, 127, s)
        return {"scale": s[:, 0].to(self.scale_dtype)}

    def grid(self, params: dict):
        s = params["scale"].float()[:, None]
        return s, torch.zeros_like(s), -127, 127

    def pack(self, codes: Tensor, params: dict) -> Packed:
        return Packed(self, (codes.shape[0], codes.shape[1]), {"qdata": codes.to(torch.int8).contiguous(),
                                                               "scale": params["scale"].contiguous()})

    def codes(self, p: Packed) -> Tensor:
        return p.data["qdata"].to(torch.int32)

    def params(self, p: Packed) -> dict:
        return {"scale": p.data["scale"]}

    def dequantize(self, p: Packed) -> Tensor:
        return p.data["scale"].float()[:, None] * p.data["qdata"].float()
