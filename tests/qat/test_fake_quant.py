"""The fake quantizer on every format: its forward value is the format's own dequantized value, bit for bit;
its gradients are the straight-through estimator for the weights and the documented ones for learnable scales."""

import pytest
import torch

from torch import nn

from gemmaquant.formats import FORMATS, IntGroup
from gemmaquant.qat import fake_quantize
from gemmaquant.qat.fake_quant import FakeQuant, grid_sensitivity


UNIFORM = [n for n, f in FORMATS.items() if f.levels is None]  # QAT's straight-through grid: v(q) = q


def weight(N=6, K=512, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    w[1, 40] = 0.9  # an outlier
    return w


def learnable(p: dict) -> tuple[dict, dict]:
    """Packed params -> (fp32 leaf tensors, requiring grad where the stored dtype is a float), stored dtypes."""
    return ({k: v.float().clone().requires_grad_(v.is_floating_point()) for k, v in p.items()},
            {k: v.dtype for k, v in p.items()})


@pytest.mark.parametrize("name", UNIFORM)
def test_forward_is_the_formats_dequantized_value_bit_for_bit(name):
    fmt = FORMATS[name]
    w = weight()
    assert torch.equal(fake_quantize(w, fmt), fmt.dequantize(fmt.quantize(w))), name
    # given (e.g. learned) block parameters: the grid they define, after rounding to the stored precision
    params, storage = learnable(fmt.params(fmt.quantize(w)))
    for k, v in params.items():
        if v.requires_grad:
            with torch.no_grad():
                v.mul_(1.013)  # off the stored grid: rounded to bf16 / fp16 in the forward pass
    stored = {k: v.detach().to(storage[k]) for k, v in params.items()}
    expect = fmt.dequantize(fmt.quantize(w, params=stored))
    assert torch.equal(fake_quantize(w, fmt, params, storage), expect), name


@pytest.mark.parametrize("name", UNIFORM)
def test_straight_through_gradient(name):
    fmt = FORMATS[name]
    w = weight().requires_grad_(True)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (fake_quantize(w, fmt) * g).sum().backward()
    scale, offset, qmin, qmax = fmt.grid(fmt.params(fmt.quantize(w.detach())))
    s, o = fmt.expand(scale.float(), w.shape[1]), fmt.expand(offset.float(), w.shape[1])
    x = (w.detach() - o) / torch.where(s == 0, 1.0, s)
    inside = ((x >= qmin - 0.5) & (x <= qmax + 0.5)) | (s == 0)
    expect = torch.where(inside, g, torch.zeros_like(g))
    err = (w.grad - expect).abs().max().item()
    assert err < 1e-5 and torch.equal(w.grad == 0, expect == 0), f"{name}: max |grad - STE| = {err:.3g}"
    assert inside.float().mean() > 0.95, f"{name}: most weights are inside the grid's range"


def test_learnable_scale_gradients_codes_and_lsq():
    fmt = IntGroup(4, 32, True)
    w = weight(N=4, K=64)
    p = fmt.quantize(w)
    q = fmt.codes(p).float()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    for mode in ("codes", "lsq"):
        params, storage = learnable(fmt.params(p))
        (fake_quantize(w, fmt, params, storage, scale_grad=mode) * g).sum().backward()
        s = fmt.expand(params["scale"].detach(), 64)
        x = w / torch.where(s == 0, 1.0, s)
        per_weight = q if mode == "codes" else torch.where(s == 0, 0.0, q - x)  # d w_hat / d scale
        expect = (g * per_weight).view(4, 2, 32).sum(-1)
        if mode == "codes":
            expect[0, 0] = 0.0  # the zero block: its weights get the identity gradient, its scale none
        assert torch.allclose(params["scale"].grad, expect, atol=1e-5), mode
    # a weight exactly on its grid point gives LSQ no gradient at all, which is why "codes" is the default
    params, storage = learnable(fmt.params(p))
    (fake_quantize(fmt.dequantize(p), fmt, params, storage, scale_grad="lsq") * g).sum().backward()
    assert params["scale"].grad.abs().max() < 1e-4


@pytest.mark.parametrize("name", ["int4_g32_sym", "int2_g32_asym", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"])
def test_grid_sensitivity_is_how_far_one_unit_of_a_parameter_moves_the_grid(name):
    """Measured by moving each parameter: one unit of an int4 scale or a Q4_0 / Q4_1 d or m moves the grid one
    unit; a K-quant super-block scale d moves it by the sub-scales it multiplies (about 50), a sub-scale by d."""
    fmt = FORMATS[name]
    params = {k: v.float() for k, v in fmt.params(fmt.quantize(weight(N=6, K=512))).items()}
    moves = grid_sensitivity(fmt, params)
    scale, offset, _, _ = fmt.grid(params)
    for k, v in params.items():
        eps = 1e-3 * float(v.abs().mean())
        s2, o2, _, _ = fmt.grid({**params, k: v + eps})
        moved = (s2 - scale).abs().mean() if not torch.equal(s2, scale) else (o2 - offset).abs().mean()
        assert moves[k] == pytest.approx(float(moved) / eps, rel=1e-3), (name, k)
    if name in ("int4_g32_sym", "q4_0", "q4_1"):
        assert all(m == pytest.approx(1.0) for m in moves.values()), moves
    if name == "q4_k":
        assert moves["d"] == pytest.approx(float(params["sc"].mean()), rel=1e-6) and moves["d"] > 20
        assert moves["sc"] == pytest.approx(float(params["d"].repeat_interleave(8, 1).mean()), rel=1e-6)


def test_learnable_kquant_subscales_are_rounded_clamped_and_stored():
    """learn_ints: the 6-bit sub-scales and mins of Q4_K train as floats; the forward pass and the packed value
    use them rounded to integers and clamped to [0, 63]; zero points (int asym) stay fixed buffers."""
    fmt = FORMATS["q4_k"]
    w = weight(N=4, K=512)
    p = fmt.quantize(w)
    fq = FakeQuant(fmt, "w", (4, 512), fmt.params(p), learnable=True, learn_ints=True)
    assert isinstance(fq.sc, nn.Parameter) and isinstance(fq.mn, nn.Parameter) and fq.sc.dtype == torch.float32
    assert torch.equal(fq(w), fmt.dequantize(p))  # at the start: exactly the PTQ value
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    (fq(w.clone().requires_grad_(True)) * g).sum().backward()
    # "codes" gradient of sub-scale j: d w_hat / d sc = d * q on its 32 weights
    q = fmt.codes(p).float().view(4, 2, 8, 32)
    expect = (fq.d.detach()[..., None, None] * q * g.view(4, 2, 8, 32)).sum(-1)
    nonzero = fmt.grid({k: v.float() for k, v in fmt.params(p).items()})[0].view(4, 2, 8) != 0
    assert torch.allclose(fq.sc.grad[nonzero], expect[nonzero], rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        fq.sc[1, 0, 3] += 0.6  # rounds to one more
        fq.sc[2, 1, 0] = 99.0  # clamped to 63
        fq.mn[3, 0, 5] = -4.0  # clamped to 0
    want = {k: v.clone() for k, v in fmt.params(p).items()}
    want["sc"][1, 0, 3] += 1
    want["sc"][2, 1, 0], want["mn"][3, 0, 5] = 63, 0
    assert torch.equal(fq(w), fmt.dequantize(fmt.quantize(w, params=want)))
    packed = fq.pack(w)
    for k in want:
        assert packed.data[k].dtype == p.data[k].dtype and torch.equal(packed.data[k], want[k]), k
    asym = FORMATS["int4_g32_asym"]
    fz = FakeQuant(asym, "w", (4, 512), asym.params(asym.quantize(w)), learnable=True, learn_ints=True)
    assert [n for n, _ in fz.named_parameters()] == ["scale"] and fz.zero.dtype == torch.uint8
    off = FakeQuant(fmt, "w", (4, 512), fmt.params(p), learnable=True)  # default: sub-scales fixed
    assert [n for n, _ in off.named_parameters()] == ["d", "dmin"] and off.sc.dtype == torch.uint8


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.zeros(2, 3, 32), FORMATS["int8"])
    with pytest.raises(ValueError, match="scale_grad"):
        fake_quantize(torch.zeros(2, 32), FORMATS["int8"], scale_grad="pact")
    with pytest.raises(ValueError, match="iq4_nl has a non-uniform codebook grid"):
        fake_quantize(torch.zeros(2, 32), FORMATS["iq4_nl"])
