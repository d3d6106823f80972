"""Formats: exact round trips, the re-quantize fixed point, GGUF bytes against the gguf package, bad input."""

import gguf
import numpy as np
import pytest
import torch

from gemmaquant.formats import FORMATS, Int4Group, Int8Channel, get_format

GGUF_NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]


def weights(N=6, K=512, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :256] = 0  # all-zero blocks
    w[1, :256] = -w[1, :256].abs()  # negative-only blocks
    w[2, 7] = 2.0  # an outlier
    return w


@pytest.mark.parametrize("name", list(FORMATS))
def test_requantizing_the_dequantized_tensor_gives_the_same_codes(name):
    fmt = get_format(name)
    for importance in (None, torch.rand(512, generator=torch.Generator().manual_seed(1))):
        p = fmt.quantize(weights(), importance=importance)
        again = fmt.quantize(fmt.dequantize(p), params=fmt.params(p))
        assert torch.equal(fmt.codes(again), fmt.codes(p))
        scale, offset, qmin, qmax = fmt.grid(fmt.params(p))
        q = fmt.codes(p)
        assert int(q.min()) >= qmin and int(q.max()) <= qmax


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_gguf_bytes_dequantize_bit_exactly_like_the_gguf_package(name):
    fmt = get_format(name)
    p = fmt.quantize(weights())
    raw = fmt.to_gguf_bytes(p)
    block, size = gguf.GGML_QUANT_SIZES[fmt.ggml_type]
    assert raw.dtype == np.uint8 and raw.shape == (6, 512 // block * size)
    assert np.array_equal(gguf.quants.dequantize(raw, fmt.ggml_type), fmt.dequantize(p).numpy())
    back = fmt.from_gguf_bytes(raw, p.shape)
    assert all(torch.equal(back.data[k], p.data[k]) for k in p.data)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_legacy_rtn_is_byte_identical_to_ggml_reference(name):
    fmt = get_format(name)
    w = weights()
    assert np.array_equal(fmt.to_gguf_bytes(fmt.quantize(w)), gguf.quants.quantize(w.numpy(), fmt.ggml_type))


def test_all_sixteen_int4_codes_and_nibble_layout():
    fmt = Int4Group(32, symmetric=False, scale_dtype=torch.float32)
    w = torch.arange(32, dtype=torch.float32).repeat(2, 1) % 16  # codes 0..15 twice
    p = fmt.quantize(w)
    assert torch.equal(fmt.codes(p), w.to(torch.int32))
    assert p.data["qdata"].shape == (2, 16)
    assert int(p.data["qdata"][0, 0]) == (0 | (1 << 4))  # k = 0 low nibble, k = 1 high nibble
    assert torch.equal(fmt.dequantize(p), w)


def test_int4_symmetric_is_q4_0_with_the_same_scale():
    w = weights(K=256)
    p = Int4Group(32).quantize(w)  # bf16 scales, codes in [-7, 7]
    q40 = get_format("q4_0")
    repacked = q40.pack(Int4Group(32).codes(p) + 8, {"d": p.data["scale"].float().to(torch.float16)})
    assert torch.equal(q40.dequantize(repacked), Int4Group(32).dequantize(p))


def test_int8_channel():
    fmt = Int8Channel()
    p = fmt.quantize(weights())
    assert p.data["qdata"].dtype == torch.int8 and p.data["scale"].shape == (6,)
    assert int(fmt.codes(p).abs().max()) <= 127


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_rejected(bad):
    w = weights()
    w[3, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_format("q4_k").quantize(w)


def test_shape_that_does_not_fit_the_block():
    with pytest.raises(ValueError, match="256"):
        get_format("q4_k").quantize(torch.randn(2, 704))
    with pytest.raises(ValueError, match="multiple"):
        get_format("int4_g128_sym").quantize(torch.randn(2, 96))


def test_unknown_format_lists_valid_names():
    with pytest.raises(KeyError, match="q4_k"):
        get_format("q3_xs")
