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

After the scales, AWQ searches a clipping range per block (llm-awq `auto_clip_layer`, AutoAWQ `_search_best_clip`):

    for r in {1, 1 - 1/n, ..., 1 - max_shrink + 1/n}:   w_r = clamp(w, -r * max|w_b|, r * max|w_b|)  per block b
    err_b(r) = dW_b H_bb dW_b^T,   dW = Q(w_r) - w        (the block's share of the output error; H_bb is the
                                                          block's diagonal Gram block, H = x^T x / n)
    each block keeps the r of least error; Q of the clipped weights is the result

Shrinking the range trades clipped outliers for finer steps on the rest; r = 1 is plain RTN, so for formats
whose blocks are fit independently (int groups, Q4_0 ... Q8_0; not the K-quants, whose super-block scale couples
their blocks) no block's error on the calibration tokens grows. llm-awq skips q_proj and k_proj (their error is seen
through the attention softmax, not the output norm); the caller does the same.
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


def _loss_rows(x: Tensor, K: int, what: str) -> Tensor:
    """x [n, K] -> rows with the same ||x dW^T|| for every dW: x itself, or its R [K, K] when n > K."""
    check_finite(x, what)
    return torch.linalg.qr(x.double(), mode="r").R.float() if x.shape[0] > K else x


@torch.no_grad()
def awq_search(weights: list[Tensor], x: Tensor, fmts: list, n_grid: int = 20,
               x_per_weight: list[Tensor] | None = None) -> AWQSearch:
    """The AWQ grid search; `awq_scales` returns its `.scales`. See the module docstring.

    x_per_weight: the inputs each W_i actually sees, when they differ (MoE experts sharing one scale, each
    reading only the tokens routed to it): the loss of W_i is measured on x_per_weight[i] (empty: no loss), while
    x still sets x_mean. Default: every W_i reads x."""
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
    if x_per_weight is not None and len(x_per_weight) != len(Ws):
        raise ValueError(f"need one input per weight, got {len(x_per_weight)} for {len(Ws)} weights")
    xs = [_loss_rows(xi.detach().reshape(-1, K).to(dev, torch.float32), K, f"x_per_weight[{i}]")
          for i, xi in enumerate(x_per_weight)] if x_per_weight is not None else [_loss_rows(x, K, "x")] * len(Ws)

    losses = torch.empty(n_grid, dtype=torch.float64)
    best = (float("inf"), 0.0, None)
    for k in range(n_grid):
        alpha = k / n_grid
        s = awq_candidate_scales(x_mean, alpha)  # [K]
        loss = 0.0
        for w, fmt, xi in zip(Ws, fmts, xs):
            if xi.shape[0] == 0:
                continue
            p = rtn(w * s, fmt)
            dW = fmt.dequantize(p).to(dev, torch.float32) / s - w  # effective weight error on x
            loss += squared_output_error(dW, xi, max(1, (1 << 24) // xi.shape[0]))  # chunks of <= 16M elements
        losses[k] = loss
        if loss < best[0]:  # strict: ties keep the smaller alpha (alpha = 0 is RTN)
            best = (loss, alpha, s)
    if best[2] is None:
        raise ValueError(f"AWQ: every candidate scale gave a non-finite output error: {losses.tolist()}")
    return AWQSearch(best[2], best[1], losses)


@torch.no_grad()
def awq_clip(w: Tensor, H: Tensor, fmt, n_grid: int = 20, max_shrink: float = 0.5,
             rows_per_chunk: int = 1024) -> Tensor:
    """w [N, K] -> w clamped to the per-block range that minimises each block's output error (module docstring).

    H: [K, K] Gram matrix of the inputs w reads (x^T x / n). Formats with one pair per row (int8) or blocks over
    256 wide are returned unchanged (their error is too small to repay a K x K search per row).
    """
    N, K = w.shape
    B = fmt.block
    if B > 256 or K % B:
        return w
    w = w.detach().float()
    check_finite(w, "w")
    G = K // B
    Hb = torch.stack([H[g * B:(g + 1) * B, g * B:(g + 1) * B] for g in range(G)]).to(w.device, torch.float32)
    out = torch.empty_like(w)
    for r0 in range(0, N, rows_per_chunk):
        wc = w[r0:r0 + rows_per_chunk]  # [n, K]
        amax = wc.abs().reshape(-1, G, B).amax(-1, keepdim=True)  # [n, G, 1]
        best_err = torch.full((wc.shape[0], G), float("inf"), device=w.device)
        best_r = torch.ones(wc.shape[0], G, 1, device=w.device)
        for i in range(int(max_shrink * n_grid)):
            r = 1.0 - i / n_grid
            lim = (amax * r).expand(-1, -1, B).reshape_as(wc)
            clipped = torch.maximum(torch.minimum(wc, lim), -lim)
            dW = (fmt.dequantize(rtn(clipped, fmt)).to(w.device, torch.float32) - wc).reshape(-1, G, B)
            err = torch.einsum("ngk,gkl,ngl->ng", dW, Hb, dW)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r[better] = r
        lim = (amax * best_r).expand(-1, -1, B).reshape_as(wc)
        out[r0:r0 + rows_per_chunk] = torch.maximum(torch.minimum(wc, lim), -lim)
    return out


def awq_scales(weights: list[Tensor], x: Tensor, fmts: list, n_grid: int = 20,
               x_per_weight: list[Tensor] | None = None) -> Tensor:
    """Activation-aware per-input-channel scales s [K] (fp32, on weights[0]'s device) for linears sharing x.

    weights: the W_i [N_i, K] that read the same input (q/k/v, gate/up, every expert's gate_up, ...).
    x: [n, K] (or [..., K]) calibration inputs of those linears; empty -> s = 1.
    fmts: the format each W_i is quantized to; the search rounds W_i * s to nearest on it.
    n_grid: number of exponents alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid} tried.
    The caller multiplies each W_i by s (columns) and divides what produces x by s, then quantizes W_i * s.
    """
    return awq_search(weights, x, fmts, n_grid, x_per_weight).scales
