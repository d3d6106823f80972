"""The pieces the two MoE kernel families share (kernels/_moe_tiles.py) and the decode family's launch rules
(kernels/moe_decode.py), each against torch: the GELU formula and one expert's weight tile in every layout."""

import pytest
import torch
import triton
import triton.language as tl

from gemmaquant.kernels._moe_tiles import FLOAT, INT4, INT8, expert_tile, gelu_tanh
from gemmaquant.kernels.int4_matmul import int4_dequantize_ref
from gemmaquant.kernels.moe_decode import decode_config
from tests.kernels.parity import DEVICE

pytestmark = pytest.mark.interpreter


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r, mask=r < N, other=0.0)
    tl.store(y_ptr + r, gelu_tanh(x), mask=r < N)


@triton.jit
def _tile_kernel(w_ptr, s_ptr, z_ptr, out_ptr, scale_out_ptr, k0, N, K, stride_wn, stride_sn, stride_zn,
                 WFMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rn = tl.arange(0, BLOCK_N)
    w, s = expert_tile(w_ptr, s_ptr, z_ptr, rn, k0, N, K, stride_wn, stride_sn, stride_zn, tl.float32, WFMT, GROUP,
                       HAS_ZERO, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * BLOCK_K + rk[None, :], w)
    if WFMT == 2:
        tl.store(scale_out_ptr + rn, s)


def test_gelu_tanh_is_torchs_tanh_gelu():
    x = torch.linspace(-12, 12, 1001)
    y = torch.empty_like(x)
    _gelu_kernel[(1,)](x.to(DEVICE), y.to(DEVICE), x.numel(), BLOCK=1024)
    ref = torch.nn.functional.gelu(x.double(), approximate="tanh")
    assert (y.cpu().double() - ref).abs().max() < 1e-6  # fp32 evaluation of the same function


@pytest.mark.parametrize("wfmt", [FLOAT, INT8, INT4])
def test_expert_tile_reads_every_layout(wfmt):
    """The [BLOCK_N, BLOCK_K] tile at k0 of an [N, K] expert: float values, int8 codes, int4 codes u - z with the
    group scale per row; rows past N read as zero."""
    g = torch.Generator().manual_seed(wfmt)
    N, K, group, BN, BK, k0 = 12, 128, 32, 16, 32, 64
    z = torch.randint(0, 16, (N, K // group), generator=g, dtype=torch.uint8)
    s = torch.rand(N, K // group, generator=g)
    if wfmt == INT4:
        w = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
        want = int4_dequantize_ref(w, torch.ones_like(s), z, group)[:, k0:k0 + BK]  # codes u - z
    elif wfmt == INT8:
        w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        want = w[:, k0:k0 + BK].float()
    else:
        w = torch.randn(N, K, generator=g)
        want = w[:, k0:k0 + BK]
    out = torch.full((BN, BK), float("nan"))
    scale_out = torch.zeros(BN)
    _tile_kernel[(1,)](w.to(DEVICE), s.to(DEVICE), z.to(DEVICE), out, scale_out, k0, N, K, w.stride(0), s.stride(0),
                       z.stride(0), WFMT=wfmt, GROUP=group, HAS_ZERO=True, BLOCK_N=BN, BLOCK_K=BK)
    assert torch.equal(out[:N], want.float()) and torch.equal(out[N:], torch.zeros(BN - N, BK))
    if wfmt == INT4:
        assert torch.equal(scale_out[:N], s[:, k0 // group])


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_decode_config_blocks_divide_the_group(group):
    for cuda in (True, False):
        cfg = decode_config(2816, group, True, cuda)
        assert group % cfg["block_k"] == 0 and cfg["block_k"] >= 16
    assert decode_config(2816, 0, False, True)["block_k"] == 128  # float / int8 experts: no group to respect
