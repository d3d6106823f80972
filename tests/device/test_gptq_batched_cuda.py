"""Batched GPTQ of MoE experts on a real GPU (skipped without one; scripts/gpu_check.sh runs it): the batched
sweep against the per-expert loop on the same device. On CUDA the batched kernels may sum in another order than
the per-matrix ones, so a code can differ where a value sits within fp32 rounding of a grid midpoint (and the
difference then propagates through the later columns' updates): the test bounds how many codes differ and asserts
the output error ||(W - W_hat) X^T|| is the loop's to 1%."""

import warnings

import pytest
import torch

from gemmaquant.algorithms.gptq import gptq
from gemmaquant.algorithms.gptq_batched import gptq_experts
from gemmaquant.formats import get_format
from tests.algorithms.problems import activations, output_error, weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["int4_g32_sym", "q5_0", "q4_k"])
def test_batched_experts_on_cuda_match_the_loop(name):
    E, N, K = 16, 256, 512
    xs = [activations(2 * K, K, seed=e) for e in range(E)]
    w = torch.stack([weights(N, K, seed=100 + e) for e in range(E)]).cuda()
    H = torch.stack([x.T @ x / x.shape[0] for x in xs]).cuda()
    f = get_format(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop = [gptq(w[e], H[e], f, importance_params=True) for e in range(E)]
        batched = gptq_experts(w, H, f, importance_params=True)
    differ = sum(int((f.codes(a) != f.codes(b)).sum()) for a, b in zip(loop, batched))
    assert differ <= 0.01 * E * N * K, f"{differ} codes differ"
    for e in range(E):
        x = xs[e]
        ea = output_error(w[e].cpu(), f.dequantize(loop[e]).cpu(), x)
        eb = output_error(w[e].cpu(), f.dequantize(batched[e]).cpu(), x)
        assert eb == pytest.approx(ea, rel=0.01), e
