"""Synthetic calibration problems where plain round-to-nearest is clearly suboptimal.

Activations have correlated features (a low-rank common part) and per-channel magnitudes spread over two
orders of magnitude, with a few outlier channels ~30x larger than the median, as LLM activations do
(Dettmers et al. 2022, LLM.int8(); Xiao et al. 2023, SmoothQuant).
"""

from __future__ import annotations

import torch
from torch import Tensor


def activations(n: int, K: int, seed: int = 0, sample_seed: int | None = None, rank: int | None = None,
                n_outliers: int = 4) -> Tensor:
    """x [n, K] fp32: correlated (rank-`rank` common part + noise), lognormal channel scales, outliers.

    `seed` fixes the distribution (mixing, channel scales, outlier channels), `sample_seed` the tokens drawn
    from it (default: seed), so a held-out set is `activations(n, K, seed, sample_seed=other)`."""
    g = torch.Generator().manual_seed(seed)
    rank = rank or max(1, K // 8)
    mix = torch.randn(rank, K, generator=g) / rank ** 0.5  # [r, K]
    scale = torch.exp(0.7 * torch.randn(K, generator=g))  # [K] lognormal channel magnitudes
    scale[torch.randperm(K, generator=g)[:n_outliers]] *= 30.0
    gs = torch.Generator().manual_seed(seed if sample_seed is None else 1000 + sample_seed)
    x = torch.randn(n, rank, generator=gs) @ mix + 0.3 * torch.randn(n, K, generator=gs)  # [n, K]
    return x * scale


def weights(N: int, K: int, seed: int = 1) -> Tensor:
    """w [N, K] fp32 with a heavy-ish tail (Student-t, 5 dof), like trained linear weights."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(5, N, K, generator=g).pow(2).sum(0)  # chi-squared, 5 dof
    return 0.02 * torch.randn(N, K, generator=g) / (chi2 / 5).sqrt()


def problem(N: int, K: int, n: int = 1024, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(w [N, K], x [n, K], H = x^T x / n [K, K])."""
    x = activations(n, K, seed)
    w = weights(N, K, seed + 1)
    return w, x, x.T @ x / n


def output_error(w: Tensor, w_hat: Tensor, x: Tensor) -> float:
    """||(W - W_hat) X^T||_F."""
    return torch.linalg.matrix_norm(x.double() @ (w.double() - w_hat.double()).T).item()
