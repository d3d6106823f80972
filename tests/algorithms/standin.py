"""A tiny stand-in for gemmaquant.formats (same API), used only until the real formats land."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packed:
    fmt: object
    shape: tuple
    data: dict


@dataclass(frozen=True)
class _Base:
    def quantize(self, w, params=None, importance=None):
        params = self.fit(w, importance) if params is None else params
        return self.pack(self.encode(w, params), params)

    def pack(self, codes, params):
        return Packed(self, tuple(codes.shape), {"codes": codes, **params})

    def codes(self, p):
        return p.data["codes"]

    def params(self, p):
        return {k: v for k, v in p.data.items() if k != "codes"}

    def dequantize(self, p):
        s, o, _, _ = self.grid(self.params(p))
        q = p.data["codes"].float()
        N, K = q.shape
        return (s[:, :, None] * q.view(N, -1, self.block) + o[:, :, None]).view(N, K)

    def encode(self, w, params, col_start=0):
        s, o, qmin, qmax = self.grid(params)
        g = (torch.arange(w.shape[1]) + col_start) // self.block
        s, o = s[:, g], o[:, g]
        q = torch.where(s == 0, torch.zeros_like(w), torch.round((w - o) / s))
        return q.clamp(qmin, qmax).to(torch.int8)


@dataclass(frozen=True)
class IntGroup(_Base):
    bits: int = 4
    group_size: int = 32
    symmetric: bool = False

    @property
    def block(self):
        return self.group_size

    @property
    def name(self):
        return f"int{self.bits}_g{self.group_size}{'_sym' if self.symmetric else ''}"

    def fit(self, w, importance=None):
        N, K = w.shape
        b = w.view(N, K // self.block, self.block)
        if self.symmetric:
            d = b.abs().amax(-1) / (2 ** (self.bits - 1) - 1)
            return {"scale": d.half()}
        lo, hi = b.amin(-1).clamp(max=0), b.amax(-1).clamp(min=0)
        return {"scale": ((hi - lo) / (2 ** self.bits - 1)).half(), "min": lo.half()}

    def grid(self, params):
        s = params["scale"].float()
        if self.symmetric:
            m = 2 ** (self.bits - 1) - 1
            return s, torch.zeros_like(s), -m, m
        return s, params["min"].float(), 0, 2 ** self.bits - 1


@dataclass(frozen=True)
class KQuant(_Base):
    """Q4_K-like: 256-superblocks of 8 sub-blocks of 32, fp16 d/dmin, 6-bit sub-scales and sub-mins."""
    name: str = "kquant_standin"
    bits: int = 4
    block: int = 32
    super_block: int = 256

    def fit(self, w, importance=None):
        N, K = w.shape
        b = w.view(N, K // 32, 32)
        lo, hi = b.amin(-1).clamp(max=0), b.amax(-1).clamp(min=0)
        sc, mn = (hi - lo) / 15, -lo  # [N, K/32]
        sc_s, mn_s = sc.view(N, -1, 8), mn.view(N, -1, 8)
        d, dmin = (sc_s.amax(-1) / 63).half(), (mn_s.amax(-1) / 63).half()  # [N, K/256]
        ls = torch.where(d[..., None] > 0, torch.round(sc_s / d.float()[..., None]), 0).clamp(0, 63)
        lm = torch.where(dmin[..., None] > 0, torch.round(mn_s / dmin.float()[..., None]), 0).clamp(0, 63)
        return {"d": d, "dmin": dmin, "ls": ls.to(torch.uint8), "lm": lm.to(torch.uint8)}

    def grid(self, params):
        N = params["d"].shape[0]
        s = (params["d"].float()[..., None] * params["ls"].float()).view(N, -1)
        o = -(params["dmin"].float()[..., None] * params["lm"].float()).view(N, -1)
        return s, o, 0, 15


@dataclass(frozen=True)
class Q40(_Base):
    """Q4_0-like: blocks of 32, d = (signed value of largest magnitude) / -8 (may be negative), q in [0, 15]."""
    name: str = "q4_0_standin"
    bits: int = 4
    block: int = 32

    def fit(self, w, importance=None):
        N, K = w.shape
        b = w.view(N, K // 32, 32)
        mx = b.gather(-1, b.abs().argmax(-1, keepdim=True))[..., 0]
        return {"d": (mx / -8).half()}

    def grid(self, params):
        d = params["d"].float()
        return d, -8 * d, 0, 15


@dataclass(frozen=True)
class Channel8(_Base):
    """Int8 per output channel (one affine pair per row: block = K)."""
    name: str = "int8_channel_standin"
    bits: int = 8
    K: int = 512

    @property
    def block(self):
        return self.K

    def fit(self, w, importance=None):
        return {"scale": (w.abs().amax(1, keepdim=True) / 127)}

    def grid(self, params):
        s = params["scale"].float()
        return s, torch.zeros_like(s), -127, 127
