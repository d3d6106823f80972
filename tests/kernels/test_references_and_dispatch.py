"""The torch references (which define what the kernels compute) checked against independent formulations, and the
dispatcher in gemmaquant.ops: per-call choice, `use(...)`, `impl=`, errors. No Triton kernel is launched here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemmaquant import ops
from gemmaquant.formats import Int4Group, Int8Channel
from gemmaquant.kernels import int4_matmul as int4_mod
from gemmaquant.kernels import int8_matmul as int8_mod
from gemmaquant.kernels import moe_grouped_gemm as moe_mod
from gemmaquant.kernels import swa_attention as attn_mod


class _FakeCuda:
    is_cuda = True


def test_resolve_per_call():
    cpu, cuda = torch.zeros(1), _FakeCuda()
    assert ops.resolve(cpu) == "reference" and ops.resolve(cuda) == "triton"
    assert ops.resolve(cuda, unsupported="head_dim 48") == "reference"  # automatic: fall back
    with ops.use("reference"):
        assert ops.resolve(cuda) == "reference"
        with ops.use("triton"):
            assert ops.resolve(cpu) == "triton"
            with pytest.raises(ValueError, match="head_dim 48"):
                ops.resolve(cuda, unsupported="head_dim 48")  # forced: an error, not a silent fallback
        assert ops.resolve(cuda) == "reference"  # restored on exit
        assert ops.resolve(cpu, impl="triton") == "triton"  # the argument beats the block
    assert ops.resolve(cpu) == "reference"
    with pytest.raises(ValueError):
        ops.resolve(cpu, impl="cuda")
    with pytest.raises(ValueError):
        with ops.use("fast"):
            pass


@pytest.fixture
def no_kernels(monkeypatch):
    """Any kernel launch fails: the CPU default must go to the references."""

    def boom(*a, **k):
        raise AssertionError("a Triton kernel was called")

    for mod, name in ((int4_mod, "int4_matmul"), (int8_mod, "int8_matmul"), (moe_mod, "moe_experts"),
                      (attn_mod, "swa_attention"), (attn_mod, "swa_decode")):
        monkeypatch.setattr(mod, name, boom)


def test_cpu_calls_use_the_references(no_kernels):
    g = torch.Generator().manual_seed(0)
    fmt = Int4Group(32, False)
    p = fmt.quantize(torch.randn(24, 64, generator=g))
    x = torch.randn(2, 3, 64, generator=g)  # leading dims
    y = ops.int4_matmul(x, p.data["qdata"], p.data["scale"], p.data["zero"], 32)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ fmt.dequantize(p).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.linear(x, p), y, rtol=0, atol=0)
    p8 = Int8Channel().quantize(torch.randn(24, 64, generator=g))
    torch.testing.assert_close(ops.linear(x, p8), x @ Int8Channel().dequantize(p8).T, rtol=1e-5, atol=1e-5)
    q = torch.randn(1, 2, 5, 16, generator=g)
    assert ops.attention(q, q, q, window=3).shape == q.shape
    assert ops.attention(q, q, q, cache_seqlens=torch.tensor([5])).shape == q.shape
    with pytest.raises(AssertionError, match="Triton kernel was called"):
        ops.attention(q, q, q, impl="triton")


def test_forced_triton_rejects_unsupported_shapes():
    q = torch.randn(1, 2, 4, 48)  # head_dim 48
    with pytest.raises(ValueError, match="head_dim 48"):
        ops.attention(q, q, q, impl="triton")
    with pytest.raises(ValueError, match="exclude"):
        ops.attention(q, q, q, q_offset=0, cache_seqlens=torch.tensor([4]))


def test_int4_reference_is_the_format():
    for group, sym in ((32, True), (64, False), (128, False)):
        fmt = Int4Group(group, sym)
        p = fmt.quantize(torch.randn(16, 256))
        w = int4_mod.int4_dequantize_ref(p.data["qdata"], p.data["scale"], p.data.get("zero"), group)
        assert torch.equal(w, fmt.dequantize(p))


def test_per_token_quantization_semantics():
    x = torch.tensor([[127.0, 2.5, -2.5, 0.49, -126.5], [0, 0, 0, 0, 0], [-1.0, 0.5, 0.25, 0, 0]])
    xq, sx = int8_mod.quantize_per_token_ref(x)
    assert sx.tolist() == [1.0, 0.0, pytest.approx(1 / 127)]
    assert xq[0].tolist() == [127, 3, -3, 0, -127]  # ties away from zero; -126.5 -> -127
    assert xq[1].tolist() == [0] * 5 and xq[2, 0] == -127
    w = torch.randint(-127, 128, (6, 5), dtype=torch.int8)
    s = torch.rand(6)
    y = int8_mod.int8_matmul_ref(x, w, s, act_quant=True)
    exact = (xq.double() * sx.double()[:, None]) @ (w.double() * s.double()[:, None]).T
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-6)


def test_moe_reference_follows_the_spec():
    """moe_experts_ref (fp32) against GEMMA4_SPEC §2.6 written out per token, with softmax -> top-k -> renormalise
    -> per-expert scale routing; per_expert_scale folded or separate gives the same."""
    g = torch.Generator().manual_seed(1)
    T, H, Ie, E, k = 6, 16, 8, 5, 2
    x = torch.randn(T, H, generator=g)
    gu, dn = torch.randn(E, 2 * Ie, H, generator=g), torch.randn(E, H, Ie, generator=g)
    probs = torch.softmax(torch.randn(T, E, generator=g), -1)
    w, idx = probs.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    pes = torch.rand(E, generator=g) + 0.5
    y = moe_mod.moe_experts_ref(x, idx, w, gu, dn, per_expert_scale=pes)
    for t in range(T):
        expect = torch.zeros(H)
        for j in range(k):
            e = idx[t, j]
            gate_up = gu[e] @ x[t]
            expect += w[t, j] * pes[e] * (dn[e] @ (F.gelu(gate_up[:Ie], approximate="tanh") * gate_up[Ie:]))
        torch.testing.assert_close(y[t], expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe_mod.moe_experts_ref(x, idx, w * pes[idx], gu, dn), y, rtol=1e-6, atol=1e-6)
    assert torch.equal(ops.moe_experts(x, idx, w, gu, dn, per_expert_scale=pes), y)


def test_attention_reference_against_sdpa_and_the_window_edge():
    """fp32 reference = SDPA with a mask built another way (tril); the key W-1 back is visible, W back is not."""
    g = torch.Generator().manual_seed(2)
    B, H, Hkv, L, S, D, W = 2, 4, 2, 7, 12, 16, 4
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, L), (Hkv, S), (Hkv, S)))
    ones = torch.ones(L, S, dtype=torch.bool)
    mask = ones.tril(S - L) & ~ones.tril(S - L - W)  # key j visible iff i + S-L - W < j <= i + S-L
    expect = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask,
                                            scale=0.3)
    torch.testing.assert_close(attn_mod.swa_attention_ref(q, k, v, W, 0.3), expect, rtol=1e-5, atol=1e-5)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=ones.tril(S - L), scale=0.3)
    torch.testing.assert_close(attn_mod.swa_attention_ref(q, k, v, None, 0.3), full, rtol=1e-5, atol=1e-5)
    # the edge: with v = one-hot of the key position, the output row is the attention distribution itself
    v1 = torch.eye(S)[None, None].expand(1, 1, S, S).contiguous()
    pr = attn_mod.swa_attention_ref(torch.zeros(1, 1, S, S), torch.zeros(1, 1, S, S), v1, W, 1.0)[0, 0]  # uniform
    assert (pr[9, 9 - W + 1 : 10] > 0).all() and pr[9, 9 - W] == 0 and pr[9, 10:].sum() == 0


def test_ring_decode_reference_equals_prefill_reference():
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, n, D, W, L = 1, 4, 2, 29, 8, 6, 2
    q = torch.randn(B, H, L, D, generator=g)
    k, v = torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    C = W + L - 1  # the smallest ring that still holds every visible key of the L queries
    kc, vc = torch.zeros(B, Hkv, C, D), torch.zeros(B, Hkv, C, D)
    for p in range(n):
        kc[:, :, p % C], vc[:, :, p % C] = k[:, :, p], v[:, :, p]
    dec = attn_mod.swa_decode_ref(q, kc, vc, torch.tensor([n]), W, 0.5)
    torch.testing.assert_close(dec, attn_mod.swa_attention_ref(q, k, v, W, 0.5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.attention(q, kc, vc, window=W, scale=0.5, cache_seqlens=torch.tensor([n])), dec)


def test_benchmark_skips_cleanly_without_a_gpu():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_kernels.py"), "--only", "int4"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU" in r.stdout and "skipped" in r.stdout


@pytest.mark.interpreter
def test_benchmark_smoke_run(tmp_path):
    """--smoke: every benchmark case on tiny shapes in the interpreter, JSON and Markdown written with the device."""
    import json

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(root / "benchmarks" / "bench_kernels.py"), "--smoke", "--batches", "2",
           "--out", str(tmp_path / "k"), "--peak-bf16-tflops", "1", "--peak-int8-tops", "2", "--peak-hbm-gbs", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "k.json").read_text())
    assert "interpreter" in data["meta"]["device"]
    assert {row["kernel"] for row in data["results"]} == {"int4", "int8", "moe", "attn", "decode"}
    for row in data["results"]:
        assert row["ms"] > 0 and row["frac_roofline"] > 0, row
        assert any(k.startswith("speedup_vs_") for k in row), row
        assert row["rel_err"] < 2e-2, row  # checked against the reference, and bf16-close to it (W8A8: equal)
    assert "# Triton kernel benchmarks, cpu" in (tmp_path / "k.md").read_text()
