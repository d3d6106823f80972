"""Torch ports of ggml's block-search helpers (llama.cpp ggml/src/ggml-quants.c), vectorised over blocks.

Each function takes a batch of B blocks of n values stored as columns, x [n, B] (element i of every block is the
contiguous row x[i], so a C loop over i is a loop over rows with no copies), and does, for every block at once,
exactly the float32 operations the C function does for one block, in the same order, so the results are
bit-identical to a C build without -ffast-math / FMA contraction (plain -O2 on x86-64):
tests/formats/test_llamacpp.py compares bytes.

Rules kept to stay bit-exact (float arithmetic is not associative):
  * a C `for` accumulation is `seqsum`: one fp32 add per element, in index order (torch.sum reorders);
  * C expression order is kept: `w*x[i]*l` is (w * x) * l, `a + b - c` is (a + b) - c;
  * float32 constants are formed with numpy float32 scalars (0.1f * is is not 0.1 * is in double);
  * divisions are tensor / tensor: `c / t` on a tensor is reciprocal(t) * c in torch, and CUDA turns
    `t / python_scalar` into a multiplication by the reciprocal, neither of which is IEEE division;
  * sqrtf goes through float64 (torch's float32 sqrt is not correctly rounded on CPU);
  * nearest_int is ggml's magic-number rounding (half to even, garbage beyond 2^22, as in C), and a value
    stored in a uint8_t / int8_t wraps modulo 256.

Speed (the candidate searches are most of a K-quant export): the searches run on preallocated buffers with
in-place ops (no temporaries the size of x), the three sums of a candidate are taken in one row loop over a
[n, 3, B] buffer, and `round_codes_` rounds with torch.round (one pass) where a per-block bound proves every
value below 2^22 in magnitude, where it equals nearest_int; elsewhere it falls back to nearest_int itself.

Devices: the same code runs on CUDA with the same bytes. What could change a byte there, and why it does not:
an FMA contraction (each step is its own kernel, so nothing is contracted), a division by a Python scalar (made
a tensor, see div), float32 sqrt (done in float64), a reduction in another order (min / max / argmax are exact;
the ordered sums are a loop of add_ on CUDA, whose index_add_ adds with atomics in any order), TF32 (no matmul).
tests/formats/test_gguf_device.py checks it on a GPU (scripts/gpu_check.sh, stage export).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

GROUP_MAX_EPS = float(np.float32(1e-15))  # 1e-15f
_MAGIC = 12582912.0  # 1.5 * 2^23


def f32(v: float) -> float:
    """A Python float holding exactly the float32 value of v (so torch casts it to float32 without change)."""
    return float(np.float32(v))


def full(like: Tensor, v: float) -> Tensor:
    return torch.full_like(like, f32(v))


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """IEEE float32 a / b with both operands tensors (see the module docstring; a broadcast operand is fine: only a
    0-dim CPU tensor as divisor becomes a reciprocal on CUDA, and a Python scalar is made a full tensor here)."""
    if not isinstance(a, Tensor):
        a = full(b, a)
    if not isinstance(b, Tensor):
        b = full(a, b)
    return torch.div(a, b)


def nearest_int(x: Tensor) -> Tensor:
    """ggml nearest_int: float32 -> int32 via (x + 1.5 * 2^23)'s mantissa bits (round half to even)."""
    return ((x.float() + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def sqrtf(x: Tensor) -> Tensor:
    """IEEE sqrtf. torch.sqrt on CPU float32 is not correctly rounded (about 1 in 5 results is 1 ulp off);
    the float64 square root rounded to float32 is (53 >= 2 * 24 + 2 bits: no double-rounding error)."""
    return torch.sqrt(x.double()).float()


def roundf(x: Tensor) -> Tensor:
    """C roundf (half away from zero), exact for every float32 (floor(|x| + 0.5) is not: 0.49999997 -> 1)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def seqsum(*ts: Tensor):
    """Sum over dim 0 as `float s = 0; for (i...) s += t[i];` does: fp32 adds in index order (torch.sum reorders).
    One result per argument (a tuple when several)."""
    accs = [rowsum_(torch.empty_like(t[0]), t) for t in ts]
    return accs[0] if len(ts) == 1 else tuple(accs)


def rowsum_(acc: Tensor, t: Tensor) -> Tensor:
    """seqsum into a given accumulator: acc = +0, then acc += t[i] for i in index order (t [n, ...], acc t[0]'s
    shape); sums stacked on a middle axis are taken together. On CPU, index_add_ with every index 0 is that loop
    in C++ (torch documents index_add_ as adding "in the order given in index"; ATen's index_add_cpu_ adds the
    slices one after another with add's kernel, and alpha 1 makes acc + 1 * t[i] exactly acc + t[i];
    tests/formats/test_llamacpp.py compares the bytes); CUDA's index_add_ uses atomics (any order), so there a
    Python loop adds the rows."""
    acc.zero_()
    if t.device.type == "cpu":
        acc.unsqueeze(0).index_add_(0, _zeros_index(t.shape[0]), t)
        return acc
    for row in t.unbind(0):
        acc.add_(row)
    return acc


_ZERO_INDEX: dict[int, Tensor] = {}


def _zeros_index(n: int) -> Tensor:
    """n zeros (int64, CPU): index_add_'s index that adds every row into row 0 (made once per n)."""
    if n not in _ZERO_INDEX:
        _ZERO_INDEX[n] = torch.zeros(n, dtype=torch.int64)
    return _ZERO_INDEX[n]


ROUND_SAFE = 4194000.0  # |v| below this (< 2^22 - 1): nearest_int(v) is round-half-even(v), what torch.round gives


def round_codes_(t: Tensor, bound: Tensor, lo: int, hi: int) -> Tensor:
    """In place: t <- float(clamp(nearest_int(t), lo, hi)), t [n, B] float32. bound [B] must bound |t| in column
    b; when every bound is below ROUND_SAFE (always, but for degenerate blocks) a single torch.round pass is
    exact, otherwise the magic-number nearest_int itself is used. A -0.0 code may appear where nearest_int
    gives +0: codes are only multiplied, summed from +0 or stored as integers, where the sign of a zero is lost."""
    if bool((bound < ROUND_SAFE).all()):  # (NaN bounds fail the test)
        return t.round_().clamp_(lo, hi)
    return t.copy_(nearest_int(t).clamp(lo, hi))


def first_min(x: Tensor, dim: int = 0) -> Tensor:
    """`min = x[0]; if (x[i] < min) min = x[i];` over `dim`, including the sign of a zero minimum."""
    mn = x.amin(dim)
    if not bool((mn == 0).any()):
        return mn
    first_zero = (x == 0).int().argmax(dim, keepdim=True)  # the first zero wins a tie between 0.0 and -0.0
    return torch.where(mn == 0, x.gather(dim, first_zero).squeeze(dim), mn)


def max_abs(x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """`if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }` from amax = max = 0, over `dim`."""
    ax = x.abs()
    i = ax.argmax(dim, keepdim=True)  # the first index of the largest |x|
    amax = ax.gather(dim, i).squeeze(dim)
    return amax, torch.where(amax > 0, x.gather(dim, i).squeeze(dim), 0.0)


def make_qx_quants(x: Tensor, nmax: int, qw: Tensor | None) -> tuple[Tensor, Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw), x [n, B] -> (scale [B], L [n, B] in [0, 2 nmax - 1]).
    Symmetric: x ~ scale * (L - nmax); weights qw, or x^2 when qw is None."""
    amax, mx = max_abs(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    w = x * x if qw is None else qw
    wx = w * x
    P = torch.empty((x.shape[0], 2, x.shape[1]), dtype=x.dtype, device=x.device)  # w x l | w l l, per row
    sums = torch.empty((2, x.shape[1]), dtype=x.dtype, device=x.device)

    def attempt(iscale, l):  # l <- float(clamp(nearest_int(iscale * x), -nmax, nmax - 1)); -> (sumlx, suml2)
        round_codes_(torch.mul(x, iscale, out=l), (iscale * amax).abs(), -nmax, nmax - 1)
        torch.mul(wx, l, out=P[:, 0])
        torch.mul(w, l, out=P[:, 1]).mul_(l)
        return rowsum_(sums, P).clone().unbind(0)

    L = torch.empty_like(x)  # the codes of each candidate; the winner's are computed again at the end
    best_iscale = div(-nmax, mx)
    sumlx, suml2 = attempt(best_iscale, L)
    scale = torch.where(suml2 != 0, div(sumlx, torch.where(suml2 != 0, suml2, 1.0)), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = div(f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(step))), mx)
        sumlx, suml2 = attempt(iscale, L)
        upd = (suml2 > 0) & ((sumlx * sumlx) > (best * suml2))
        best_iscale = torch.where(upd, iscale, best_iscale)
        scale = torch.where(upd, div(sumlx, torch.where(upd, suml2, 1.0)), scale)
        best = torch.where(upd, scale * sumlx, best)
    round_codes_(torch.mul(x, best_iscale, out=L), (best_iscale * amax).abs(), -nmax, nmax - 1)
    L = L.int() + nmax
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L)


def make_qkx_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False):
    """make_qkx2_quants / make_qkx3_quants with weights given (the two are then the same code), x, w [n, B] ->
    (scale [B], the_min [B] >= 0, L [n, B] in [0, nmax]):  x ~ scale * L - the_min. use_mad: the error is
    sum w |diff| instead of sum w diff^2 (Q2_K's reference quantizer).

    Per candidate the work is 12 elementwise passes over [n, B] and two ordered row sums; the per-block values
    (the candidate's sums, the least-squares scale and min, the best so far) are kept stacked, so that one op
    serves several of them (the same float32 operations as the C code, only done side by side)."""
    n, B = x.shape
    xmin, mx = first_min(x), x.amax(0)
    mn = torch.where(xmin > 0, 0.0, xmin)
    flat = mx == mn  # (max - min == 0 exactly when max == min: float subtraction underflows gradually)
    sum_w, sum_x = seqsum(w, w * x)
    E = torch.empty_like(x)  # the error terms of a candidate
    P = torch.empty((n, 3, B), dtype=x.dtype, device=x.device)  # w l x | w l l | w l, per row
    S = torch.empty((4, B), dtype=x.dtype, device=x.device)  # sum_x | s_xl | s_l2 | s_l  (S[1:] = P's row sums)
    S[0] = sum_x
    WX = torch.stack([sum_w, sum_x])
    one = torch.ones_like(sum_w)
    steps = [np.float32(rmin) + np.float32(rdelta) * np.float32(s) + np.float32(nmax) for s in range(nstep + 1)]
    cvals = torch.tensor(steps, dtype=x.dtype, device=x.device)[:, None]  # [nstep + 1, 1]: dividends of iscale
    rng = torch.where(flat, 1.0, mx - mn)  # max - min (1 for a flat block), kept up to date with min

    def codes(iscale, mn, out):  # out <- float(clamp(nearest_int(iscale * (x - mn)), 0, nmax))
        # |iscale * (x - mn)| peaks at x = min or max (float subtraction and product are monotone); rng is max - min
        # or, for a flat block (max - min = 0), 1: a bound all the same
        bound = torch.maximum((iscale * (xmin - mn)).abs_(), (iscale * rng).abs_())
        return round_codes_(torch.sub(x, mn, out=out).mul_(iscale), bound, 0, nmax)

    def error(scale, mn, L):  # sum of w * diff^2 (use_mad: w * |diff|), diff = (scale * L + mn) - x
        torch.mul(L, scale, out=E).add_(mn).sub_(x)
        E.abs_() if use_mad else E.mul_(E)
        return rowsum_(torch.empty_like(sum_w), E.mul_(w))

    iscale = div(nmax, rng)
    scale = div(1.0, iscale)
    La = codes(iscale, mn, torch.empty_like(x))  # the codes of each candidate; the winner's are computed again
    best = error(scale, mn, La)
    # the best so far, stacked: the iscale and min its codes were computed from | its error | scale | min
    state = torch.stack([iscale, mn, best, scale, mn])
    notflat = ~flat
    for step in range(nstep + 1):
        mn = state[4]
        torch.sub(mx, mn, out=rng).masked_fill_(flat, 1.0)  # min moves when a better fit is found: so does range
        iscale = torch.div(cvals[step], rng)
        codes(iscale, mn, La)
        torch.mul(w, La, out=P[:, 2])
        torch.mul(P[:, 2], La, out=P[:, 1])
        torch.mul(P[:, 2], x, out=P[:, 0])
        rowsum_(S[1:], P)
        s_xl, s_l2, s_l = S[1], S[2], S[3]
        D = (sum_w * s_l2).sub_(s_l * s_l)
        ok = D > 0
        # [sum_w * s_xl - sum_x * s_l, s_l2 * sum_x - s_l * s_xl] / D: this_scale, this_min
        t = (WX * S[1:3]).sub_(s_l * S[0:2]).div_(torch.where(ok, D, one))
        pos = t[1] > 0
        t_scale = torch.where(pos, div(s_xl, s_l2), t[0])
        t_min = t[1].masked_fill_(pos, 0.0)
        cur = error(t_scale, t_min, La)
        upd = (cur < best).logical_and_(ok).logical_and_(notflat)
        state = torch.where(upd, torch.stack([iscale, mn, cur, t_scale, t_min]), state)
        best = state[2]
    best_iscale, best_codes_min, _, scale, mn = state.unbind(0)
    torch.sub(mx, best_codes_min, out=rng).masked_fill_(flat, 1.0)
    L = codes(best_iscale, best_codes_min, La).int()
    return torch.where(flat, 0.0, scale), -mn, torch.where(flat, 0, L)


def make_qp_quants(x: Tensor, nmax: int, qw: Tensor) -> tuple[Tensor, Tensor]:
    """make_qp_quants(n, nmax, x, L, quant_weights), x [n, B] -> (scale [B], L [n, B] as the uint8 C stores).
    Quantizes the (non-negative) sub-block scales or mins of a K-quant super-block against one scale."""
    mx = x.amax(0).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)

    def mse(scale, l):
        diff = x - scale * l.float()
        return seqsum((qw * diff) * diff)

    iscale = div(nmax, mx)
    best = mse(div(1.0, iscale), nearest_int(iscale * x) & 0xFF)  # L is a uint8_t array
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = div(float(np.float32(0.1) * np.float32(step) + np.float32(nmax)), mx)
        cur = mse(div(1.0, isc), nearest_int(isc * x).clamp(max=nmax))
        upd = cur < best
        best = torch.where(upd, cur, best)
        iscale = torch.where(upd, isc, iscale)
    l = nearest_int(iscale * x).clamp(max=nmax)
    lf = l.float()
    wx = qw * x
    sumlx, suml2 = seqsum(wx * lf, (qw * lf) * lf)
    L = l & 0xFF
    for _ in range(5):  # a pass that changes nothing leaves the state as it was, so no early exit is needed
        for i in range(x.shape[0]):
            w, xi, Li = qw[i], x[i], L[i].float()
            slx = sumlx - (wx[i] * Li)
            sl2 = suml2 - ((w * Li) * Li)
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(div(xi * sl2, torch.where(ok, slx, 1.0))).clamp(max=nmax)
            nl = new_l.float()
            slx = slx + wx[i] * nl
            sl2 = sl2 + (w * nl) * nl
            ok &= (new_l != L[i]) & (((slx * slx) * suml2) > ((sumlx * sumlx) * sl2))
            L[i] = torch.where(ok, new_l & 0xFF, L[i])
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    scale = torch.where(suml2 > 0, div(sumlx, torch.where(suml2 > 0, suml2, 1.0)), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L)


def make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse = true), x [n, B] -> (scale [B], L [n, B] in [0, 2 nmax - 1]).
    Symmetric x ~ scale * (L - nmax), weights x^2, then up to 5 passes of coordinate descent on each L[i]
    (a pass that changes nothing changes nothing the next time either, so C's early exit needs no port)."""
    amax, mx = max_abs(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    iscale = div(float(-nmax), mx)
    L = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.float()
    sumlx, suml2 = seqsum(wx * lf, (w * lf) * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            Li = L[i].float()
            slx = sumlx - wx[i] * Li
            ok = slx > 0
            sl2 = suml2 - (w[i] * Li) * Li
            new_l = nearest_int(div(x[i] * sl2, torch.where(ok, slx, 1.0))).clamp(-nmax, nmax - 1)
            nl = new_l.float()
            ok &= new_l != L[i]
            slx = slx + wx[i] * nl
            sl2 = sl2 + (w[i] * nl) * nl
            ok &= (sl2 > 0) & (((slx * slx) * suml2) > ((sumlx * sumlx) * sl2))
            L[i] = torch.where(ok, new_l, L[i])
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    scale = torch.where(suml2 > 0, div(sumlx, torch.where(suml2 > 0, suml2, 1.0)), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L + nmax)
