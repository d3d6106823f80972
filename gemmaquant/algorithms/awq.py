"""AWQ: scale the input channels that see large activations up before rounding, and the activations down.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
arXiv:2306.00978, §3.2, as AutoAWQ implements it (`AwqQuantizer._search_best_scale`, without duo scaling):

    x_mean = mean over tokens of |x|                        [K], the activation magnitude of each input channel
    s(a)   = clamp(x_mean ** a, min=1e-4);  s /= sqrt(max(s) * min(s))      for a in {0, 1/n, ..., (n-1)/n}
    loss(a)= sum_i || Q(W_i * s) (x / s)^T - W_i x^T ||^2   over the linears W_i that read the same x
    s*     = s(argmin loss)

Q is round-to-nearest onto each W_i's own format. The equivalence W x^T = (W s)(x / s)^T is exact, so the
caller folds 1/s into whatever produces x (an RMSNorm weight, the rows of an up projection) and quantizes
W_i * s; a channel multiplied by s > 1 is rounded with relatively finer steps, which is where the large
activations make errors expensive. a = 0 gives s = 1, i.e. plain RTN, so the search can only match or beat
RTN on the calibration tokens.

The loss is computed from the effective weight error dW = Q(W s) / s - W as ||x dW^T||^2 (no cancellation
between two large outputs). With more tokens than channels, x is replaced by the R of its QR factorization
([K, K], R^T R = x^T x, so ||R dW^T|| = ||x dW^T||): fewer rows, still a sum of squares (a quadratic form
through the Gram matrix x^T x loses ~1e-4 relative in fp32 to cancellation on outlier channels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gemmaquant.algorithms.rtn import check_finite, rtn


class AWQSearch(NamedTuple):
    scales: Tensor  # [K] fp32, the chosen s
    alpha: float  # the chosen exponent
    losses: Tensor  # [n_grid] fp64 output error sum_i ||Q(W_i s)(x/s)^T - W_i x^T||^2 for each alpha in the grid


def awq_candidate_scales(x_mean: Tensor, alpha: float) -> Tensor:
    """s = clamp(x_mean ** alpha, 1e-4) / sqrt(max * min) (AutoAWQ's normalisation); alpha = 0 -> all ones."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def squared_output_error(dW: Tensor, x: Tensor, rows_per_chunk: int) -> float:
    """||x dW^T||^2, evaluated in row chunks of dW (bounded memory), accumulated in fp64."""
    total = 0.0
    for r in range(0, dW.shape[0], rows_per_chunk):
        total += (x @ dW[r:r + rows_per_chunk].T).pow(2).sum(dtype=torch.float64).item()
    return total


@torch.no_grad()
def awq_search(weights: list[Tensor], x: Tensor, fmts: list, n_grid: int = 20) -> AWQSearch:
    """The AWQ grid search; `awq_scales` returns its `.scales`. See the module docstring."""
    if not weights or len(weights) != len(fmts):
        raise ValueError(f"need one format per weight, got {len(weights)} weights and {len(fmts)} formats")
    if n_grid <= 0:
        raise ValueError(f"n_grid must be positive, got {n_grid}")
    K = weights[0].shape[-1]
    for i, w in enumerate(weights):
        if w.ndim != 2 or w.shape[1] != K:
            raise ValueError(f"weights[{i}] must be [N_i, {K}], got {tuple(w.shape)}")
    dev = weights[0].device
    if x.numel() == 0:  # no calibration tokens reached these linears: nothing to be aware of
        return AWQSearch(torch.ones(K, device=dev), 0.0, torch.zeros(n_grid, dtype=torch.float64))
    if x.shape[-1] != K:
        raise ValueError(f"x must be [n, {K}] (the input of the weights), got {tuple(x.shape)}")
    x = x.detach().reshape(-1, K).to(dev, torch.float32)  # [n, K]
    check_finite(x, "x")
    Ws = [w.detach().to(torch.float32) for w in weights]
    for i, w in enumerate(Ws):
        check_finite(w, f"weights[{i}]")

    x_mean = x.abs().mean(0)  # [K]
    if x.shape[0] > K:  # same ||x dW^T|| from K rows instead of n
        x = torch.linalg.qr(x.double(), mode="r").R.float()  # [K, K] upper
    rows_per_chunk = max(1, (1 << 24) // x.shape[0])  # keeps a chunk's product at <= 16M elements

    losses = torch.empty(n_grid, dtype=torch.float64)
    best = (float("inf"), 0.0, None)
    for k in range(n_grid):
        alpha = k / n_grid
        s = awq_candidate_scales(x_mean, alpha)  # [K]
        loss = 0.0
        for w, fmt in zip(Ws, fmts):
            p = rtn(w * s, fmt)
            dW = fmt.dequantize(p).to(dev, torch.float32) / s - w  # effective weight error on x
            loss += squared_output_error(dW, x, rows_per_chunk)
        losses[k] = loss
        if loss < best[0]:  # strict: ties keep the smaller alpha (alpha = 0 is RTN)
            best = (loss, alpha, s)
    if best[2] is None:
        raise ValueError(f"AWQ: every candidate scale gave a non-finite output error: {losses.tolist()}")
    return AWQSearch(best[2], best[1], losses)


def awq_scales(weights: list[Tensor], x: Tensor, fmts: list, n_grid: int = 20) -> Tensor:
    """Activation-aware per-input-channel scales s [K] (fp32, on weights[0]'s device) for linears sharing x.

    weights: the W_i [N_i, K] that read the same input (q/k/v, gate/up, every expert's gate_up, ...).
    x: [n, K] (or [..., K]) calibration inputs of those linears; empty -> s = 1.
    fmts: the format each W_i is quantized to; the search rounds W_i * s to nearest on it.
    n_grid: number of exponents alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid} tried.
    The caller multiplies each W_i by s (columns) and divides what produces x by s, then quantizes W_i * s.
    """
    return awq_search(weights, x, fmts, n_grid).scales
