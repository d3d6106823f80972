"""The fake quantizer on every format: its forward value is the format's own dequantized value, bit for bit;
its gradients are the straight-through estimator for the weights and the documented ones for learnable scales."""

import pytest
import torch

from gemmaquant.formats import FORMATS, IntGroup
from gemmaquant.qat import fake_quantize


def weight(N=6, K=512, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    w[1, 40] = 0.9  # an outlier
    return w


def learnable(p: dict) -> tuple[dict, dict]:
    """Packed params -> (fp32 leaf tensors, requiring grad where the stored dtype is a float), stored dtypes."""
    return ({k: v.float().clone().requires_grad_(v.is_floating_point()) for k, v in p.items()},
            {k: v.dtype for k, v in p.items()})


@pytest.mark.parametrize("name", list(FORMATS))
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


@pytest.mark.parametrize("name", list(FORMATS))
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


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.zeros(2, 3, 32), FORMATS["int8"])
    with pytest.raises(ValueError, match="scale_grad"):
        fake_quantize(torch.zeros(2, 32), FORMATS["int8"], scale_grad="pact")
