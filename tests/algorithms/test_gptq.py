"""GPTQ against round-to-nearest, against an unvectorised reference, and on every format's grid."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.algorithms import gptq, rtn
from tests.algorithms.fmts import ALL, GPTQ_VS_RTN, fmt
from tests.algorithms.problems import output_error, problem

torch.set_num_threads(1)

N, K = 96, 512  # K a multiple of the 256-element K-quant super-block


@pytest.fixture(scope="module")
def prob():
    return problem(N, K, n=1024, seed=0)


@pytest.mark.parametrize("name", GPTQ_VS_RTN)
def test_gptq_beats_rtn(prob, name):
    w, x, H = prob
    f = fmt(name)
    e_rtn = output_error(w, f.dequantize(rtn(w, f)), x)
    e_gptq = output_error(w, f.dequantize(gptq(w, H, f)), x)
    assert e_gptq < 0.6 * e_rtn, f"{name}: GPTQ/RTN output error {e_gptq / e_rtn:.3f}"


@pytest.mark.parametrize("name", ALL)
def test_act_order_static_groups_stay_on_their_grid(prob, name):
    w, x, H = prob
    f = fmt(name)
    p = gptq(w, H, f, act_order=True, static_groups=True)
    params, codes = f.params(p), f.codes(p)
    ref = f.fit(w)  # static groups: the RTN parameters of the original weights
    for k in params:
        assert torch.equal(params[k], ref[k]), f"{name}: parameter {k} differs from the up-front fit"
    w_hat = f.dequantize(p)
    assert torch.equal(f.encode(w_hat, params), codes), f"{name}: a code is off its own group's grid"
    assert tuple(p.shape) == (N, K) and torch.isfinite(w_hat).all()


@pytest.mark.parametrize("name", ALL)
def test_zero_blocks_and_dead_inputs(prob, name):
    """All-zero blocks (scale 0: every code decodes alike) take the format's own code; dead inputs give 0."""
    w, x, H = prob
    w, H = w.clone(), H.clone()
    w[:4] = 0.0  # rows of zero blocks (any block size, per-channel included)
    H[:, 300] = H[300, :] = 0.0  # input 300 never active
    f = fmt(name)
    p = gptq(w, H, f)
    params = f.params(p)
    assert torch.equal(f.encode(f.dequantize(p), params), f.codes(p))
    assert torch.equal(f.codes(p)[:4], f.encode(w, params)[:4])
    assert (f.dequantize(p)[:4] == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_diagonal_hessian_is_nearest_rounding(prob, name):
    """With no correlation between inputs there is nothing to compensate: GPTQ must return the nearest grid
    points of its static parameters, which pins the in-loop rounding to the format's own `encode`."""
    w, _, _ = prob
    f = fmt(name)
    H = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(3)) + 0.5)
    assert torch.equal(f.codes(gptq(w, H, f)), f.encode(w, f.fit(w)))


@pytest.mark.parametrize("act_order,static", [(False, True), (False, False)])
def test_other_orders_beat_rtn(prob, act_order, static):
    w, x, H = prob
    f = fmt("q4_k")
    e_rtn = output_error(w, f.dequantize(rtn(w, f)), x)
    p = gptq(w, H, f, act_order=act_order, static_groups=static)
    assert torch.equal(f.encode(f.dequantize(p), f.params(p)), f.codes(p))
    assert output_error(w, f.dequantize(p), x) < 0.6 * e_rtn


def test_block_size_is_speed_only(prob):
    w, x, H = prob
    f = fmt("int4_g32_sym")
    a, b = gptq(w, H, f, block_size=128), gptq(w, H, f, block_size=32)
    assert (f.codes(a) != f.codes(b)).float().mean() < 1e-3
    ea, eb = output_error(w, f.dequantize(a), x), output_error(w, f.dequantize(b), x)
    assert abs(ea - eb) < 1e-3 * ea


def test_importance_params(prob):
    w, x, H = prob
    f = fmt("int4_g32_sym")
    p = gptq(w, H, f, importance_params=True)
    ref = f.params(f.quantize(w, importance=torch.diagonal(H)))
    assert all(torch.equal(f.params(p)[k], ref[k]) for k in ref)
    assert output_error(w, f.dequantize(p), x) < 0.6 * output_error(w, f.dequantize(rtn(w, f)), x)


# -------------------------------------------------------------------------------------------------------
# an unvectorised GPTQ: Optimal Brain Surgeon one column at a time with the explicit inverse Hessian (fp64),
# no Cholesky, no lazy blocks; the vectorised one must choose exactly the same codes


