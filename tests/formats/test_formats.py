"""Every format: the grid contract (dequantize = scale * v(q) + offset), the re-quantize fixed point, zero blocks,
bad input; the int formats' packed layout (all 16 int4 codes, nibble order) and their lossless GGUF mappings."""

import numpy as np
import pytest
import torch

from gemmaquant.formats import FORMATS, Int4Group, Int8Channel, IntGroup, get_format

torch.set_num_threads(1)
K = 512


def weights(N=6, K=K, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :256] = 0  # all-zero blocks (and a zero K-quant super-block)
    w[1, :256] = -w[1, :256].abs()  # negative-only blocks
    w[2, 7] = 2.0  # an outlier
    w[3, 64:128] = 0.125  # constant blocks
    return w


def expanded_grid(fmt, params, K):
    scale, offset, qmin, qmax = fmt.grid(params)
    return fmt.expand(scale, K), fmt.expand(offset, K), qmin, qmax


@pytest.mark.parametrize("importance", [None, "per_channel", "per_element"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_requantizing_the_dequantized_tensor_gives_the_same_codes(name, importance):
    fmt = get_format(name)
    w = weights()
    g = torch.Generator().manual_seed(1)
    imp = {None: None, "per_channel": torch.rand(K, generator=g),
           "per_element": torch.rand(6, K, generator=g)}[importance]
    p = fmt.quantize(w, importance=imp)
    s, _, qmin, qmax = expanded_grid(fmt, fmt.params(p), K)
    q = fmt.codes(p)
    assert q.dtype == torch.int32 and q.shape == w.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    again = fmt.quantize(fmt.dequantize(p), params=fmt.params(p))
    live = s != 0  # where the scale is 0 every code decodes alike; encode gives the zero point there
    diff = int((fmt.codes(again) != q)[live].sum())
    assert diff == 0, f"{name}: {diff} codes change on re-quantization"
    assert torch.equal(fmt.dequantize(again), fmt.dequantize(p))


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_is_the_grid(name):
    fmt = get_format(name)
    w = weights(seed=2)
    p = fmt.quantize(w)
    s, o, _, _ = expanded_grid(fmt, fmt.params(p), K)
    deq = fmt.dequantize(p)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    assert torch.equal(deq, s * fmt.values(fmt.codes(p)) + o)


@pytest.mark.parametrize("name", list(FORMATS))
def test_encode_of_a_column_slice(name):
    """GPTQ encodes one column at a time: encode(w[:, a:b], params, col_start=a) is a slice of encode(w)."""
    fmt = get_format(name)
    w = weights(seed=3)
    params = fmt.fit(w)
    full = fmt.encode(w, params)
    for a, b in [(0, 1), (37, 38), (100, 300), (511, 512)]:
        assert torch.equal(fmt.encode(w[:, a:b], params, col_start=a), full[:, a:b])


@pytest.mark.parametrize("name", list(FORMATS))
def test_all_zero_weights(name):
    fmt = get_format(name)
    p = fmt.quantize(torch.zeros(3, K))
    assert torch.equal(fmt.dequantize(p), torch.zeros(3, K))
    assert bool((fmt.codes(p) == fmt.zero_code).all()), f"{name}: zero blocks should hold the zero point"
    assert torch.equal(fmt.encode(torch.zeros(3, K), fmt.params(p)), fmt.codes(p))


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_rejected(name, bad):
    w = weights()
    w[3, 5] = bad
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=rf"contains NaN or Inf \(.*1 {kind}.*first at \[3, 5\]"):
        get_format(name).quantize(w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_format(name).fit(w)


@pytest.mark.parametrize("name", [n for n in FORMATS if n != "int8"])
def test_rows_that_do_not_fill_the_block_rejected(name):
    fmt = get_format(name)
    with pytest.raises(ValueError, match=rf"K = {fmt.row_block + 16} inputs per row is not a multiple of the "
                                         rf"{fmt.row_block}-element block"):
        fmt.quantize(torch.randn(2, fmt.row_block + 16))


def test_bad_shapes_and_importance_rejected():
    fmt = get_format("int4_g32_sym")
    with pytest.raises(ValueError, match="2-D"):
        fmt.quantize(torch.randn(64))
    with pytest.raises(ValueError, match=r"importance must be \[K\] = \[64\]"):
        fmt.quantize(torch.randn(2, 64), importance=torch.ones(32))
    with pytest.raises(ValueError, match="non-negative"):
        get_format("q4_k").quantize(torch.randn(2, 256), importance=-torch.ones(256))


def test_unknown_format_lists_valid_names():
    with pytest.raises(KeyError, match="q4_k"):
        get_format("q3_xs")
    assert get_format("Q4_K") is FORMATS["q4_k"]
    assert all(FORMATS[n].name == n for n in FORMATS)


# ---- int formats: layout ----

@pytest.mark.parametrize("symmetric", [True, False])
def test_all_sixteen_int4_codes_and_nibble_layout(symmetric):
    fmt = Int4Group(32, symmetric=symmetric, scale_dtype=torch.float32)
    u = torch.arange(32).repeat(2, 1) % 16  # every unsigned code, twice a row
    params = {"scale": torch.full((2, 1), 0.5)}
    if not symmetric:
        params["zero"] = torch.full((2, 1), 3, dtype=torch.uint8)
    zero = 8 if symmetric else 0  # grid codes: u - 8 (symmetric) or u (offset -scale * zero)
    p = fmt.pack(u - zero, params)
    assert p.data["qdata"].dtype == torch.uint8 and p.data["qdata"].shape == (2, 16)
    assert p.data["qdata"][0].tolist() == [(2 * j) | ((2 * j + 1) << 4) for j in range(8)] * 2  # k=2j low nibble
    assert torch.equal(fmt.unsigned(p), u.int())
    assert torch.equal(fmt.codes(p), (u - zero).int())
    expected = 0.5 * (u - (8 if symmetric else 3)).float()
    assert torch.equal(fmt.dequantize(p), expected)


def test_int4_asymmetric_fit_uses_all_sixteen_codes():
    fmt = Int4Group(32, symmetric=False, scale_dtype=torch.float32)
    w = (torch.arange(32, dtype=torch.float32).repeat(2, 1) % 16) - 5  # -5 .. 10
    p = fmt.quantize(w)
    assert torch.equal(fmt.unsigned(p), (w + 5).int()) and p.data["zero"].tolist() == [[5], [5]]
    assert torch.equal(fmt.dequantize(p), w)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_group_bit_widths(bits, symmetric):
    fmt = IntGroup(bits, 32, symmetric)
    p = fmt.quantize(weights())
    u = fmt.unsigned(p)
    assert p.data["qdata"].shape == (6, K // 2 if bits == 4 else K)
    assert p.data["scale"].dtype == torch.bfloat16 and p.data["scale"].shape == (6, K // 32)
    assert ("zero" in p.data) == (not symmetric)
    lo = 1 if symmetric else 0  # the symmetric grid leaves the code -2^(b-1) unused
    assert int(u.min()) >= lo and int(u.max()) <= (1 << bits) - 1
    scale, offset, qmin, qmax = fmt.grid(fmt.params(p))
    assert (qmin, qmax) == ((-(1 << bits - 1) + 1, (1 << bits - 1) - 1) if symmetric else (0, (1 << bits) - 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_dtypes(dtype):
    for fmt in (Int4Group(64, scale_dtype=dtype), Int4Group(128, False, dtype), Int8Channel(dtype)):
        p = fmt.quantize(weights())
        assert p.data["scale"].dtype == dtype
        assert torch.equal(fmt.quantize(fmt.dequantize(p), params=fmt.params(p)).data["qdata"], p.data["qdata"])
    with pytest.raises(ValueError, match="scale_dtype"):
        IntGroup(4, 32, True, torch.int8)


def test_int8_channel_layout():
    fmt = Int8Channel()
    w = weights()
    p = fmt.quantize(w)
    assert p.data["qdata"].dtype == torch.int8 and p.data["qdata"].shape == w.shape
    assert p.data["scale"].dtype == torch.bfloat16 and p.data["scale"].shape == (6,)
    assert int(fmt.codes(p).abs().max()) == 127  # every nonzero row reaches its absmax code
    assert torch.equal(fmt.dequantize(p), p.data["scale"].float()[:, None] * p.data["qdata"].float())


@pytest.mark.parametrize("name", ["int4_g32_sym", "int3_g32_sym", "int8", "q4_0", "q4_1", "q4_k", "q6_k", "iq4_nl",
                                  "iq4_xs"])
def test_importance_lowers_the_weighted_error(name):
    """Importance (imatrix) choices on a row whose columns matter very unequally; error summed over all rows."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, K, generator=g)
    imp = torch.exp(2 * torch.randn(K, generator=g))
    err = lambda p: float((imp * (w - fmt.dequantize(p)) ** 2).sum())  # noqa: E731
    assert err(fmt.quantize(w, importance=imp)) < err(fmt.quantize(w))


# ---- lossless mappings onto GGUF blocks (what export/gguf_repack relies on) ----

def test_int4_symmetric_g32_is_q4_0_with_d_equal_to_the_scale():
    fmt, q40 = Int4Group(32), get_format("q4_0")
    p = fmt.quantize(weights())
    d = p.data["scale"].to(torch.float16)  # bf16 -> fp16 is exact for scales in fp16's normal range
    assert torch.equal(d.float(), p.data["scale"].float())
    repacked = q40.pack(fmt.unsigned(p), {"d": d})  # stored q = u, zero 8
    assert torch.equal(q40.dequantize(repacked), fmt.dequantize(p))


def test_int4_asymmetric_g32_is_q4_1_up_to_fp16_rounding_of_m():
    """d = scale is exact in fp16; m = -scale * zero has up to 12 significant bits, so fp16 may round it by half
    an ulp: |error| <= 2^-11 |m| per block, and nothing else changes."""
    fmt, q41 = Int4Group(32, symmetric=False), get_format("q4_1")
    p = fmt.quantize(weights())
    s = p.data["scale"].float()
    m = -s * p.data["zero"].float()
    repacked = q41.pack(fmt.unsigned(p), {"d": s.to(torch.float16), "m": m.to(torch.float16)})
    err = (q41.dequantize(repacked) - fmt.dequantize(p)).abs().view(6, -1, 32).amax(-1)
    assert bool((err <= m.abs() * 2.0 ** -11).all()), f"max error {err.max():.3g}"


def test_int8_channel_is_q8_0_with_the_row_scale_in_every_block():
    fmt, q80 = Int8Channel(), get_format("q8_0")
    p = fmt.quantize(weights())
    d = p.data["scale"].to(torch.float16)[:, None].expand(-1, K // 32)
    repacked = q80.pack(fmt.codes(p), {"d": d})
    assert torch.equal(q80.dequantize(repacked), fmt.dequantize(p))


@pytest.mark.parametrize("name", ["int4_g32_sym", "int3_g32_sym", "int8"])
def test_importance_search_does_not_depend_on_its_slicing(name, monkeypatch):
    """search_scale runs over slices on CPU; one slice per row and a single slice give the same scales."""
    import gemmaquant.formats.base as base

    fmt = get_format(name)
    w = weights(N=40)
    imp = torch.rand(K, generator=torch.Generator().manual_seed(3)) * 4
    monkeypatch.setattr(base, "SEARCH_CHUNK", 1)
    sliced = fmt.fit(w, importance=imp)["scale"]
    monkeypatch.setattr(base, "SEARCH_CHUNK", 1 << 30)
    whole = fmt.fit(w, importance=imp)["scale"]
    assert torch.equal(sliced, whole)
    assert not torch.equal(whole, fmt.fit(w)["scale"])  # the search moved some scales


@pytest.mark.parametrize("importance", [None, "per_channel", "per_element"])
@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "q3_k",
                                  "q2_k"])
def test_llamacpp_port_does_not_depend_on_its_slicing(name, importance, monkeypatch):
    """The GGUF types' llama.cpp ports run over row slices on CPU; slices of 3 rows (the last one shorter) and a
    single slice give the same bytes."""
    import gemmaquant.formats.base as base

    fmt = get_format(name)
    w = weights(N=10)
    g = torch.Generator().manual_seed(4)
    imp = {None: None, "per_channel": torch.rand(K, generator=g) * 4,
           "per_element": torch.rand(10, K, generator=g) * 4}[importance]
    monkeypatch.setattr(base, "REFERENCE_CHUNK", 3 * K)
    sliced = fmt.quantize(w, importance=imp)
    monkeypatch.setattr(base, "REFERENCE_CHUNK", 1 << 30)
    whole = fmt.quantize(w, importance=imp)
    assert np.array_equal(fmt.to_gguf_bytes(sliced), fmt.to_gguf_bytes(whole))
