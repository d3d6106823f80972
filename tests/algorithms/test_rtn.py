"""RTN and importance-weighted (imatrix) RTN."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.algorithms import rtn
from tests.algorithms.fmts import fmt
from tests.algorithms.problems import problem

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def prob():
    return problem(64, 512, n=1024, seed=0)


@pytest.mark.parametrize("name", ["int4_g32_sym", "int3_g32_sym", "q4_0", "q8_0", "int8"])
def test_importance_lowers_weighted_error(prob, name):
    """imatrix: with importance diag(H) the format picks block parameters with a lower importance-weighted error
    sum_k H_kk (w - w_hat)^2 (the diagonal part of the output error) than plain RTN."""
    w, _, H = prob
    f = fmt(name)
    imp = torch.diagonal(H)
    werr = lambda p: (imp * (w - f.dequantize(p)) ** 2).sum().item()  # noqa: E731
    plain, weighted = werr(rtn(w, f)), werr(rtn(w, f, importance=imp))
    assert weighted <= plain, f"{name}: weighted error {weighted:.4g} > plain {plain:.4g}"


def test_plain_rtn_is_the_format(prob):
    w, _, _ = prob
    f = fmt("q4_k")
    assert torch.equal(f.codes(rtn(w, f)), f.codes(f.quantize(w)))


def test_bad_input(prob):
    w, _, H = prob
    f = fmt("int4_g32_sym")
    with pytest.raises(ValueError, match="importance must be"):
        rtn(w, f, importance=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        rtn(w, f, importance=-torch.diagonal(H))
    with pytest.raises(ValueError, match=r"^importance has 1 non-finite"):
        rtn(w, f, importance=torch.diagonal(H).clone().index_fill_(0, torch.tensor([5]), float("inf")))
    with pytest.raises(ValueError, match="2-D"):
        rtn(w[0], f)
