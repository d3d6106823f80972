"""GPTQ: quantize one weight matrix column by column, pushing each column's rounding error onto the columns
not yet quantized so that the layer's *output* X W^T changes least.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323 (Algorithm 1), as implemented by the reference code (IST-DASLab/gptq
`gptq.py`), AutoGPTQ and GPTQModel (`fasterquant`):

    H     = X^T X (over calibration tokens, [K, K]); columns with H_ii = 0 ("dead") get H_ii = 1, w[:, i] = 0
    H    += damp * mean(diag H) * I                    dampening; retried with larger damp if not positive definite
    U     = upper Cholesky factor of H^-1 (U^T U = H^-1) row j of U is the OBS update of column j, scaled
    for each column j (in decreasing diag(H) order with act_order):
        q_j   = nearest grid point of w_j on its own group's grid
        e_j   = (w_j - q_j) / U_jj
        w_k  -= e_j * U_jk   for every later column k  (lazily: within a block of `block_size` columns at
                                                      once, the rest of the matrix once per block)

Static groups. The block parameters (scale/offset of every group, or for K-quants the whole 256-element
super-block: fp16 d/dmin plus 6-bit sub-scales) are fit up front on the original weights, optionally weighted
by diag(H) (`importance_params`), as GPTQModel does with `static_groups=True`. Act-order then changes only
the order in which columns are rounded, never which parameters a column uses: a column always lands on the
grid of the group it belongs to in the stored layout, so no `g_idx` is needed and every format - Q4_0, Q4_K,
Q6_K, int4 g128, ... - stores GPTQ's result exactly. The returned Packed is `fmt.pack(codes, params)`: the
codes GPTQ chose on the parameters it used, not a re-quantization of the dequantized weights.

Dynamic groups (`static_groups=False`, only with `act_order=False`): the original GPTQ choice, each group's
(or super-block's) parameters are fit when the sweep reaches its first column, on the weights as updated by
the errors pushed onto them so far.

Numerics: the sweep runs in fp32 on w's device; the Cholesky factorization of H and its triangular inverse run
in fp64 (see `damped_inverse_cholesky`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gemmaquant.algorithms.rtn import check_finite
from gemmaquant.formats.base import QuantFormat, nearest_level

MAX_DAMP = 1.0  # relative dampening beyond which a Hessian is declared unusable (GPTQModel stops below 1)


def _fit_unit(fmt, K: int) -> int:
    """Columns whose block parameters are fit together: the K-quant super-block (256), else the block."""
    unit = getattr(fmt, "super_block", None) or getattr(fmt, "superblock", None) or getattr(fmt, "qk_k", None)
    if unit is None and str(getattr(fmt, "name", "")).upper().endswith("_K"):
        unit = 256  # ggml QK_K
    unit = unit or getattr(fmt, "block", None) or K
    return min(int(unit), K)


def lower_triangular_inverse(L: Tensor, block: int = 512) -> Tensor:
    """L^-1 for lower-triangular L [K, K], by column blocks: block c of L^-1 is zero above row c0 and solves
    L[c0:, c0:] X = I[c0:, c0:c1], so the work is ~K^3/3 instead of the K^3 of a solve against the full I."""
    K = L.shape[0]
    Linv = torch.zeros_like(L)
    for c0 in range(0, K, block):
        c1 = min(c0 + block, K)
        rhs = torch.eye(K - c0, c1 - c0, dtype=L.dtype, device=L.device)  # [K - c0, c1 - c0]
        Linv[c0:, c0:c1] = torch.linalg.solve_triangular(L[c0:, c0:], rhs, upper=False)
    return Linv


def damped_inverse_cholesky(H: Tensor, damp: float) -> tuple[Tensor, float]:
    """The upper Cholesky factor U of (H + d * mean(diag H) * I)^-1 (U^T U = that inverse), and the d used.

    Computed without forming the inverse: with P the reversal permutation and P (H + dI) P = L L^T,
    (H + dI)^-1 = (P L^-1 P)^T (P L^-1 P) and P L^-1 P is upper triangular with a positive diagonal, so it
    is the Cholesky factor the reference code gets from chol(cholesky_inverse(chol(H)), upper=True):
    one factorization and one triangular inverse instead of two factorizations and an inverse.
    Tries d = damp first; when H + d I is not (numerically) positive definite, doubles d (at least to 0.01)
    up to MAX_DAMP, as GPTQModel's `damp_auto_increment` retry does, and warns about the increase.
    H: [K, K] with no zero on its diagonal (not modified); the factorization runs in H's dtype.
    Raises ValueError when even d = MAX_DAMP fails.
    """
    K = H.shape[0]
    mean_diag = H.diagonal().mean()
    d, tried = float(damp), []
    while True:
        Hd = H.flip(0, 1)  # [K, K] copy, reversed rows and columns
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info.item() == 0:
            Linv = lower_triangular_inverse(L)
            del L
            U = Linv.flip(0, 1)  # upper
            del Linv
            if torch.isfinite(U).all() and (U.diagonal() > 0).all():
                if tried:
                    warnings.warn(f"GPTQ: Hessian not positive definite with damp {tried}; used damp={d:g}",
                                  stacklevel=3)
                return U, d
        tried.append(d)
        if d >= MAX_DAMP:
            raise ValueError(f"GPTQ: Hessian H [{K}x{K}] is not positive definite even with "
                             f"dampening {tried} x mean(diag H) = {mean_diag.item():.4g}")
        d = min(MAX_DAMP, max(2 * d, 0.01))


class _Grid:
    """Nearest-grid-point rounding of one column on its own group's grid w_hat = scale * v(q) + offset
    (v(q) = q, or levels[q] for a codebook format such as IQ4_NL).

    The same arithmetic as `QuantFormat.encode` (x = (w - offset) / scale, rounded half away from zero like
    ggml's nearest_int, clamped to [qmin, qmax]), vectorised over rows with the grid precomputed once: calling
    `fmt.encode` per column would rebuild the whole grid K times. Rows whose block has scale 0 (an all-zero
    block: every code decodes to the same value) take `fmt.encode`'s code (the format's zero point), and a
    format that overrides `encode` is asked for every column, so the codes are always the format's own.
    """

    def __init__(self, fmt, params, K: int):
        self.fmt, self.params, self.col0 = fmt, params, 0  # params (and first column) that encode() sees
        self.own_encode = type(fmt).encode is not QuantFormat.encode
        scale, offset, self.qmin, self.qmax = fmt.grid(params)  # [N, G] each
        self.scale = scale.float().T.contiguous()  # [G, N]: a group's grid is a contiguous row
        self.offset = offset.float().T.contiguous()
        self.gsize = K // scale.shape[1]  # columns per affine pair
        self.has_zero = (self.scale == 0).any(1).tolist()  # [G] host flags: no device sync per column
        levels = getattr(fmt, "levels", None)
        self.levels = None if levels is None else levels.to(self.scale.device)

    def set_unit(self, params, col0: int) -> None:
        """Dynamic groups: the unit of columns starting at col0 was just fit to `params`; use its grid."""
        scale, offset, _, _ = self.fmt.grid(params)
        g0 = col0 // self.gsize
        self.scale[g0:g0 + scale.shape[1]] = scale.float().T
        self.offset[g0:g0 + offset.shape[1]] = offset.float().T
        self.has_zero[g0:g0 + scale.shape[1]] = (scale == 0).any(0).tolist()
        self.params, self.col0 = params, col0

    def round(self, x: Tensor, j: int) -> tuple[Tensor, Tensor]:
        """x: [N] fp32 values of original column j -> (codes [N] fp32 integers, dequantized [N] fp32)."""
        g = j // self.gsize
        s, o = self.scale[g], self.offset[g]
        if self.own_encode:
            q = self.fmt.encode(x[:, None], self.params, col_start=j - self.col0)[:, 0].float()
            return q, s * self._value(q) + o
        y = (x - o) / s
        if self.levels is not None:  # codebook grid (IQ4_NL ...): w_hat = s * levels[q] + o
            q = nearest_level(y, self.levels).float()
        else:
            q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp_(self.qmin, self.qmax)
        if self.has_zero[g]:
            enc = self.fmt.encode(x[:, None], self.params, col_start=j - self.col0)[:, 0].to(q.dtype)
            q = torch.where(s == 0, enc, q)
        return q, s * self._value(q) + o

    def _value(self, q: Tensor) -> Tensor:
        return q if self.levels is None else self.levels[q.long()]


class HessianFactor:
    """What GPTQ needs of a Hessian, computed once for every matrix that reads the same inputs (q/k/v share one
    H, gate/up another): the dead columns, the sweep order and the Cholesky factor U of the damped inverse in
    that order. `gptq(w, HessianFactor(H, damp, act_order), fmt, ...)` uses it as it is."""

    @torch.no_grad()
    def __init__(self, H: Tensor, damp: float, act_order: bool):
        check_finite(H, "H")
        if damp < 0:
            raise ValueError(f"damp must be non-negative, got {damp}")
        H = H.detach().to(H.device, torch.float64, copy=True)  # [K, K]
        K = H.shape[0]
        self.K, self.act_order = K, act_order
        self.dead = H.diagonal() == 0  # [K]
        H[self.dead, self.dead] = 1.0  # the diagonal entries of dead columns
        self.diag = H.diagonal().float().clone()  # [K] for importance_params
        if act_order:
            self.perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # [K] position -> column
            H = H[self.perm[:, None], self.perm[None, :]]
        else:
            self.perm = torch.arange(K, device=H.device)
        U, self.damp = damped_inverse_cholesky(H, damp)  # the damp used (raised when H + damp I was not PD)
        del H
        self.U = U.float()  # [K, K] upper, fp32 for the sweep


@torch.no_grad()
def gptq(w: Tensor, H: Tensor | HessianFactor, fmt, *, damp: float = 0.01, block_size: int = 128,
         act_order: bool = True, static_groups: bool = True, importance_params: bool = False):
    """GPTQ-quantize `w` onto `fmt`'s grid, minimising ||(W - W_hat) X^T|| for the inputs X behind `H`.

    w: [N, K] weight (out_features x in_features), any float dtype, on any device.
    H: [K, K] Hessian proxy X^T X (any positive scale: X^T X / n, 2 X^T X / n, ...), same device; or its
        `HessianFactor(H, damp, act_order)`, shared by the matrices that read the same inputs (then its damp
        and act_order apply).
    fmt: a gemmaquant.formats QuantFormat (int4 g32/g128, IntGroup 2..8 bit, Q4_0 ... Q6_K).
    damp: relative dampening, damp * mean(diag H) is added to diag H (retried larger if H is not PD).
    block_size: columns per lazy batch update (speed only; results agree up to fp32 rounding).
    act_order: quantize columns in decreasing diag(H) order (needs static_groups).
    static_groups: fit every group's parameters up front on the original weights (default, needed with
        act_order); False fits each group / super-block when the sweep reaches it (original GPTQ).
    importance_params: fit the parameters with importance diag(H) (imatrix-style) instead of plain RTN.
    Returns fmt.pack(codes, params). Raises ValueError on NaN/Inf in w or H, bad shapes, or an unusable H.
    """
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D [N, K] matrix, got shape {tuple(w.shape)}")
    N, K = w.shape
    shape = (H.K, H.K) if isinstance(H, HessianFactor) else tuple(H.shape)
    if shape != (K, K):
        raise ValueError(f"H must be [K, K] = [{K}, {K}] for w of shape {tuple(w.shape)}, got {shape}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    check_finite(w, "w")
    if not isinstance(H, HessianFactor):
        H = HessianFactor(H.to(w.device), damp, act_order)
    act_order = H.act_order
    unit = _fit_unit(fmt, K)
    dynamic = not static_groups and unit < K
    if dynamic and act_order:
        raise ValueError("act_order needs static_groups=True: with groups fit during an act-order sweep a "
                         "group's columns are no longer contiguous, which no stored format can express")

    dev = w.device
    W = w.detach().to(dev, torch.float32, copy=True)  # [N, K]
    W[:, H.dead] = 0.0
    importance = H.diag if importance_params else None

    if dynamic:  # block boundaries on fit-unit boundaries, so a unit is fit from fully updated columns
        block_size = max(unit, block_size // unit * unit)
        W_fit = torch.zeros_like(W)  # [N, K] the values each unit was fit on; fit(W_fit) = the params used
        grid = _Grid(fmt, fmt.fit(W, importance=importance), K)  # shapes and qmin/qmax; groups refit below
    else:
        params = fmt.fit(W, importance=importance)
        grid = _Grid(fmt, params, K)

    perm = H.perm
    cols = perm.tolist()
    # The sweep works on W^T (sweep position, row): a column of W is a contiguous row, and the in-block
    # rank-1 updates touch contiguous memory.
    WT = W.T[perm].contiguous()  # [K, N] in sweep order
    del W

    U = H.U  # [K, K] upper, fp32

    codesT = torch.empty(K, N, dtype=torch.float32, device=dev)  # [K, N] in original column order
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = WT[i1:i2]  # [b, N] view: this block's columns, updated in place
        E1 = torch.empty_like(W1)  # [b, N] scaled errors
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = cols[i1 + i]
            if dynamic and j % unit == 0:
                W_fit[:, j:j + unit] = W1[i:i + unit].T
                imp = None if importance is None else importance[j:j + unit]
                grid.set_unit(fmt.fit(W1[i:i + unit].T.contiguous(), importance=imp), j)
            x = W1[i]
            q, x_hat = grid.round(x, j)
            codesT[j] = q
            e = (x - x_hat) / U1[i, i]
            W1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1.0)  # column k -= e * U[j, k] for later k in the block
            E1[i] = e
        WT[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)  # the block's errors onto all later columns
    codes = codesT.T  # [N, K]

    if dynamic:
        params = fmt.fit(W_fit, importance=importance)
        s, o, _, _ = fmt.grid(params)
        if not (torch.equal(s.float().T, grid.scale) and torch.equal(o.float().T, grid.offset)):
            raise RuntimeError(f"{fmt.name}: fitting the whole matrix does not reproduce the per-unit fits "
                               "(the format's fit is not local to its super-blocks); use static_groups=True")
    dtype = fmt.encode(w[:, :1].float(), params).dtype  # the integer dtype the format's codes come in
    return fmt.pack(codes.to(dtype).contiguous(), params)
