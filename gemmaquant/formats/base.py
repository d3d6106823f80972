"""What the bits are: every gemmaquant format is a per-block affine grid.

    w_hat[n, k] = scale[n, k // block] * q[n, k] + offset[n, k // block],   q integer in [qmin, qmax]

A format chooses the block parameters (`fit`, already rounded to their stored precision), says what grid they
define (`grid`), encodes weights onto that grid (`encode`), and stores codes + parameters in its packed layout
(`pack` / `Packed.data`, documented in each class). Algorithms (RTN, GPTQ, AWQ) only use fit / grid / encode /
pack, so what they choose is exactly what the exporters write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packed:
    """A quantized 2-D weight [N, K] (N output rows, K inputs; blocks run along K) in `fmt`'s layout."""

    fmt: "QuantFormat"
    shape: tuple[int, int]
    data: dict[str, Tensor]


def check_weight(w: Tensor, block: int, what: str = "weight") -> None:
    if w.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D [N, K] tensor, got shape {list(w.shape)}")
    if block < (1 << 40) and w.shape[1] % block:  # (per-channel formats use one unbounded block)
        raise ValueError(f"{what}: {w.shape[1]} inputs are not a multiple of the {block}-element block")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: contains NaN or Inf; cannot quantize")


class QuantFormat:
    """Base of every format: subclasses define `block`, `fit`, `grid`, `pack`, `codes`, `params`."""

    name: str = "?"
    bits: float = 0.0  # bits per weight including block parameters
    block: int = 1
    zero_code: int = 0  # the code stored for a block whose scale is 0

    def expand(self, t: Tensor, K: int, col_start: int = 0) -> Tensor:
        """Per-block [N, K // block] -> per-column [N, K'] for the columns [col_start, col_start + K')."""
        g = (torch.arange(K) + col_start) // self.block
        return t[:, g]

    def encode(self, w: Tensor, params: dict, col_start: int = 0) -> Tensor:
        """Nearest grid point (round half away from zero, as ggml's nearest_int / roundf) -> int32 codes."""
        scale, offset, qmin, qmax = self.grid(params)
        s = self.expand(scale, w.shape[1], col_start)
        o = self.expand(offset, w.shape[1], col_start)
        # an all-zero block has scale 0: its code is the grid's zero point (what ggml stores, e.g. 8 for Q4_0)
        x = torch.where(s == 0, torch.full_like(w, float(self.zero_code)), (w.float() - o) / torch.where(s == 0, 1.0, s))
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)
        return q.clamp(qmin, qmax).to(torch.int32)

    def quantize(self, w: Tensor, params: dict | None = None, importance: Tensor | None = None) -> Packed:
        check_weight(w, self.block)
        w = w.float()
        params = self.fit(w, importance) if params is None else params
        return self.pack(self.encode(w, params), params)

    def dequantize(self, p: Packed) -> Tensor:
        scale, offset, _, _ = self.grid(self.params(p))
        q = self.codes(p).float()
        N, K = p.shape
        G = scale.shape[1]
        return (scale[:, :, None] * q.view(N, G, K // G) + offset[:, :, None]).reshape(N, K)

    # subclasses
    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict: ...
    def grid(self, params: dict) -> tuple[Tensor, Tensor, int, int]: ...
    def pack(self, codes: Tensor, params: dict) -> Packed: ...
    def codes(self, p: Packed) -> Tensor: ...
    def params(self, p: Packed) -> dict: ...


def weighted_importance(w: Tensor, importance: Tensor | None) -> Tensor:
    """[N, K] weights for the block fits: importance per input channel (imatrix) or per element, else ones."""
    if importance is None:
        return torch.ones_like(w)
    imp = importance.float()
    return imp.expand_as(w) if imp.ndim == 1 else imp


def search_scale(b: Tensor, imp: Tensor, qmin: int, qmax: int, base: Tensor, steps: int = 20) -> Tensor:
    """Importance-weighted RTN for symmetric blocks b [.., block]: try scales base * (1 + t/steps - 0.5 ...)
    and keep the one minimising sum imp * (b - s q)^2 (llama.cpp's imatrix idea, make_qx_quants-style search)."""
    best, best_err = base, None
    for t in range(-steps // 2, steps // 2 + 1):
        s = base * (1 + 0.02 * t)
        x = torch.where(s[..., None] == 0, torch.zeros_like(b), b / torch.where(s == 0, 1.0, s)[..., None])
        q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp(qmin, qmax)
        err = (imp * (b - s[..., None] * q) ** 2).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best
