"""What the bits are: every gemmaquant format is a per-block affine grid.

    w_hat[n, k] = scale[n, k // block] * v(q[n, k]) + offset[n, k // block],   q integer in [qmin, qmax]

with v(q) = q (uniform grids), or v(q) = levels[q] for a codebook format (`levels`: the sorted values a code
decodes to, e.g. IQ4_NL's non-uniform 4-bit grid).

A format chooses the block parameters (`fit`, already rounded to their stored precision), says what grid they
define (`grid`), encodes weights onto that grid (`encode`), and stores codes + parameters in its packed layout
(`pack` / `Packed.data`, documented in each class). Algorithms (RTN, GPTQ, AWQ) only use fit / grid / encode /
pack, so what they choose is exactly what the exporters write. `dequantize` is `scale * q + offset` in fp32.

Invariant (tests/formats): fmt.quantize(fmt.dequantize(p), params=fmt.params(p)) has p's codes wherever the
block's scale is nonzero (where it is 0 every code decodes to the same value; encode gives `zero_code`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemmaquant.validate import all_finite

PER_ROW = 1 << 62  # `block` of a format with one affine pair per row, whatever K is


@dataclass
class Packed:
    """A quantized 2-D weight [N, K] (N output rows, K inputs; blocks run along K) in `fmt`'s layout.

    data holds the stored tensors exactly as the format's docstring lays them out (codes / qdata, scales, ...)."""

    fmt: "QuantFormat"
    shape: tuple[int, int]
    data: dict[str, Tensor]


def check_weight(w: Tensor, block: int, what: str = "weight") -> None:
    """ValueError unless w is a finite 2-D [N, K] tensor with K a multiple of `block`."""
    if w.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D [N, K] tensor, got shape {list(w.shape)}")
    if block < PER_ROW and w.shape[1] % block:
        raise ValueError(f"{what}: K = {w.shape[1]} inputs per row is not a multiple of the {block}-element block")
    if not all_finite(w):
        finite = torch.isfinite(w)
        n_nan, n_inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        r, c = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"{what}: contains NaN or Inf ({n_nan} NaN, {n_inf} Inf; first at [{r}, {c}]); "
                         "cannot quantize")


def check_importance(importance: Tensor, w: Tensor) -> Tensor:
    """importance [K] (one weight per input channel, imatrix) or [N, K] (per element) -> float32 [N, K]."""
    imp = importance.detach().float().to(w.device)
    if imp.shape not in ((w.shape[1],), tuple(w.shape)):
        raise ValueError(f"importance must be [K] = [{w.shape[1]}] or [N, K] = {list(w.shape)}, "
                         f"got {list(imp.shape)}")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and non-negative")
    return imp.expand_as(w).contiguous()


