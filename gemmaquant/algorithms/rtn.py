"""Round-to-nearest: the baseline every other algorithm is measured against.

`rtn(w, fmt)` fits each block's parameters from the block's own values (min/max or absmax, as the format
defines) and rounds every weight to its nearest grid point. With `importance` (one weight per input channel,
e.g. the diagonal of the calibration Hessian diag(X^T X), which is what llama.cpp's imatrix collects), the
format instead chooses each block's parameters to minimise the importance-weighted squared error
sum_k importance[k] * (w[n, k] - w_hat[n, k])^2 (llama.cpp `make_qx_quants` / `make_qkx2_quants` with
`quant_weights`): the rounding is still to the nearest point, only the grid moves.

Both are delegated to the format (`fmt.quantize(w, importance=...)`), which owns the block arithmetic and
the stored precision of the parameters (fp16 d, 6-bit K-quant sub-scales, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(t: Tensor, name: str) -> None:
    """Raise a ValueError naming `name` when `t` holds a NaN or an infinity."""
    from gemmaquant.validate import all_finite

    if not all_finite(t):
        bad = (~torch.isfinite(t)).sum().item()
        kinds = ", ".join(k for k, m in (("NaN", torch.isnan(t)), ("Inf", torch.isinf(t))) if m.any())
        raise ValueError(f"{name} has {bad} non-finite value(s) ({kinds}); shape {tuple(t.shape)}")


def rtn(w: Tensor, fmt, importance: Tensor | None = None):
    """Round-to-nearest quantization of `w` [N, K] onto `fmt`'s grid -> Packed.

    importance: None, a [K] per-input-channel weight (imatrix / diag of the Hessian) or an [N, K] per-element
    weight; it changes only how each block's parameters are chosen (`fmt.fit(w, importance)`), never the
    rounding. Must be finite and non-negative.
    """
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D [N, K] matrix, got shape {tuple(w.shape)}")
    w = w.detach().float()
    check_finite(w, "w")
    if importance is None:
        return fmt.quantize(w)
    importance = importance.detach().float().to(w.device)
    check_finite(importance, "importance")
    if importance.shape not in ((w.shape[1],), tuple(w.shape)):
        raise ValueError(f"importance must be [K]={w.shape[1]} or [N, K]={tuple(w.shape)}, "
                         f"got {tuple(importance.shape)}")
    if (importance < 0).any():
        raise ValueError("importance must be non-negative")
    return fmt.quantize(w, importance=importance)
