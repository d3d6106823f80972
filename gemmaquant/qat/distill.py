"""The distillation loss of QAT: the float model (teacher) against the fake-quantized one (student).

    loss = KL(softmax(teacher / T) || softmax(student / T)) * T^2                  mean over tokens
           + hidden_weight * mean over layers |h_student - h_teacher|^2 / |h_teacher|^2
           + router_weight * mean over MoE layers KL(router_teacher || router_student)

The logits term is the distillation of Hinton et al. (2015), as in LLM-QAT (Liu et al. 2023) and EfficientQAT's
end-to-end step; the per-layer hidden-state term keeps every layer near its float output; the router term is
ours, for MoE models, whose discrete top-k expert choice carries most of their quantization error (docs/qat.md).
`Taps` collects the layer outputs and router logits with forward hooks on gemmaquant's reference Gemma4, and
`accumulate_gradients` runs one step's batch in micro-batches (gradient accumulation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from gemmaquant.qat.train import QATRecipe


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) per token, averaged: [B, T, V] logits -> scalar."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


class Taps:
    """Forward hooks on the reference Gemma4 collecting every decoder layer's output [B, T, H] and every router's
    logits [B*T, E] of the current forward (for the hidden-state and routing terms of the loss)."""

    def __init__(self, model: nn.Module, hidden: bool, router: bool):
        self.hidden: list[Tensor] = []
        self.router: list[Tensor] = []
        self.handles = []
        for layer in getattr(model, "layers", []):
            if hidden:
                self.handles.append(layer.register_forward_hook(lambda m, a, o: self.hidden.append(o)))
            if router and hasattr(layer, "router"):
                self.handles.append(layer.router.proj.register_forward_hook(lambda m, a, o: self.router.append(o)))

    def clear(self) -> None:
        self.hidden.clear()
        self.router.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.clear()


def qat_loss(s_logits: Tensor, t_logits: Tensor, s_taps: Taps, t_taps: Taps, r: "QATRecipe") -> tuple[Tensor, dict]:
    """KL on the logits, + hidden_weight * the relative squared error of every layer's output (averaged over
    layers), + router_weight * KL between teacher and student router distributions (MoE: routing decisions
    are discrete, and a flipped top-k choice carries most of an MoE model's quantization error)."""
    kl = distill_loss(s_logits, t_logits, r.temperature)
    loss, parts = kl, {"kl": kl.item()}
    if r.hidden_weight > 0 and s_taps.hidden:
        h = sum(((s - t) ** 2).mean() / (t ** 2).mean().clamp(min=1e-12)
                for s, t in zip(s_taps.hidden, t_taps.hidden)) / len(s_taps.hidden)
        loss, parts["hidden"] = loss + r.hidden_weight * h, h.item()
    if r.router_weight > 0 and s_taps.router:
        rt = sum(distill_loss(s, t) for s, t in zip(s_taps.router, t_taps.router)) / len(s_taps.router)
        loss, parts["router"] = loss + r.router_weight * rt, rt.item()
    return loss, parts


def accumulate_gradients(student: nn.Module, teacher: nn.Module, ids: Tensor, s_taps: Taps, t_taps: Taps,
                         r: "QATRecipe") -> tuple[float, dict]:
    """Backward of one step's loss on `ids` [batch_size, seq_len], in micro-batches of r.micro_batch windows
    (gradient accumulation: activations for micro_batch windows at a time). Each micro-batch's loss is weighted
    by its share of the windows, so the logits and router terms, means over tokens, sum to the whole batch's;
    the hidden-state term's normaliser |h_teacher|^2 is then the micro-batch's own. -> (loss, parts), the same
    weighted sums."""
    loss_sum, parts_sum = 0.0, {}
    for chunk in ids.split(r.micro_batch or ids.shape[0]):
        share = chunk.shape[0] / ids.shape[0]
        t_taps.clear(), s_taps.clear()
        with torch.no_grad():
            t_logits = teacher(chunk)
        loss, parts = qat_loss(student(chunk), t_logits, s_taps, t_taps, r)
        (loss * share if share != 1 else loss).backward()
        loss_sum += share * loss.item()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + share * v
    return loss_sum, parts_sum