class QuantFormat:
    """Base of every format: subclasses define `block`, `fit`, `grid`, `pack`, `codes`, `params`
    (and GGUF block types `ggml_type`, `to_gguf_bytes`, `from_gguf_bytes`)."""

    name: str = "?"
    bits: float = 0.0  # bits per weight, block parameters included
    block: int = 1  # elements along K sharing one (scale, offset) pair
    zero_code: int = 0  # the code stored for a block whose scale is 0
    # integer block parameters that QAT may train (key -> inclusive stored range): only those of which one unit
    # is a small step of the block's grid (the K-quants' sub-block scales and mins). A zero point is not one:
    # one unit of it moves every weight of the block by a whole grid step.
    trainable_ints: dict = {}
    levels: Tensor | None = None  # codebook formats: float32 [qmax + 1] sorted values of the codes; None: v(q) = q

    @property
    def row_block(self) -> int:
        """K must be a multiple of this (the block; the 256-weight super-block for K-quants)."""
        return self.block

    def check(self, w: Tensor) -> None:
        check_weight(w, self.row_block, f"{self.name}: weight")

    def expand(self, t: Tensor, K: int, col_start: int = 0) -> Tensor:
        """Per-block [N, K // block] -> per-column [N, K'] for the columns [col_start, col_start + K')."""
        g = (torch.arange(K, device=t.device) + col_start) // self.block
        return t[:, g]

    def encode(self, w: Tensor, params: dict, col_start: int = 0) -> Tensor:
        """Nearest grid point -> int32 codes [N, K'] for the columns [col_start, col_start + K') of the weight
        that `params` were fit on. x = (w - offset) / scale rounded half away from zero, clamped to
        [qmin, qmax]; a block with scale 0 (all its codes decode alike) gets `zero_code`."""
        scale, offset, qmin, qmax = self.grid(params)
        s = self.expand(scale, w.shape[1], col_start)
        o = self.expand(offset, w.shape[1], col_start)
        x = (w.float() - o) / torch.where(s == 0, 1.0, s)
        if self.levels is not None:  # the nearest level (ties to the upper one, as ggml's best_index_int8)
            q = nearest_level(x, self.levels)
        else:
            q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp(qmin, qmax)
        return torch.where(s == 0, self.zero_code, q).to(torch.int32)

    def quantize(self, w: Tensor, params: dict | None = None, importance: Tensor | None = None) -> Packed:
        """w [N, K] -> Packed. params None: fit(w, importance) (RTN / imatrix RTN); else encode on params."""
        self.check(w)
        w = w.float()
        params = self.fit(w, importance) if params is None else params
        return self.pack(self.encode(w, params), params)

    def dequantize(self, p: Packed) -> Tensor:
        """Packed -> float32 [N, K]: scale * q + offset, exactly the grid's arithmetic."""
        scale, offset, _, _ = self.grid(self.params(p))
        q = self.values(self.codes(p))
        N, K = p.shape
        G = scale.shape[1]
        return (scale[:, :, None] * q.view(N, G, K // G) + offset[:, :, None]).reshape(N, K)

    def values(self, codes: Tensor) -> Tensor:
        """v(q): the codes as the float32 values the grid multiplies (levels[q] for a codebook format)."""
        if self.levels is None:
            return codes.float()
        return self.levels.to(codes.device)[codes.long()]

    # ---- per format ----
    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        raise NotImplementedError

    def grid(self, params: dict) -> tuple[Tensor, Tensor, int, int]:
        """-> (scale [N, K // block] fp32, offset [N, K // block] fp32, qmin, qmax)."""
        raise NotImplementedError

    def pack(self, codes: Tensor, params: dict) -> Packed:
        raise NotImplementedError

    def codes(self, p: Packed) -> Tensor:
        raise NotImplementedError

    def params(self, p: Packed) -> dict:
        raise NotImplementedError


REFERENCE_CHUNK = 1 << 18  # elements per row slice of a llama.cpp port on CPU (ReferenceQuantizer)


class ReferenceQuantizer(QuantFormat):
    """A format whose fit is a port of llama.cpp's quantizer (the GGUF block types): `_reference(w, importance)`
    chooses the codes and the block parameters together, so `quantize` keeps its codes (llama.cpp's own
    rounding, byte for byte) instead of re-encoding on the parameters; given `params`, it encodes as usual.

    On CPU the port runs over slices of whole rows of about REFERENCE_CHUNK elements: its many elementwise
    passes then stay in cache (about 4x faster on a [2048, 5376] Q4_K fit than whole-matrix passes, whose
    temporaries are the matrix's size each; of 2^16 .. 2^20 elements, 2^18 (1 MiB a buffer) was the fastest on a
    [512, 8192] Q4_K / Q6_K fit on one thread, in CPU time), and its memory is bounded. Every block is fit from its
    own values alone, so the result does not depend on the slicing."""

    # the GGUF block types keep their codes under "codes" and every block parameter beside them
    def codes(self, p: Packed) -> Tensor:
        return p.data["codes"]

    def params(self, p: Packed) -> dict:
        return {k: v for k, v in p.data.items() if k != "codes"}

    def quantize(self, w: Tensor, params: dict | None = None, importance: Tensor | None = None) -> Packed:
        if params is not None:
            return super().quantize(w, params)
        self.check(w)
        codes, params = self._sliced_reference(w.float(), importance)
        return self.pack(codes, params)

    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        self.check(w)
        return self._sliced_reference(w.float(), importance)[1]

    def _sliced_reference(self, w: Tensor, importance: Tensor | None) -> tuple[Tensor, dict]:
        N, K = w.shape
        rows = max(1, REFERENCE_CHUNK // K) if w.device.type == "cpu" else N
        if rows >= N:
            return self._reference(w, importance)
        per_row = importance is not None and importance.ndim == 2  # [N, K] importance is sliced with w
        parts = [self._reference(w[r:r + rows], importance[r:r + rows] if per_row else importance)
                 for r in range(0, N, rows)]
        codes = torch.cat([c for c, _ in parts])
        return codes, {k: torch.cat([p[k] for _, p in parts]) for k in parts[0][1]}

    def _reference(self, w: Tensor, importance: Tensor | None) -> tuple[Tensor, dict]:
        """w [N, K] fp32 -> (int32 codes [N, K], params)."""
        raise NotImplementedError


def nearest_level(x: Tensor, levels: Tensor) -> Tensor:
    """Index of the level nearest each x (levels sorted ascending; a tie goes to the upper level), int64."""
    lv = levels.to(x.device)
    mu = torch.bucketize(x, lv, right=True).clamp_(1, len(lv) - 1)  # lv[mu - 1] <= x < lv[mu] inside the range
    idx = torch.where((x - lv[mu - 1]) < (lv[mu] - x), mu - 1, mu)
    return torch.where(x <= lv[0], 0, torch.where(x >= lv[-1], len(lv) - 1, idx))


def weighted_importance(w: Tensor, importance: Tensor | None) -> Tensor:
    """[N, K] weights for the block fits: importance per input channel (imatrix) or per element, else ones."""
    return torch.ones_like(w) if importance is None else check_importance(importance, w)


SEARCH_CHUNK = 1 << 16  # elements per slice of search_scale on CPU


def search_scale(b: Tensor, imp: Tensor, qmin: int, qmax: int, base: Tensor, steps: int = 20,
                 store=lambda s: s) -> Tensor:
    """Importance-weighted RTN for symmetric blocks b [.., block]: try the scales store(base * (1 + 0.02 t)),
    |t| <= steps / 2, as stored (`store` rounds to the stored precision) and keep the one minimising
    sum imp * (b - s q)^2 (llama.cpp's imatrix idea, make_qx_quants-style search). t = 0, plain RTN, is tried
    first and kept on ties, so the result is never worse than RTN by this measure.

    On CPU the search runs over slices of SEARCH_CHUNK elements along the first dimension, so that its
    temporaries stay in cache (10x faster on a [2048, 5376] matrix than whole-tensor passes); every block's
    error is summed alone either way, so the result does not depend on the slicing."""
    scales = [store(base * (1 + 0.02 * t)) for t in [0] + [t for t in range(-steps // 2, steps // 2 + 1) if t]]
    best = scales[0].clone()
    on_cpu = b.device.type == "cpu"
    rows = max(1, SEARCH_CHUNK // max(1, b[0].numel())) if on_cpu else b.shape[0]
    for r in range(0, b.shape[0], rows):
        bs, imps, best_err = b[r:r + rows], imp[r:r + rows], None
        for s in scales:
            sf = s[r:r + rows].float()
            if on_cpu and bool((sf != 0).all()):  # (the check would cost a device sync per slice on a GPU)
                x = bs / sf[..., None]
            else:
                x = torch.where(sf[..., None] == 0, torch.zeros_like(bs), bs / torch.where(sf == 0, 1.0, sf)[..., None])
            q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp(qmin, qmax)
            err = (imps * (bs - sf[..., None] * q) ** 2).sum(-1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best[r:r + rows] = torch.where(better, s[r:r + rows], best[r:r + rows])
            best_err = torch.where(better, err, best_err)
    return best
