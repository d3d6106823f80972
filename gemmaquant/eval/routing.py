"""How much of an MoE model's quantization error is routing: expert choices that flip, and what they cost.

A Gemma 4 MoE layer sends each token to its router's top-k experts (GEMMA4_SPEC §2.6). The router reads the
residual stream, which quantization perturbs, so a token whose k-th and (k+1)-th router scores are nearly tied
can go to another expert than in the float model. Such a flip swaps one expert's output for another's: a jump,
not a small error. `compare_logits(ref, test, ids, routing=True)` measures it on held-out text with a
`RoutingProbe` and adds to its metrics (MoE models only):

    routing.flips[i]        share of tokens whose top-k expert set in MoE layer i differs from the reference's,
                            both models running on their own (layer i sees the test model's own residual stream)
    routing.kl_ref_routing  KL(ref || test) per token with every MoE layer of the test model given the reference's
                            expert choices and gate weights (forward hooks replace the test router's output): what
                            the quantized weights cost with routing held fixed; kl_mean is the KL routing freely
    routing.routing_share   1 - kl_ref_routing / kl_mean: the share of the KL that the flips (and gate weights) carry

Measured on tiny-moe int4 (docs/qat.md): about half of the KL of GPTQ and of QAT is routing.
Both models must be gemmaquant's reference `Gemma4` (a loaded checkpoint, GGUF or quantizer output, packed or
not): the hooks sit on its `layers[i].router`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.router for layer in getattr(model, "layers", []) if getattr(layer, "router", None) is not None]


class RoutingProbe:
    """Forward hooks on both models' routers. Per batch: run `ref`, then `test` (its own routing; then
    `count_flips`), then `test` again with `forcing` set (every test router returns the reference's choices and
    gate weights)."""

    def __init__(self, ref: torch.nn.Module, test: torch.nn.Module):
        ref_routers, test_routers = moe_routers(ref), moe_routers(test)
        if len(ref_routers) != len(test_routers):
            raise ValueError(f"the models have {len(ref_routers)} and {len(test_routers)} MoE layers")
        self.recorded: list[tuple[Tensor, Tensor]] = []  # the reference's (weights, ids) of the current batch
        self.own: list[Tensor] = []  # the test model's ids of its last forward
        self.forcing = False
        self.flips = torch.zeros(len(ref_routers), dtype=torch.float64)
        self.tokens = 0
        self.handles = [r.register_forward_hook(self._record) for r in ref_routers]
        self.handles += [r.register_forward_hook(self._replace) for r in test_routers]

    def _record(self, module, args, out):
        if len(self.recorded) == len(self.flips):  # a new batch's reference forward
            self.recorded.clear()
        self.recorded.append(out)

    def _replace(self, module, args, out):
        if len(self.own) == len(self.flips):  # a new test forward
            self.own.clear()
        i = len(self.own)
        self.own.append(out[1])
        if not self.forcing:
            return None
        weights, ids = self.recorded[i]  # on the test model's device and in its dtype (it may run elsewhere, in bf16)
        return weights.to(out[0].device, out[0].dtype), ids.to(out[1].device)

    def count_flips(self) -> None:
        """After the test model's own forward: count, per MoE layer, the tokens whose expert set differs."""
        for i, ((_, ref_ids), test_ids) in enumerate(zip(self.recorded, self.own)):
            self.flips[i] += (ref_ids.sort(-1).values != test_ids.sort(-1).values).any(-1).sum().item()
        self.tokens += self.own[0].shape[0]  # the routers see every position, the last one included

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def result(self, kl_mean: float, kl_ref_routing: float) -> dict:
        return {"flips": [round(float(f) / max(self.tokens, 1), 6) for f in self.flips],
                "kl_ref_routing": kl_ref_routing,
                "routing_share": 1 - kl_ref_routing / kl_mean if kl_mean > 0 else 0.0}


def routing_text(metrics: dict) -> str:
    """One line on compare_logits' metrics with routing=True ("" where the model has no MoE layers)."""
    r = metrics.get("routing")
    if not r:
        return ""
    flips = ", ".join(f"{100 * f:.1f}%" for f in r["flips"])
    return (f"routing: expert choices differing from the float model's per MoE layer {flips}; KL with the float "
            f"model's routing {r['kl_ref_routing']:.5f} of {metrics['kl_mean']:.5f} ({100 * r['routing_share']:.0f}% "
            f"of the KL is routing)")
