"""Calibration statistics of one decoder layer: per-input Hessians (GPTQ), activation samples (AWQ), and the
MoE routing coverage, collected with hooks that are removed after use.

Matrices that read the same input share one statistic ("input group"):
    attn_in    q_proj, k_proj, v_proj       (input_layernorm output)
    o_in       o_proj                       (attention output)
    mlp_in     gate_proj, up_proj           (pre_feedforward_layernorm output)
    down_in    down_proj                    (gelu(gate) * up)
    ple_gate_in / ple_proj_in               per_layer_input_gate / per_layer_projection (E2B/E4B)
    expert_in.e / expert_down_in.e          experts.gate_up_proj[e] / experts.down_proj[e], from the tokens routed
                                            to expert e (the router decides, on the calibration data)
H = X^T X / n (fp64 accumulation on the CPU, fp32 on a GPU; never under the forward's autocast). Experts that receive fewer than `min_tokens` calibration tokens get their
statistics by forced routing: a fixed sample of the layer's expert inputs is sent through them unweighted.

Per-expert statistics come one expert at a time (`record_expert`, the CPU default: the reference) or for all
experts of a batch at once (`batched=True`, the GPU default: gemmaquant.expert_stats): the routed tokens
gathered into an [E, cap, H] tensor, and every Gram matrix and down_proj input in one bmm each.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gemmaquant.model.gemma4 import DecoderLayer, gelu_tanh

# input group -> (module path whose input it is, tensors that read it)
LINEAR_GROUPS = {
    "attn_in": ("self_attn.q_proj", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "o_in": ("self_attn.o_proj", ("self_attn.o_proj.weight",)),
    "mlp_in": ("mlp.gate_proj", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "down_in": ("mlp.down_proj", ("mlp.down_proj.weight",)),
    "ple_gate_in": ("per_layer_input_gate", ("per_layer_input_gate.weight",)),
    "ple_proj_in": ("per_layer_projection", ("per_layer_projection.weight",)),
}


def no_autocast(device_type: str):
    """Statistics in their own precision even when the forward they watch runs under autocast."""
    return (torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type)
            else nullcontext())


@dataclass
class InputStats:
    xtx: Tensor | None = None  # [K, K] sum of x^T x, in acc_dtype
    n: int = 0
    samples: list[Tensor] = field(default_factory=list)  # rows kept for AWQ
    kept: int = 0
    acc_dtype: torch.dtype = torch.float64

    def add(self, x: Tensor, max_samples: int, stride: int) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.acc_dtype)
        if x.shape[0] == 0:
            return
        with no_autocast(x.device.type):
            xtx = x.T @ x
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.n += x.shape[0]
        if self.kept < max_samples:
            take = x[::stride][: max_samples - self.kept].float()
            self.samples.append(take)
            self.kept += take.shape[0]

    @property
    def hessian(self) -> Tensor:  # [K, K] fp32, X^T X / n
        return (self.xtx / max(self.n, 1)).float()

    @property
    def x(self) -> Tensor:  # [n_kept, K]
        return torch.cat(self.samples) if self.samples else torch.zeros(0)


@dataclass
class LayerStats:
    inputs: dict[str, InputStats] = field(default_factory=dict)
    expert_tokens: Tensor | None = None  # [E] tokens routed to each expert
    forced_experts: list[int] = field(default_factory=list)  # experts whose statistics came from forced routing
    acc_dtype: torch.dtype = torch.float64  # of the X^T X sums: fp64 on the CPU, fp32 on a GPU

    def get(self, group: str) -> InputStats:
        return self.inputs.setdefault(group, InputStats(acc_dtype=self.acc_dtype))


def batched_experts(device: torch.device) -> bool:
    """Per-expert statistics for all experts at once on a GPU; one expert at a time on the CPU, whose outputs
    stay byte-identical to the runs before batching (the batched sums differ in the last bits of fp64)."""
    return device.type != "cpu"


def _submodule(layer, path):
    m = layer
    for p in path.split("."):
        m = getattr(m, p, None)
        if m is None:
            return None
    return m


@contextmanager
def capture(layer: DecoderLayer, stats: LayerStats, max_samples: int = 2048, stride: int = 7,
            expert_pool: int = 4096, batched: bool = False):
    """Record the layer's input statistics for every forward run inside the block. batched: the per-expert
    statistics for all experts of a batch at once (gemmaquant.expert_stats) instead of one expert at a time."""
    handles = []
    for group, (path, _) in LINEAR_GROUPS.items():
        mod = _submodule(layer, path)
        if mod is not None:
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, g=group: stats.get(g).add(args[0], max_samples, stride)))
    experts = getattr(layer, "experts", None)
    if experts is not None:
        E = experts.gate_up_proj.shape[0]
        stats.expert_tokens = (stats.expert_tokens if stats.expert_tokens is not None
                               else torch.zeros(E, dtype=torch.long, device=experts.gate_up_proj.device))
        original = experts.forward
        if batched:
            from gemmaquant.expert_stats import ExpertAccumulator
        acc = ExpertAccumulator(E, stats.acc_dtype) if batched else None

        def recording_forward(x, weights, ids):
            stats.get("expert_pool").add(x, expert_pool, stride)  # inputs for forced routing
            stats.expert_tokens += torch.bincount(ids.flatten(), minlength=E)
            if acc is not None:
                acc.add(experts, x, ids, max_samples, stride)
            else:
                for e in ids.unique().tolist():
                    tok, _ = torch.where(ids == e)
                    record_expert(experts, stats, e, x[tok], max_samples, stride)
            return original(x, weights, ids)

        experts.forward = recording_forward
    try:
        yield stats
        if experts is not None and acc is not None:
            acc.write_into(stats)
    finally:
        for h in handles:
            h.remove()
        if experts is not None:
            del experts.forward  # back to the class method


def record_expert(experts, stats: LayerStats, e: int, x: Tensor, max_samples: int, stride: int) -> None:
    stats.get(f"expert_in.{e}").add(x, max_samples, stride)
    with no_autocast(x.device.type):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    stats.get(f"expert_down_in.{e}").add(gelu_tanh(gate) * up, max_samples, stride)


def force_route_rare_experts(layer: DecoderLayer, stats: LayerStats, min_tokens: int, max_samples: int = 2048,
                             stride: int = 7, batched: bool = False) -> None:
    """Experts routed fewer than `min_tokens` calibration tokens: replace their statistics with those of the
    pooled expert inputs sent through them (forced routing), so no expert is quantized blind. batched: every
    rare expert at once (gemmaquant.expert_stats.force_route)."""
    if stats.expert_tokens is None:
        return
    pool = stats.get("expert_pool").x
    if batched:
        rare = [e for e, count in enumerate(stats.expert_tokens.tolist()) if count < min_tokens]
        if rare and pool.numel():
            from gemmaquant.expert_stats import force_route

            force_route(layer.experts, stats, rare, pool.to(layer.experts.gate_up_proj.dtype), max_samples)
        return
    for e, count in enumerate(stats.expert_tokens.tolist()):
        if count < min_tokens and pool.numel():
            stats.inputs.pop(f"expert_in.{e}", None)
            stats.inputs.pop(f"expert_down_in.{e}", None)
            with torch.no_grad():
                record_expert(layer.experts, stats, e, pool.to(layer.experts.gate_up_proj.dtype), max_samples, 1)
            stats.forced_experts.append(e)


def group_of(tensor_name: str) -> str:
    """The input group a quantizable tensor of a layer reads (names relative to the layer)."""
    for group, (_, tensors) in LINEAR_GROUPS.items():
        if tensor_name in tensors:
            return group
    raise KeyError(tensor_name)
