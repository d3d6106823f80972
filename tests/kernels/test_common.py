"""kernels/_common.py: cast_rn rounds fp32 -> bf16 to nearest even (the interpreter's own cast truncates), mma is an
exact-product fp32-accumulate dot, check_device refuses what no kernel can run on."""

import pytest
import torch
import triton
import triton.language as tl

from gemmaquant.kernels._common import cast_rn, check_device, emulate_bf16, mma

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, cast_rn(x, tl.bfloat16, EMULATE), mask=offs < n)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, EMULATE: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = mma(a, b, tl.zeros((M, N), dtype=tl.float32), EMULATE)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def test_cast_rn_rounds_to_nearest_even_like_torch():
    """Normal numbers, ties, signed zeros, overflow and infinities. (Subnormals are left out: the interpreter
    flushes a subnormal result to zero, 1e-40 -> 0 where torch keeps a bf16 subnormal; see _common.py.)"""
    one = 1.0
    ulp = 2.0**-7  # bf16 spacing at 1.0
    ties = torch.tensor([one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2), 3.0e38, 1.5e-38, 0.0, -0.0,
                         one + ulp / 2 + 2**-20, float("inf"), -float("inf")])
    x = torch.cat([ties, torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100]).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256, EMULATE=emulate_bf16(x))
    want = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    assert y[0].item() == one and y[1].item() == one + 2 * ulp  # ties go to the even neighbour, both ways


def test_mma_on_bf16_is_exact_products_with_fp32_accumulation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=g).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(32, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    c = torch.empty(16, 16, dtype=torch.float32, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, 16, 16, 32, EMULATE=emulate_bf16(a))
    exact = a.double() @ b.double()
    assert (c.double() - exact).abs().max().item() <= 32 * 2**-24 * exact.abs().max().item()


def test_check_device_names_the_problem(monkeypatch):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="one device"):
        check_device(x, torch.zeros(2, device="meta"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        check_device(x)
