"""MoE grouped GEMM against its torch reference: float / int8 / int4 experts, experts with no tokens (which must not
be read at all), one token (decode) and many, per-expert scale passed or folded, the 26B-A4B routing shape
(E = 128, top-8, expert width 704)."""

import pytest
import torch

from gemmaquant import ops
from gemmaquant.kernels.moe_grouped_gemm import expert_weight_ref, moe_align, moe_experts, moe_experts_ref
from tests.kernels.parity import DEVICE, assert_parity


def _experts(w: torch.Tensor, fmt: str, dtype, g: torch.Generator) -> dict:
    """An expert stack [E, N, K] in the kernel's layout: float weights as given, else random codes with scales of
    w's size (the packed layouts are the formats' own: see test_int4_matmul / test_int8_matmul)."""
    if fmt == "float":
        return {"w": w.to(dtype), "scale": None, "zero": None}
    E, N, K = w.shape
    amp = w.abs().mean().item()
    if fmt == "int8":
        return {"w": torch.randint(-127, 128, (E, N, K), generator=g, dtype=torch.int8),
                "scale": (torch.rand(E, N, generator=g) * amp / 64).to(torch.bfloat16), "zero": None}
    group, symmetric = int(fmt.split("_g")[1]), fmt.startswith("int4s")
    return {"w": torch.randint(0, 256, (E, N, K // 2), generator=g, dtype=torch.uint8),
            "scale": (torch.rand(E, N, K // group, generator=g) * amp / 4).to(torch.bfloat16),
            "zero": None if symmetric else torch.randint(0, 16, (E, N, K // group), generator=g, dtype=torch.uint8)}


def _problem(T, H, Ie, E, k, fmt, dtype, used=None, seed=0):
    """Random routing over the experts in `used` (default: all but the last two, which get no tokens)."""
    g = torch.Generator().manual_seed(seed + T * 100 + E + k)
    used = list(range(E - 2)) if used is None else used
    ids = torch.stack([torch.tensor(used)[torch.randperm(len(used), generator=g)[:k]] for _ in range(T)])
    tw = torch.rand(T, k, generator=g) + 0.1
    tw = tw / tw.sum(-1, keepdim=True)
    pes = torch.rand(E, generator=g) + 0.5
    gu = _experts(torch.randn(E, 2 * Ie, H, generator=g) / H ** 0.5, fmt, dtype, g)
    dn = _experts(torch.randn(E, H, Ie, generator=g) / Ie ** 0.5, fmt, dtype, g)
    x = torch.randn(T, H, generator=g).to(dtype)
    return x, ids, tw, pes, gu, dn


def _kwargs(gu, dn, group):
    return dict(gate_up_scale=gu["scale"], down_scale=dn["scale"], gate_up_zero=gu["zero"], down_zero=dn["zero"],
                group_size=group)


def _to(d, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def _exact(x, ids, tw, pes, gu, dn, group):
    """fp64, one (token, slot) at a time, straight from GEMMA4_SPEC §2.6."""
    wg = expert_weight_ref(gu["w"], gu["scale"], gu["zero"], group).double()
    wd = expert_weight_ref(dn["w"], dn["scale"], dn["zero"], group).double()
    y = torch.zeros(x.shape, dtype=torch.float64)
    Ie = wd.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            gate_up = wg[e] @ x[t].double()
            h = torch.nn.functional.gelu(gate_up[:Ie], approximate="tanh") * gate_up[Ie:]
            y[t] += tw[t, j].double() * pes[e].double() * (wd[e] @ h)
    return y


def _run(x, ids, tw, pes, gu, dn, group, config=None, case=""):
    dev = [t.to(DEVICE) for t in (x, ids, tw, pes)]
    g, d = _to(gu, DEVICE), _to(dn, DEVICE)
    out = moe_experts(*dev[:3], g["w"], d["w"], **_kwargs(g, d, group), per_expert_scale=dev[3], config=config)
    ref = moe_experts_ref(*dev[:3], g["w"], d["w"], **_kwargs(g, d, group), per_expert_scale=dev[3])
    return assert_parity(out.cpu(), ref.cpu(), _exact(x, ids, tw, pes, gu, dn, group), case), out


FORMATS = [("float", 0), ("int8", 0), ("int4s_g32", 32), ("int4a_g64", 64)]


@pytest.mark.interpreter
@pytest.mark.parametrize("T,k", [(1, 2), (7, 3), (33, 2)])
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_matches_reference(T, k, fmt, group, dtype):
    x, ids, tw, pes, gu, dn = _problem(T, 64, 128, 8, k, fmt, dtype)
    _run(x, ids, tw, pes, gu, dn, group, case=f"moe {fmt} T={T} k={k} {dtype}")


@pytest.mark.interpreter
@pytest.mark.parametrize("T,decode", [(1, False), (7, False), (17, True)])
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_moe_both_paths_at_every_size(T, decode, fmt, group):
    """moe_experts picks the per-(token, expert) decode kernels for T <= 16 and the grouped GEMM above: each path
    forced on the sizes the other one gets by default."""
    x, ids, tw, pes, gu, dn = _problem(T, 64, 128, 8, 2, fmt, torch.bfloat16)
    _run(x, ids, tw, pes, gu, dn, group, config=dict(decode=decode), case=f"moe {fmt} T={T} decode={decode}")


@pytest.mark.interpreter
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_moe_empty_experts_are_never_read(fmt, group, decode):
    """Poison the weights of the experts that receive no tokens: any read would turn the output into NaN, so the
    kernel must give bit for bit what it gives with clean weights."""
    x, ids, tw, pes, gu, dn = _problem(9, 64, 64, 8, 2, fmt, torch.bfloat16, used=[1, 4, 6])
    dev = [t.to(DEVICE) for t in (x, ids, tw, pes)]

    def run(gu, dn):
        g, d = _to(gu, DEVICE), _to(dn, DEVICE)
        return moe_experts(*dev[:3], g["w"], d["w"], **_kwargs(g, d, group), per_expert_scale=dev[3],
                           config=dict(decode=decode))

    clean = run(gu, dn)
    for stack in (gu, dn):
        for e in (0, 2, 3, 5, 7):
            stack["w" if stack["scale"] is None else "scale"][e] = float("nan")
    poisoned = run(gu, dn)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


@pytest.mark.interpreter
@pytest.mark.parametrize("fmt,group", [("float", 0), ("int4a_g64", 64)])
def test_moe_gemma4_26b_routing_shape(fmt, group):
    """E = 128 experts, top-8, expert width 704 (H kept small for the interpreter), two tokens."""
    x, ids, tw, pes, gu, dn = _problem(2, 64, 704, 128, 8, fmt, torch.bfloat16, used=list(range(0, 128, 3)))
    _run(x, ids, tw, pes, gu, dn, group, case=f"moe E=128 top-8 Ie=704 {fmt}")


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [dict(block_m=32), dict(block_m=16, block_n=32, block_k=32),
                                    dict(decode=True, block_n=16, block_k=32)])
def test_moe_launch_configs(config):
    T = 5 if config.get("decode") else 20  # the interpreter runs the decode path's T * k * N-tiles programs in turn
    x, ids, tw, pes, gu, dn = _problem(T, 64, 128, 8, 2, "int4a_g64", torch.float16)
    _run(x, ids, tw, pes, gu, dn, 64, config=config, case=f"moe config {config}")


@pytest.mark.interpreter
def test_moe_per_expert_scale_folded_or_separate():
    x, ids, tw, pes, gu, dn = _problem(5, 64, 32, 8, 2, "int8", torch.bfloat16)
    x, ids, tw, pes = (t.to(DEVICE) for t in (x, ids, tw, pes))
    g, d = _to(gu, DEVICE), _to(dn, DEVICE)
    for decode in (True, False):
        separate = moe_experts(x, ids, tw, g["w"], d["w"], **_kwargs(g, d, 0), per_expert_scale=pes,
                               config=dict(decode=decode))
        folded = moe_experts(x, ids, tw * pes[ids], g["w"], d["w"], **_kwargs(g, d, 0), config=dict(decode=decode))
        assert torch.equal(separate, folded)  # the same fp32 products either way


@pytest.mark.interpreter
def test_moe_custom_op_and_compile():
    x, ids, tw, pes, gu, dn = _problem(3, 64, 32, 8, 2, "int4s_g32", torch.bfloat16)
    x, ids, tw, pes = (t.to(DEVICE) for t in (x, ids, tw, pes))
    g, d = _to(gu, DEVICE), _to(dn, DEVICE)
    args = (x, ids, tw, g["w"], d["w"], g["scale"], d["scale"], g["zero"], d["zero"], 32, pes)
    torch.library.opcheck(torch.ops.gemmaquant.moe_experts, args)

    def f(x):
        return ops.moe_experts(x, ids, tw, g["w"], d["w"], **_kwargs(g, d, 32), per_expert_scale=pes, impl="triton")

    assert torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x))


def test_moe_align_layout():
    """Every assignment appears exactly once, inside a block of its own expert; empty experts own no block."""
    g = torch.Generator().manual_seed(0)
    E, bm = 16, 8
    ids = torch.randint(0, 10, (13, 3), generator=g)  # experts 10..15 get nothing
    sorted_ids, block_expert = moe_align(ids, E, bm)
    A = ids.numel()
    flat = ids.reshape(-1)
    valid = sorted_ids < A
    assert torch.equal(torch.sort(sorted_ids[valid].long()).values, torch.arange(A))
    blocks = sorted_ids.view(-1, bm)
    for b, e in enumerate(block_expert.tolist()):
        members = blocks[b][blocks[b] < A].long()
        if e < 0:
            assert members.numel() == 0
        else:
            assert members.numel() > 0 and (flat[members] == e).all()
    used = set(block_expert[block_expert >= 0].tolist())
    assert used == set(flat.tolist())
    counts = torch.bincount(flat, minlength=E)
    assert (block_expert >= 0).sum().item() == sum((c + bm - 1) // bm for c in counts.tolist())
