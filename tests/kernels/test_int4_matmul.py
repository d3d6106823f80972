"""int4_matmul kernel against its torch reference: decode (split-K, M <= 16) and prefill (M > 16) launch shapes,
symmetric and asymmetric, groups 32/64/128, fp16/bf16 (and fp32) activations, K at group edges."""

import pytest
import torch

from gemmaquant import ops
from gemmaquant.formats import Int4Group
from gemmaquant.kernels.int4_matmul import int4_dequantize_ref, int4_matmul, int4_matmul_ref
from tests.kernels.parity import DEVICE, assert_parity

pytestmark = pytest.mark.interpreter


def _problem(M, N, K, group, symmetric, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + M * 1000 + N + K)
    fmt = Int4Group(group, symmetric, scale_dtype=torch.bfloat16)
    w = torch.randn(N, K, generator=g)
    w[0] = 0  # an all-zero row: scale 0 in every group
    p = fmt.quantize(w)
    x = torch.randn(M, K, generator=g).to(dtype)
    args = [t.to(DEVICE) if t is not None else None for t in (x, p.data["qdata"], p.data["scale"], p.data.get("zero"))]
    return fmt, p, args


# (M, N, K, group): M = 1 / 5 / 16 decode; 17 / 40 prefill (not multiples of BLOCK_M); K = one group, 3 groups;
# group 16 (BLOCK_K = 16: on an H200 the interleaving unpack miscompiled at that width, Triton 3.6)
SHAPES = [(1, 48, 64, 32), (1, 40, 128, 128), (5, 40, 192, 64), (16, 64, 256, 128), (17, 32, 128, 128),
          (40, 48, 96, 32), (3, 40, 64, 16), (33, 40, 80, 16)]


@pytest.mark.parametrize("M,N,K,group", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_matmul_matches_reference(M, N, K, group, symmetric, dtype):
    fmt, p, (x, q, s, z) = _problem(M, N, K, group, symmetric, dtype)
    w = fmt.dequantize(p)
    assert torch.equal(int4_dequantize_ref(p.data["qdata"], p.data["scale"], p.data.get("zero"), group), w)
    exact = x.double().cpu() @ w.double().T
    out = int4_matmul(x, q, s, z, group)
    assert_parity(out.cpu(), int4_matmul_ref(x, q, s, z, group).cpu(), exact,
                  f"int4 M={M} N={N} K={K} g={group} {'sym' if symmetric else 'asym'} {dtype}")


@pytest.mark.parametrize("M", [1, 17])
def test_int4_matmul_fp32_activations(M):
    fmt, p, (x, q, s, z) = _problem(M, 48, 128, 32, False, torch.float32)
    exact = x.double().cpu() @ fmt.dequantize(p).double().T
    assert_parity(int4_matmul(x, q, s, z, 32).cpu(), int4_matmul_ref(x, q, s, z, 32).cpu(), exact, f"int4 fp32 M={M}")


@pytest.mark.parametrize("config", [dict(split_k=3), dict(split_k=1), dict(block_k=16), dict(block_n=16, split_k=5),
                                    dict(unpack="split"), dict(unpack="split", block_k=32, split_k=3)])
def test_int4_matmul_launch_configs(config):
    """Uneven and empty K splits (4 K-tiles over 3 or 5 splits), no split, BLOCK_K below the group: same result."""
    fmt, p, (x, q, s, z) = _problem(3, 40, 128, 32, False, torch.float16)
    exact = x.double().cpu() @ fmt.dequantize(p).double().T
    out = int4_matmul(x, q, s, z, 32, config=config)
    assert_parity(out.cpu(), int4_matmul_ref(x, q, s, z, 32).cpu(), exact, f"int4 config {config}")


@pytest.mark.parametrize("M,config", [(1, {}), (3, dict(split_k=3)), (16, dict(gemv_block_m=2, block_n=16)),
                                      (5, dict(block_k=32, split_k=1))])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_gemv_kernel(M, config, symmetric, dtype):
    """kernel="gemv": the zero point factored out of the dot, rows past M in the last row block, uneven K splits."""
    fmt, p, (x, q, s, z) = _problem(M, 40, 256, 64, symmetric, dtype)
    exact = x.double().cpu() @ fmt.dequantize(p).double().T
    out = int4_matmul(x, q, s, z, 64, config=dict(kernel="gemv", **config))
    assert_parity(out.cpu(), int4_matmul_ref(x, q, s, z, 64).cpu(), exact, f"int4 gemv M={M} {config} {dtype}")


@pytest.mark.parametrize("M", [1, 40])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matmul_split_nibbles(M, symmetric):
    """unpack="split" (two dots over the even and odd columns), decode and prefill tiles, bf16."""
    fmt, p, (x, q, s, z) = _problem(M, 48, 256, 64, symmetric, torch.bfloat16)
    exact = x.double().cpu() @ fmt.dequantize(p).double().T
    out = int4_matmul(x, q, s, z, 64, config=dict(unpack="split"))
    assert_parity(out.cpu(), int4_matmul_ref(x, q, s, z, 64).cpu(), exact, f"int4 split M={M} sym={symmetric}")


def test_int4_matmul_strided_x_and_bad_input():
    fmt, p, (x, q, s, z) = _problem(4, 32, 64, 32, True, torch.float16)
    wide = torch.zeros(4, 96, dtype=x.dtype, device=x.device)
    wide[:, :64] = x
    assert torch.equal(int4_matmul(wide[:, :64], q, s, z, 32), int4_matmul(x, q, s, z, 32))  # row stride 96
    with pytest.raises(ValueError):
        int4_matmul(x, q, s, z, 64)  # scale has K // 32 columns
    with pytest.raises(ValueError):
        int4_matmul(x, q, s, z, 32, config=dict(block_k=64))  # BLOCK_K must divide the group
    with pytest.raises(ValueError, match="unpack"):
        int4_matmul(x, q, s, z, 32, config=dict(unpack="split", block_k=16))  # a dot needs K >= 16 per half


def test_int4_custom_op_and_compile():
    fmt, p, (x, q, s, z) = _problem(3, 32, 64, 32, False, torch.bfloat16)
    torch.library.opcheck(torch.ops.gemmaquant.int4_matmul, (x, q, s, z, 32))

    def f(x):
        return ops.int4_matmul(x, q, s, z, 32, impl="triton") + 1

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))
    x3 = x.reshape(1, 3, 64)  # leading dims go through the dispatcher
    assert torch.equal(ops.int4_matmul(x3, q, s, z, 32, impl="triton"), int4_matmul(x, q, s, z, 32)[None])


def test_use_block_under_compile_recompiles():
    """Dynamo guards on the `ops.use` state: switching it recompiles instead of reusing a stale graph."""
    fmt, p, (x, q, s, z) = _problem(2, 32, 64, 32, True, torch.float16)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(any("gemmaquant" in str(n.target) for n in gm.graph.nodes))
        return gm

    compiled = torch.compile(lambda x: ops.int4_matmul(x, q, s, z, 32), backend=backend)
    with ops.use("triton"):
        a = compiled(x)
    with ops.use("reference"):
        b = compiled(x)
    assert graphs == [True, False]  # the custom op, then the traced reference
    assert torch.equal(a, int4_matmul(x, q, s, z, 32)) and torch.equal(b, int4_matmul_ref(x, q, s, z, 32))
