"""GGUF block types against the `gguf` package (no llama.cpp needed): bytes dequantize bit for bit like
gguf.quants.dequantize, parse back to the same Packed, legacy RTN is byte-identical to gguf.quants.quantize, every
code value survives the byte layout; and the float32 helpers the ports rely on behave as C does."""

import gguf
import numpy as np
import pytest
import torch

from gemmaquant.formats import get_format
from gemmaquant.formats.ggml_ref import ROUND_SAFE, nearest_int, round_codes_, roundf, rowsum_, seqsum, sqrtf

torch.set_num_threads(1)
GGUF_NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "q3_k", "q2_k"]


def weights(N=6, K=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[0, :256] = 0
    w[1, :256] = -w[1, :256].abs()
    w[2, 7] = 2.0
    w[3, :256] = 1e-7 * torch.randn(256, generator=g)  # fp16 d in the subnormal range
    w[4, 32:64] = -1.5  # a constant block
    return w


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)  # compare bits: -0.0 != 0.0


@pytest.mark.parametrize("importance", [False, True])
@pytest.mark.parametrize("name", GGUF_NAMES)
def test_bytes_dequantize_bit_exactly_like_the_gguf_package(name, importance):
    fmt = get_format(name)
    w = weights()
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) if importance else None
    p = fmt.quantize(w, importance=imp)
    raw = fmt.to_gguf_bytes(p)
    block, size = gguf.GGML_QUANT_SIZES[fmt.ggml_type]
    assert raw.dtype == np.uint8 and raw.shape == (6, 512 // block * size)
    assert np.array_equal(bits(gguf.quants.dequantize(raw, fmt.ggml_type)), bits(fmt.dequantize(p).numpy()))
    back = fmt.from_gguf_bytes(raw, p.shape)
    assert back.data.keys() == p.data.keys()
    for k in p.data:
        assert back.data[k].dtype == p.data[k].dtype and torch.equal(back.data[k], p.data[k]), k


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_legacy_rtn_is_byte_identical_to_ggml_reference(name):
    fmt = get_format(name)
    for seed in range(3):
        w = weights(seed=seed)
        assert np.array_equal(fmt.to_gguf_bytes(fmt.quantize(w)), gguf.quants.quantize(w.numpy(), fmt.ggml_type))


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_every_code_value_survives_the_byte_layout(name):
    """Codes 0..qmax (every bit of every nibble / high-bit plane) at every position, random block parameters."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(3)
    params = fmt.fit(torch.randn(4, 512, generator=g))
    _, _, qmin, qmax = fmt.grid(params)
    codes = (torch.arange(4 * 512).view(4, 512) * 7 + torch.arange(4)[:, None]) % (qmax - qmin + 1) + qmin
    p = fmt.pack(codes.int(), params)
    back = fmt.from_gguf_bytes(fmt.to_gguf_bytes(p), p.shape)
    assert torch.equal(fmt.codes(back), codes.int())
    assert np.array_equal(bits(gguf.quants.dequantize(fmt.to_gguf_bytes(p), fmt.ggml_type)),
                          bits(fmt.dequantize(p).numpy()))


@pytest.mark.parametrize("name", ["q4_k", "q5_k"])
def test_kquant_sub_block_scales_and_mins_survive_the_12_byte_packing(name):
    fmt = get_format(name)
    params = fmt.fit(torch.randn(2, 512))
    params["sc"] = torch.arange(32, dtype=torch.uint8).view(2, 2, 8) * 2  # 0..62: every bit of the 6-bit fields
    params["mn"] = 63 - params["sc"]
    p = fmt.pack(torch.zeros(2, 512, dtype=torch.int32), params)
    back = fmt.from_gguf_bytes(fmt.to_gguf_bytes(p), p.shape)
    assert torch.equal(back.data["sc"], params["sc"]) and torch.equal(back.data["mn"], params["mn"])


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
def test_kquant_encode_is_the_reference_quantizers_last_pass(name):
    """llama.cpp's ref quantizer ends by rounding every weight on the stored grid: encode(w, fit(w)) gives the same
    codes (on random data no sub-block scale rounds to 0, where the search's codes are kept instead)."""
    fmt = get_format(name)
    w = torch.randn(8, 1024, generator=torch.Generator().manual_seed(4))
    params = fmt.fit(w)
    assert torch.equal(fmt.encode(w, params), fmt.codes(fmt.quantize(w)))


def test_sub_block_whose_scale_rounds_to_zero_keeps_the_search_codes():
    fmt = get_format("q4_k")
    w = torch.randn(1, 256, generator=torch.Generator().manual_seed(5)) * 1e-4
    w[0, :32] *= 1e5  # one sub-block 10^5 larger: the other sub-scales round to 0 (6 bits against the max)
    p = fmt.quantize(w)
    s, _, _, _ = fmt.grid(fmt.params(p))
    assert bool((s[0, 1:] == 0).all())
    again = fmt.quantize(fmt.dequantize(p), params=fmt.params(p))
    assert torch.equal(fmt.dequantize(again), fmt.dequantize(p))  # any code decodes alike there


def test_q8_0_ignores_importance_as_llamacpp_does():
    fmt = get_format("q8_0")
    w = weights()
    assert torch.equal(fmt.codes(fmt.quantize(w, importance=torch.rand(512))), fmt.codes(fmt.quantize(w)))


# ---- the float32 helpers ----

def test_nearest_int_is_ggml_magic_number_rounding():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, 3.7, -3.7, 4194303.0], dtype=torch.float32)
    assert nearest_int(x).tolist() == [0, 2, 2, 0, -2, 0, 4, -4, 4194303]  # half to even
    big = torch.tensor([8388608.0, -1e9], dtype=torch.float32)  # beyond 2^22 C returns mantissa bits: kept as is
    magic = (big.numpy() + np.float32(12582912.0)).view(np.int32)
    assert nearest_int(big).tolist() == ((magic & 0x7FFFFF) - 0x400000).tolist()


