"""algorithms/lattice.py: the int4 lattice of a QAT checkpoint read back exactly, against the codes that built it."""

import torch

from gemmaquant.algorithms.lattice import recover_lattice
from gemmaquant.fixtures.lattice import project_to_lattice
from gemmaquant.formats import Int4Lattice
from gemmaquant.formats.int4_lattice import INT4_LATTICE


def lattice_weights(N=64, K=256, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.05
    return project_to_lattice(w, gen, **kw)


def test_recovers_the_codes_the_checkpoint_was_built_with():
    w, q, d = lattice_weights(zero_share=0.05)
    g = q.view(64, -1, 32)
    # the cases the issue names are all present: groups with no -8, all-zero groups, extremum +7, groups using -8
    assert bool(((g.amin(-1) > -8) & (g.abs().amax(-1) > 0)).any()) and bool((g == 0).all(-1).any())
    assert bool((g.amax(-1) == 7).any()) and bool((g.amin(-1) == -8).any())
    w0 = w.clone()
    fit = recover_lattice(w)
    assert torch.equal(w, w0)  # the caller's tensor is left as it was
    assert fit.share == 1.0 and torch.equal(fit.codes, q)
    assert torch.equal((fit.step.float().repeat_interleave(32, 1) * fit.codes).to(torch.bfloat16), w)
    assert fit.fp16_inexact() == 0


def test_an_fp32_copy_of_the_lattice_is_recovered_too():
    w, q, d = lattice_weights(seed=1)
    exact = d.float().repeat_interleave(32, 1) * q  # d * q unrounded (a model object holding the lattice in fp32)
    fit = recover_lattice(exact)
    assert fit.share == 1.0 and torch.equal(fit.codes, q)


def test_float_weights_are_not_on_a_lattice():
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05).to(torch.bfloat16)
    assert recover_lattice(w).share == 0.0


def test_one_perturbed_weight_leaves_only_its_group():
    w, q, _ = lattice_weights(seed=3)
    w = w.clone()
    w[5, 40] = w[5, 40].float() * 1.3 + 0.001  # off the lattice
    fit = recover_lattice(w)
    assert fit.recovered == fit.groups - 1 and not bool(fit.exact[5, 1])
    assert torch.equal(fit.codes[fit.exact.repeat_interleave(32, 1)], q[fit.exact.repeat_interleave(32, 1)])


def test_codes_sharing_a_factor_take_the_finest_step():
    d = torch.tensor(0.01171875)  # a bf16 value
    q = torch.tensor([[-4, 2, 0, 3, -2] + [1] * 27])  # d * q is also (d / 2) * (2 q), and 2 q fits [-8, 7]
    fit = recover_lattice((d * q).to(torch.bfloat16))
    assert torch.equal(fit.codes, 2 * q) and fit.step.float().item() == d.item() / 2


def test_a_step_fp16_cannot_hold_is_counted_with_its_cost():
    d = torch.tensor(1.0078125 * 2.0 ** -20)  # bf16 (8 significant bits), below fp16's normal range: 2^-24 units
    q = torch.arange(-8, 8).repeat(2)[None]
    fit = recover_lattice((d * q).to(torch.bfloat16))
    assert fit.share == 1.0 and fit.fp16_inexact() == 1
    w = (d * q).to(torch.bfloat16)
    err = (d.to(torch.float16).float() * q - w.float()).abs().max().item()
    assert fit.fp16_max_error(w) == err > 0


def test_lattice_format_keeps_recovered_groups_and_rerounds_the_rest():
    w, q, d = lattice_weights(seed=4)
    w = w.clone()
    w[0, :32] = torch.linspace(-0.1, 0.09, 32).to(torch.bfloat16)  # group (0, 0) off the lattice
    p = INT4_LATTICE.quantize(w.float())  # RTN on the lattice grid
    codes = INT4_LATTICE.codes(p)
    assert torch.equal(codes[1:], q[1:]) and torch.equal(codes[0, 32:], q[0, 32:])
    assert torch.equal(p.data["scale"][1:], d[1:])
    assert p.data["scale"][0, 0].float().item() == torch.tensor(0.1 / 7).to(torch.bfloat16).float().item()
    assert isinstance(p.fmt, Int4Lattice) and p.fmt.name == "int4_g32_lattice"
