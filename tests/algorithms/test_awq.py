"""AWQ scale search: never worse than RTN on its data, exactly RTN at alpha = 0, better on outlier inputs."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.algorithms import awq_clip, awq_scales, awq_search, rtn
from gemmaquant.algorithms.awq import awq_candidate_scales
from gemmaquant.algorithms.awq import squared_output_error
from tests.algorithms.fmts import GPTQ_VS_RTN, fmt
from tests.algorithms.problems import activations, output_error, weights

torch.set_num_threads(1)

K = 256


@pytest.fixture(scope="module")
def data():
    x = activations(1024, K, seed=0)  # calibration
    x_test = activations(1024, K, seed=0, sample_seed=1)  # held out, same distribution
    ws = [weights(64, K, seed=s) for s in (1, 2, 3)]  # three linears sharing x (q, k, v)
    return x, x_test, ws


def awq_error(ws, fmts, s, x):
    """sum_i ||Q(W_i s)(x/s)^T - W_i x^T||, the output error after folding 1/s into x."""
    return sum(output_error(w, f.dequantize(rtn(w * s, f)) / s, x) ** 2 for w, f in zip(ws, fmts)) ** 0.5


@pytest.mark.parametrize("name", GPTQ_VS_RTN)
def test_awq_beats_rtn(data, name):
    x, _, ws = data
    fmts = [fmt(name)] * len(ws)
    res = awq_search(ws, x, fmts)
    e_rtn = awq_error(ws, fmts, torch.ones(K), x)
    e_awq = awq_error(ws, fmts, res.scales, x)
    assert res.alpha > 0 and e_awq < 0.8 * e_rtn, f"{name}: alpha {res.alpha}, AWQ/RTN {e_awq / e_rtn:.3f}"
    assert res.losses.argmin().item() == round(res.alpha * 20)
    assert abs(res.losses.min().item() - e_awq ** 2) < 1e-4 * e_awq ** 2  # the search's loss is this error


def test_alpha_zero_is_rtn(data):
    x, _, ws = data
    f = fmt("int4_g32_sym")
    s = awq_candidate_scales(x.abs().mean(0), 0.0)
    assert torch.equal(s, torch.ones(K))
    assert torch.equal(awq_scales(ws, x, [f] * 3, n_grid=1), torch.ones(K))  # the grid is {0}
    assert torch.equal(f.codes(rtn(ws[0] * s, f)), f.codes(rtn(ws[0], f)))
    res = awq_search(ws, x, [f] * 3)
    assert abs(res.losses[0].item() - awq_error(ws, [f] * 3, torch.ones(K), x) ** 2) < 1e-4 * res.losses[0].item()


def test_scales_normalised_and_qr_path(data):
    x, _, ws = data
    f = fmt("int4_g32_sym")
    s = awq_scales(ws, x, [f] * 3)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5)
    dW = f.dequantize(rtn(ws[0], f)) - ws[0]
    R = torch.linalg.qr(x.double(), mode="r").R.float()  # what the search uses when tokens > channels
    direct = (x.double() @ dW.double().T).pow(2).sum().item()
    assert abs(squared_output_error(dW, R, 7) - direct) < 1e-5 * direct  # chunked over rows, 7 at a time


def test_held_out_error_improves(data):
    x, x_test, ws = data
    fmts = [fmt("int4_g128_sym")] * 3
    s = awq_scales(ws, x, fmts)
    assert awq_error(ws, fmts, s, x_test) < 0.9 * awq_error(ws, fmts, torch.ones(K), x_test)


def test_bad_input(data):
    x, _, ws = data
    f = fmt("int4_g32_sym")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^x has 1 non-finite"):
        awq_scales(ws, bad, [f] * 3)
    with pytest.raises(ValueError, match="one format per weight"):
        awq_scales(ws, x, [f])
    assert torch.equal(awq_scales(ws, torch.zeros(0), [f] * 3), torch.ones(K))  # no tokens: no scaling


# ---- clipping search (awq_clip) ---------------------------------------------------------------------------------
def block_errors(w, w_hat, H, B):
    """Each block's share of the output error, dW_b H_bb dW_b^T, [N, K // B] fp64."""
    N, K = w.shape
    dW = (w_hat - w).double().reshape(N, K // B, B)
    Hb = torch.stack([H[g * B:(g + 1) * B, g * B:(g + 1) * B] for g in range(K // B)]).double()
    return torch.einsum("ngk,gkl,ngl->ng", dW, Hb, dW)


@pytest.mark.parametrize("name", ["int4_g32_sym", "int3_g32_sym", "int4_g64_asym", "q4_0", "q5_1"])
def test_clip_never_worse_per_block_and_better_overall(data, name):
    x, x_test, ws = data
    f = fmt(name)
    H = x.T @ x / x.shape[0]
    w = ws[2]
    clipped = awq_clip(w, H, f)
    assert (clipped.abs() <= w.abs()).all() and torch.equal(clipped.sign() * (clipped != 0), w.sign() * (clipped != 0))
    w_rtn = f.dequantize(rtn(w, f))
    w_clip = f.dequantize(rtn(clipped, f))
    e_rtn, e_clip = block_errors(w, w_rtn, H, f.block), block_errors(w, w_clip, H, f.block)
    assert (e_clip <= e_rtn * (1 + 1e-5) + 1e-12).all()  # r = 1 (RTN) is a candidate of every block
    assert output_error(w, w_clip, x) < 0.95 * output_error(w, w_rtn, x), name
    assert output_error(w, w_clip, x_test) < 0.97 * output_error(w, w_rtn, x_test), name  # held out too


def test_clip_chunking_and_passthrough(data):
    x, _, ws = data
    H = x.T @ x / x.shape[0]
    f = fmt("int4_g32_sym")
    assert torch.equal(awq_clip(ws[0], H, f, rows_per_chunk=7), awq_clip(ws[0], H, f))
    assert torch.equal(awq_clip(ws[0], H, f, max_shrink=0.05), ws[0])  # the grid is {1}: nothing clipped
    assert awq_clip(ws[0], H, fmt("int8")) is ws[0]  # one pair per row: left to plain RTN


def test_per_weight_inputs(data):
    """MoE experts share one scale but each reads its own routed tokens: the loss follows x_per_weight."""
    x, _, ws = data
    fmts = [fmt("int4_g32_sym")] * 3
    same = awq_search(ws, x, fmts, x_per_weight=[x, x, x])
    plain = awq_search(ws, x, fmts)
    assert same.alpha == plain.alpha and torch.allclose(same.losses, plain.losses, rtol=1e-6)
    only_two = awq_search(ws, x, fmts, x_per_weight=[x[:300], torch.zeros(0, K), x[300:]])
    ref = awq_search(ws[::2], x, fmts[:2], x_per_weight=[x[:300], x[300:]])  # the empty one adds no loss
    assert only_two.alpha == ref.alpha and torch.allclose(only_two.losses, ref.losses, rtol=1e-6)
    with pytest.raises(ValueError, match="one input per weight"):
        awq_search(ws, x, fmts, x_per_weight=[x])