def gptq_unvectorised(w, H, f, damp=0.01, act_order=True):
    W, H = w.double().clone(), H.double().clone()
    K = W.shape[1]
    for i in range(K):
        if H[i, i] == 0:  # dead input: weight irrelevant, zero it
            H[i, i] = 1.0
            W[:, i] = 0.0
    params = f.fit(W.float())
    scale, offset, _, _ = f.grid(params)
    mean_diag = sum(H[i, i].item() for i in range(K)) / K
    for i in range(K):
        H[i, i] += damp * mean_diag
    Hinv = torch.linalg.inv(H)
    order = sorted(range(K), key=lambda i: -H[i, i].item()) if act_order else list(range(K))
    codes = torch.zeros(W.shape, dtype=torch.int64)
    for t, j in enumerate(order):
        q = f.encode(W[:, j:j + 1].float(), params, col_start=j)[:, 0].long()
        g = j // (K // scale.shape[1])
        w_hat = scale[:, g].double() * q + offset[:, g].double()
        codes[:, j] = q
        err = (W[:, j] - w_hat) / Hinv[j, j]
        for k in order[t + 1:]:
            W[:, k] -= err * Hinv[j, k]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]  # remove column j (OBS)
    return codes


@pytest.mark.parametrize("name,k,act_order", [("int4_g32_sym", 128, True), ("int4_g32_asym", 128, False),
                                              ("int3_g32_sym", 128, True), ("q4_0", 128, True),
                                              ("q4_k", 256, True), ("q6_k", 256, True)])
def test_matches_unvectorised_reference(name, k, act_order):
    w, x, H = problem(12, k, n=512, seed=5)
    H[7, :] = H[:, 7] = 0.0  # a dead input channel
    f = fmt(name)
    want = gptq_unvectorised(w, H, f, act_order=act_order)
    p = gptq(w, H, f, act_order=act_order, block_size=32)
    got = f.codes(p)
    assert torch.equal(got.long(), want), f"{(got.long() != want).sum().item()} codes differ"
    zero = f.encode(torch.zeros(w.shape[0], 1), f.params(p), col_start=7)  # dead input -> nearest to 0
    assert torch.equal(got[:, 7:8], zero)


# -------------------------------------------------------------------------------------------------------
# bad input


def test_nan_and_inf_raise(prob):
    w, _, H = prob
    f = fmt("int4_g32_sym")
    bad_w = w.clone()
    bad_w[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^w has 1 non-finite"):
        gptq(bad_w, H, f)
    bad_H = H.clone()
    bad_H[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"^H has 1 non-finite"):
        gptq(w, bad_H, f)
    with pytest.raises(ValueError, match=r"^w has"):
        rtn(bad_w, f)


def test_shapes_and_act_order_with_dynamic_groups_raise(prob):
    w, _, H = prob
    f = fmt("int4_g32_sym")
    with pytest.raises(ValueError, match="H must be"):
        gptq(w, H[:-1, :-1], f)
    with pytest.raises(ValueError, match="static_groups"):
        gptq(w, H, f, act_order=True, static_groups=False)


def test_damp_retry_then_failure(prob):
    w, x, _ = prob
    f = fmt("int4_g32_sym")
    H = x.T @ x / x.shape[0]
    H.diagonal().sub_(0.05 * H.diagonal().mean())  # indefinite until damp > 5%
    with pytest.warns(UserWarning, match="used damp=0.08"):
        p = gptq(w, H, f)
    assert torch.isfinite(f.dequantize(p)).all()
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, -torch.eye(K), f)


@pytest.mark.parametrize("act_order", [True, False])
def test_shared_hessian_factor_gives_the_same_codes(prob, act_order):
    """q/k/v (and gate/up) read the same inputs: one HessianFactor serves them all, with the result of
    factoring H for each matrix on its own."""
    from gemmaquant.algorithms import HessianFactor

    w, _, H = prob
    H = H.clone()
    H[:, 7] = H[7, :] = 0.0  # a dead input: the factor carries it
    f = fmt("int4_g32_sym")
    shared = HessianFactor(H, 0.01, act_order)
    for rows in (w, w.flip(0) * 0.5):
        a, b = gptq(rows, H, f, act_order=act_order), gptq(rows, shared, f)
        assert all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    with pytest.raises(ValueError, match="H must be"):
        gptq(w[:, :256], shared, f)
