"""The distillation loss's routing-margin term (gemmaquant.qat.distill.margin_loss) against hand computations."""

import copy

import pytest
import torch

import gemmaquant
from gemmaquant.qat.distill import Taps, margin_loss, qat_loss, topk_margin
from gemmaquant.qat.train import QATRecipe


def test_topk_margin_is_positive_exactly_for_the_top_k_set():
    logits = torch.tensor([[0.9, 0.1, 0.5, 0.4], [0.2, 0.3, 0.25, 0.0]])
    chosen = torch.tensor([[0, 2], [0, 1]])
    # row 0: {0, 2} is the top 2, min 0.5 - max of the rest 0.4; row 1: {0, 1} is not (2 beats 0), 0.2 - 0.25
    assert topk_margin(logits, chosen).tolist() == pytest.approx([0.1, -0.05])


def test_margin_loss_by_hand():
    teacher = torch.tensor([[1.0, 0.8, 0.79, 0.0], [1.0, 0.9, 0.0, 0.1]])
    student = torch.tensor([[1.0, 0.78, 0.80, 0.0], [1.0, 0.9, 0.0, 0.1]])  # token 0 flips experts 1 and 2
    sigma = teacher.std().item()
    cap = 0.2
    # token 0: teacher margin 0.01 (below cap * sigma), student margin -0.02: hinge 0.03; token 1: equal, 0
    assert margin_loss(student, teacher, 2, cap).item() == pytest.approx(0.03 / 2 / sigma, rel=1e-5)
    assert margin_loss(teacher, teacher, 2, cap).item() == 0.0
    # the units are the teacher's logit std: scaling both models' logits leaves the loss unchanged
    assert margin_loss(7 * student, 7 * teacher, 2, cap).item() == pytest.approx(0.03 / 2 / sigma, rel=1e-5)
    # a wide teacher margin (token 1: 0.8) asks for cap * sigma only: with the student's cut to 0.05 (token 0 as
    # the teacher's), the hinge is cap * sigma - 0.05, not 0.8 - 0.05
    near = torch.tensor([[1.0, 0.8, 0.79, 0.0], [1.0, 0.9, 0.0, 0.85]])
    assert 0.05 < cap * sigma < 0.8
    want = (cap * sigma - 0.05) / 2 / sigma
    assert margin_loss(near, teacher, 2, cap).item() == pytest.approx(want, rel=1e-5)


def test_margin_gradient_pushes_the_flipped_token_back():
    teacher = torch.tensor([[1.0, 0.8, 0.79, 0.0]])
    student = torch.tensor([[1.0, 0.78, 0.80, 0.0]], requires_grad=True)
    margin_loss(student, teacher, 2, 0.2).backward()
    g = student.grad[0]
    assert g[1] < 0 and g[2] > 0 and g[0] == 0 and g[3] == 0  # descent raises expert 1, lowers the intruder 2


def test_qat_loss_adds_the_margin_term_on_an_moe_model():
    teacher = gemmaquant.load("tiny-moe", dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # routers that disagree a little with the teacher's
        for layer in student.layers:
            w = layer.router.proj.weight
            w.add_(0.2 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(3, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    s_taps, t_taps = Taps(student, False, True), Taps(teacher, False, True)
    with torch.no_grad():
        t_logits, s_logits = teacher(ids), student(ids)
    r = QATRecipe(hidden_weight=0.0, router_weight=0.0, margin_weight=2.0)
    loss, parts = qat_loss(s_logits, t_logits, s_taps, t_taps, r)
    assert t_taps.top_k == 2 and len(s_taps.router) == len(t_taps.router) == 4
    want = sum(margin_loss(s, t, 2, r.margin_cap) for s, t in zip(s_taps.router, t_taps.router)) / 4
    assert parts["margin"] == pytest.approx(want.item(), rel=1e-6) and parts["margin"] > 0
    assert loss.item() == pytest.approx(parts["kl"] + 2.0 * parts["margin"], rel=1e-6)
    no_margin = qat_loss(s_logits, t_logits, s_taps, t_taps, QATRecipe(hidden_weight=0.0, router_weight=0.0))[1]
    assert "margin" not in no_margin
    s_taps.remove(), t_taps.remove()


def test_margin_recipe_fields_are_checked():
    from gemmaquant.qat import QATError

    for bad in ({"margin_weight": -1.0}, {"margin_cap": 0.0}):
        with pytest.raises(QATError, match="margin"):
            QATRecipe(**bad)
