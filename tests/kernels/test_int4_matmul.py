"""int4_matmul kernel against its torch reference (TRITON_INTERPRET=1 on CPU): the kernel's error against an
fp32 ground truth is at most 2x the reference's error in the same precision (flash-attention's rule)."""

import pytest
import torch

from gemmaquant import ops
from gemmaquant.formats import Int4Group
from gemmaquant.kernels.int4_matmul import int4_dequantize_ref, int4_matmul, int4_matmul_ref

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("M,N,K,group", [(1, 32, 64, 32), (5, 48, 128, 64), (17, 32, 128, 128), (3, 40, 96, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_matmul_matches_reference(M, N, K, group, symmetric, dtype):
    g = torch.Generator().manual_seed(M * N + K)
    fmt = Int4Group(group, symmetric, scale_dtype=torch.bfloat16)
    p = fmt.quantize(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).to(dtype)
    zero = p.data.get("zero")
    w = fmt.dequantize(p)
    assert torch.equal(int4_dequantize_ref(p.data["qdata"], p.data["scale"], zero, group), w)  # layout agrees
    exact = x.double() @ w.double().T
    ref_err = (int4_matmul_ref(x, p.data["qdata"], p.data["scale"], zero, group).double() - exact).abs().max()
    out = int4_matmul(x, p.data["qdata"], p.data["scale"], zero, group)
    assert out.shape == (M, N) and out.dtype == dtype
    err = (out.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-5, f"kernel error {err:.3g} vs reference {ref_err:.3g}"


def test_dispatcher_decides_per_call():
    fmt = Int4Group(32)
    p = fmt.quantize(torch.randn(32, 64))
    x = torch.randn(2, 64)
    a = ops.int4_matmul(x, p.data["qdata"], p.data["scale"], None, 32)  # CPU tensor: the reference
    with ops.use("triton"):
        b = ops.int4_matmul(x, p.data["qdata"], p.data["scale"], None, 32)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError):
        int4_matmul(x, p.data["qdata"], p.data["scale"], None, 64)
