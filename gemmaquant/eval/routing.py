"""How much of an MoE model's quantization error is routing: expert choices that flip, and what they cost.

A Gemma 4 MoE layer sends each token to its router's top-k experts (GEMMA4_SPEC §2.6). The router reads the
residual stream, which quantization perturbs, so a token whose k-th and (k+1)-th router scores are nearly tied
can go to another expert than in the float model. Such a flip swaps one expert's output for another's: a jump,
not a small error. `routing_agreement` measures it on held-out text:

    flips[i]        share of tokens whose top-k expert set in MoE layer i differs from the reference model's,
                    both models running on their own (layer i sees the test model's own residual stream)
    kl_own          KL(ref || test) per token, the test model routing itself (compare_logits' kl_mean)
    kl_ref_routing  the same, with every MoE layer of the test model given the reference's expert choices and gate
                    weights for each token (forward hooks replace the test router's output); the KL that is left
                    is what the quantized weights cost with routing held fixed
    routing_share   1 - kl_ref_routing / kl_own: the share of the KL that the flips (and gate weights) carry

Measured on tiny-moe int4 (docs/qat.md): about half of the KL of GPTQ and of QAT is routing.
Both models must be gemmaquant's reference `Gemma4` (a loaded checkpoint, GGUF or quantizer output, packed or
not): the hooks sit on its `layers[i].router`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.router for layer in getattr(model, "layers", []) if getattr(layer, "router", None) is not None]


@torch.no_grad()
def routing_agreement(ref: torch.nn.Module, test: torch.nn.Module, ids: Tensor, batch_size: int = 4) -> dict | None:
    """Routing flips per MoE layer and the KL with the reference's routing (module docstring); None for a model
    without MoE layers. ids [n_seq, T]; KL over positions 0..T-2 (the next-token predictions), as compare_logits."""
    ref_routers, test_routers = moe_routers(ref), moe_routers(test)
    if not ref_routers:
        return None
    if len(ref_routers) != len(test_routers):
        raise ValueError(f"the models have {len(ref_routers)} and {len(test_routers)} MoE layers")
    recorded: list[tuple[Tensor, Tensor]] = []
    own: list[Tensor] = []
    forcing = [False]

    def record(module, args, out):
        recorded.append(out)

    def replace(module, args, out):
        i = len(own)
        own.append(out[1])
        if not forcing[0]:
            return None
        weights, ids = recorded[i]  # on the test model's device and in its dtype (it may run elsewhere, in bf16)
        return weights.to(out[0].device, out[0].dtype), ids.to(out[1].device)

    handles = [r.register_forward_hook(record) for r in ref_routers]
    handles += [r.register_forward_hook(replace) for r in test_routers]
    flips = torch.zeros(len(ref_routers), dtype=torch.float64)
    kl_own, kl_forced, n = 0.0, 0.0, 0
    try:
        for b in ids.split(batch_size):
            recorded.clear()
            lr = torch.log_softmax(ref(b).double(), -1)[:, :-1]
            p = lr.exp()
            for forced in (False, True):
                own.clear()
                forcing[0] = forced
                lt = torch.log_softmax(test(b).double(), -1)[:, :-1]
                kl = (p * (lr - lt)).sum(-1).clamp(min=0).sum().item()
                if forced:
                    kl_forced += kl
                    continue
                kl_own += kl
                for i, ((_, ref_ids), test_ids) in enumerate(zip(recorded, own)):
                    flips[i] += (ref_ids.sort(-1).values != test_ids.sort(-1).values).any(-1).sum().item()
            n += lr.shape[0] * lr.shape[1]
    finally:
        for h in handles:
            h.remove()
    tokens = ids.numel()  # the routers see every position, the last one included
    kl_own, kl_forced = kl_own / n, kl_forced / n
    return {"flips": [round(float(f) / tokens, 6) for f in flips], "kl_own": kl_own, "kl_ref_routing": kl_forced,
            "routing_share": 1 - kl_forced / kl_own if kl_own > 0 else 0.0}


def routing_text(r: dict | None) -> str:
    if not r:
        return ""
    flips = ", ".join(f"{100 * f:.1f}%" for f in r["flips"])
    return (f"routing: expert choices differing from the float model's per MoE layer {flips}; KL with the float "
            f"model's routing {r['kl_ref_routing']:.5f} of {r['kl_own']:.5f} ({100 * r['routing_share']:.0f}% of "
            f"the KL is routing)")