def test_roundf_is_half_away_from_zero_for_every_float():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5], dtype=torch.float32)
    assert roundf(x).tolist() == [1, 2, 3, -1, -3, 0, 0, 127]


def test_seqsum_adds_in_index_order():
    t = torch.tensor([[1e8, 0.0], [1.0, 1.0], [-1e8, 2.0], [1.0, 3.0]], dtype=torch.float32)  # blocks are columns
    assert seqsum(t).tolist() == [1.0, 6.0]  # ((1e8 + 1) - 1e8) + 1 in fp32: the first 1 is lost
    a, b = seqsum(t, 2 * t)
    assert a.tolist() == [1.0, 6.0] and b.tolist() == [2.0, 12.0]


def test_round_codes_is_nearest_int_then_clamp():
    """The one-pass torch.round where the bound allows it, ggml's magic number (garbage beyond 2^22) where not."""
    g = torch.Generator().manual_seed(7)
    t = torch.cat([torch.randn(4, 256, generator=g) * 20, (torch.arange(256) / 2.0 - 64).repeat(4, 1)])  # ties
    for lo, hi in ((0, 15), (-32, 31)):
        want = nearest_int(t).clamp(lo, hi).float()
        got = round_codes_(t.clone(), t.abs().amax(0), lo, hi)
        assert torch.equal(got, want)
    big = torch.tensor([[5e6, -7e6, 4194303.5, 3.0]])  # beyond the safe bound: the magic-number path
    bound = big.abs().amax(0)
    assert not bool((bound < ROUND_SAFE).all())
    assert torch.equal(round_codes_(big.clone(), bound, -64, 63), nearest_int(big).clamp(-64, 63).float())


def test_rowsum_adds_in_index_order_like_a_loop():
    t = torch.tensor([[1e8, 0.0], [1.0, 1.0], [-1e8, 2.0], [1.0, 3.0]], dtype=torch.float32)
    stacked = torch.stack([t, 2 * t, -t], 1)  # [n, 3, B]: three sums at once
    acc = rowsum_(torch.full((3, 2), 5.0), stacked)  # the accumulator starts from +0 whatever it held
    assert acc.tolist() == [[1.0, 6.0], [2.0, 12.0], [-1.0, -6.0]]
    x = torch.randn(32, 3, 1000, generator=torch.Generator().manual_seed(8)) * torch.logspace(-8, 8, 1000)
    loop = torch.zeros(3, 1000)
    for row in x:
        loop = loop + row
    assert torch.equal(rowsum_(torch.empty(3, 1000), x), loop)


def test_sqrtf_is_correctly_rounded():
    x = torch.rand(1 << 16, generator=torch.Generator().manual_seed(6)) * 1e-3
    assert np.array_equal(bits(sqrtf(x).numpy()), bits(np.sqrt(x.numpy())))
