"""int8_matmul kernel against its torch reference: W8A16 and W8A8 (dynamic per-token activation quantization fused
in), decode (split-K) and prefill launch shapes, K not a multiple of the K-tile, fp16/bf16 activations."""

import pytest
import torch

from gemmaquant import ops
from gemmaquant.formats import Int8Channel
from gemmaquant.kernels.int8_matmul import int8_matmul, int8_matmul_ref, quantize_per_token_ref
from tests.kernels.parity import DEVICE, assert_parity

pytestmark = pytest.mark.interpreter


def _problem(M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + M * 1000 + N + K)
    p = Int8Channel().quantize(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g)
    if M > 2:
        x[2] = 0  # an all-zero token: scale 0, codes 0
    x = x.to(dtype)
    return p, x.to(DEVICE), p.data["qdata"].to(DEVICE), p.data["scale"].to(DEVICE)


def _exact(x, p, act_quant):
    w = Int8Channel().dequantize(p).double()
    if act_quant:  # the semantics quantize x first: the ground truth is exact arithmetic on the quantized x
        xq, sx = quantize_per_token_ref(x.cpu())
        return (xq.double() * sx.double()[:, None]) @ w.T
    return x.double().cpu() @ w.T


@pytest.mark.parametrize("M,N,K", [(1, 48, 64), (5, 40, 100), (16, 64, 256), (17, 32, 100), (40, 48, 192)])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_matmul_matches_reference(M, N, K, act_quant, dtype):
    p, x, q, s = _problem(M, N, K, dtype)
    out = int8_matmul(x, q, s, act_quant)
    assert_parity(out.cpu(), int8_matmul_ref(x, q, s, act_quant).cpu(), _exact(x, p, act_quant),
                  f"int8 {'W8A8' if act_quant else 'W8A16'} M={M} N={N} K={K} {dtype}")


@pytest.mark.parametrize("config", [dict(split_k=3), dict(split_k=1, block_k=32), dict(block_m=32, block_n=16)])
@pytest.mark.parametrize("act_quant", [False, True])
def test_int8_matmul_launch_configs(config, act_quant):
    p, x, q, s = _problem(3, 40, 100, torch.bfloat16)
    out = int8_matmul(x, q, s, act_quant, config=config)
    assert_parity(out.cpu(), int8_matmul_ref(x, q, s, act_quant).cpu(), _exact(x, p, act_quant),
                  f"int8 act_quant={act_quant} config {config}")


def test_int8_bad_input():
    p, x, q, s = _problem(3, 32, 64, torch.float16)
    with pytest.raises(ValueError):
        int8_matmul(x[:, :32], q, s)
    with pytest.raises(ValueError):
        int8_matmul(x, q.to(torch.uint8), s)


@pytest.mark.parametrize("act_quant", [False, True])
def test_int8_custom_op_and_compile(act_quant):
    p, x, q, s = _problem(3, 32, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.gemmaquant.int8_matmul, (x, q, s, act_quant))

    def f(x):
        return ops.int8_matmul(x, q, s, act_quant, impl="triton") * 2

    assert torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x))
