"""Quantize one decoder layer's matrices with the recipe's method, given its calibration statistics.

AWQ scales are folded only into what can absorb them in Gemma 4 (GEMMA4_SPEC §2):
    attn_in  (q, k, v)      -> input_layernorm.weight           (plain-weight RMSNorm)
    mlp_in   (gate, up)     -> pre_feedforward_layernorm.weight
    down_in  (down)         -> rows of up_proj                  (down's input is gelu(gate) * up)
    expert_in (all experts) -> pre_feedforward_layernorm_2.weight (one scale shared by every expert)
    expert_down_in.e        -> the up half of gate_up_proj[e]
o_proj (its input passes the weightless v_norm), per_layer_input_gate (reads the raw residual) and
per_layer_projection (gelu(gate) * ple) have nothing that can absorb a scale: AWQ leaves them unscaled
(round-to-nearest on their grid) and the report says so.
After the scales, every AWQ matrix but q_proj and k_proj gets AWQ's clipping search (`awq_clip`), weighted by
its input's Gram matrix in the scaled space (H / (s s^T): the folded matrix reads x / s).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gemmaquant.capture import LINEAR_GROUPS, LayerStats, group_of
from gemmaquant.formats.int4_lattice import Int4Lattice
from gemmaquant.model.gemma4 import DecoderLayer
from gemmaquant.plan import TensorPlan
from gemmaquant.recipe import Recipe

AWQ_FOLDS = {"attn_in": "input_layernorm.weight", "mlp_in": "pre_feedforward_layernorm.weight",
             "down_in": "mlp.up_proj.weight", "expert_in": "pre_feedforward_layernorm_2.weight"}
AWQ_UNSCALED = ("self_attn.o_proj.weight", "per_layer_input_gate.weight", "per_layer_projection.weight")
AWQ_NO_CLIP = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")  # llm-awq: seen through the softmax


def sqnr_db(w: Tensor, w_hat: Tensor) -> float:
    signal, err = _power_and_error(w, w_hat)
    return _db(signal, err)


def _power_and_error(w: Tensor, w_hat: Tensor) -> tuple[float, float]:
    """(sum w^2, sum (w - w_hat)^2), in float32 with torch's cascade sums (relative error ~1e-7, far below the
    0.1 dB the reports show; float64 copies of every weight cost more than the quantization around them)."""
    w = w.float()
    err = torch.sub(w, w_hat).square_().sum().item()
    return torch.mul(w, w).sum().item(), err


def _db(signal: float, err: float) -> float:
    return float("inf") if err == 0 else 10.0 * math.log10(signal / err)


def _param(layer: DecoderLayer, name: str) -> torch.nn.Parameter:
    mod = layer
    for p in name.split(".")[:-1]:
        mod = getattr(mod, p)
    return getattr(mod, name.split(".")[-1])


def _quantize_matrix(w: Tensor, fmt, method: str, stats, recipe: Recipe, name: str = "",
                     awq_scale: Tensor | None = None, factors: dict | None = None, lattice=None):
    """One matrix -> Packed. factors: {id(stats): HessianFactor}, so that the matrices reading the same inputs
    (q/k/v, gate/up) share one factorization of their Hessian under GPTQ. lattice: a qat_checkpoint.LatticeLog
    when `fmt` is the QAT lattice grid (then see _lattice_matrix)."""
    if lattice is not None and isinstance(fmt, Int4Lattice):
        return _lattice_matrix(w, fmt, method, stats, recipe, name, awq_scale, factors, lattice)
    from gemmaquant.algorithms import awq_clip, gptq, rtn
    from gemmaquant.algorithms.gptq import HessianFactor

    if stats is None or stats.n == 0 or method == "rtn":
        return rtn(w, fmt)
    if method == "awq":
        if name.endswith(AWQ_NO_CLIP):
            return rtn(w, fmt)
        H = stats.hessian
        if awq_scale is not None:
            H = H / (awq_scale[:, None] * awq_scale[None, :]).to(H)
        return rtn(awq_clip(w, H, fmt, n_grid=recipe.awq_grid), fmt)
    H = stats.hessian
    if method == "imatrix":
        return rtn(w, fmt, importance=torch.diagonal(H).clone())
    if factors is not None:
        if id(stats) not in factors:
            factors[id(stats)] = HessianFactor(H.to(w.device), recipe.damp, recipe.act_order)
        H = factors[id(stats)]
    return gptq(w, H, fmt, damp=recipe.damp, block_size=recipe.block_size, act_order=recipe.act_order,
                importance_params=recipe.importance_params)


def _gptq_experts(t: Tensor, per_expert: list, fmt, recipe: Recipe) -> list:
    """GPTQ of every expert t[e] that has statistics, batched; RTN for those without (as `_quantize_matrix`)."""
    from gemmaquant.algorithms import rtn
    from gemmaquant.algorithms.gptq_batched import gptq_experts

    E = t.shape[0]
    seen = [e for e, st in enumerate(per_expert) if st is not None and st.n > 0]
    packs = [rtn(t[e].float(), fmt) if per_expert[e] is None or per_expert[e].n == 0 else None for e in range(E)]
    if seen:
        hessians = [lambda st=per_expert[e]: st.hessian for e in seen]  # formed one chunk of experts at a time
        w = t if len(seen) == E else t.index_select(0, torch.tensor(seen, device=t.device))
        done = gptq_experts(w, hessians, fmt, damp=recipe.damp, block_size=recipe.block_size,
                            act_order=recipe.act_order, importance_params=recipe.importance_params)
        for e, pk in zip(seen, done):
            packs[e] = pk
    return packs


def _lattice_matrix(w, fmt, method, stats, recipe, name, awq_scale, factors, log):
    """A matrix of a QAT checkpoint: every group on the lattice keeps its own step and codes (no algorithm runs
    on a matrix wholly on it); the others are re-rounded by the recipe's method on the Int4Lattice grid (whose fit
    gives the recovered groups their own step), and the recovered groups then get their codes back: GPTQ may have
    moved a few of them by the errors it pushed from the re-rounded columns, which its updates elsewhere assumed."""
    from gemmaquant.algorithms.lattice import recover_lattice

    fit = recover_lattice(w)
    log.add(name, fit, method, w)
    if fit.recovered == fit.groups:
        return fmt.pack(fit.codes, {"scale": fit.step})
    pk = _quantize_matrix(w, fmt, method, stats, recipe, name, awq_scale, factors)
    keep = fit.exact.repeat_interleave(fmt.group_size, dim=1)
    codes = torch.where(keep, fit.codes, fmt.codes(pk))
    return fmt.pack(codes, {"scale": torch.where(fit.exact, fit.step, pk.data["scale"])})


@torch.no_grad()
def apply_awq(layer: DecoderLayer, stats: LayerStats, plan: dict[str, TensorPlan], recipe: Recipe) -> dict:
    """Search AWQ scales on the float weights, fold them in place. Returns {input statistic: s} (the name of the
    statistic in `stats.inputs` whose input x the folded matrices now read as x / s)."""
    from gemmaquant.algorithms.awq import awq_scales

    done = {}
    for group, fold in AWQ_FOLDS.items():
        if group == "expert_in":
            if not hasattr(layer, "experts") or "expert_pool" not in stats.inputs:
                continue
            gu = layer.experts.gate_up_proj
            fmt = plan["experts.gate_up_proj"].fmt
            if fmt is None:
                continue
            routed = [stats.inputs[f"expert_in.{e}"].x if f"expert_in.{e}" in stats.inputs
                      else torch.zeros(0, gu.shape[-1], device=gu.device)
                      for e in range(gu.shape[0])]  # each expert's loss on the tokens routed to it
            s = awq_scales(list(gu), stats.get("expert_pool").x, [fmt] * gu.shape[0], n_grid=recipe.awq_grid,
                           x_per_weight=routed)
            gu.mul_(s[None, None, :])
            _param(layer, fold).div_(s)
            done.update({f"expert_in.{e}": s for e in range(gu.shape[0])})
            continue
        _, names = LINEAR_GROUPS[group]
        names = [n for n in names if n in plan and plan[n].fmt is not None and hasattr(layer, "self_attn")
                 and _exists(layer, n)]
        if not names or group not in stats.inputs:
            continue
        ws = [_param(layer, n) for n in names]
        s = awq_scales(list(ws), stats.get(group).x, [plan[n].fmt for n in names], n_grid=recipe.awq_grid)
        for w in ws:
            w.mul_(s[None, :])
        if group == "down_in":
            _param(layer, fold).div_(s[:, None])  # scale up_proj's output rows by 1/s
        else:
            _param(layer, fold).div_(s)
        done[group] = s
    if hasattr(layer, "experts") and plan.get("experts.down_proj") and plan["experts.down_proj"].fmt is not None:
        E, _, Ie = layer.experts.down_proj.shape
        for e in range(E):
            st = stats.inputs.get(f"expert_down_in.{e}")
            if st is None or st.n == 0:
                continue
            d = layer.experts.down_proj[e]
            s = awq_scales([d], st.x, [plan["experts.down_proj"].fmt], n_grid=recipe.awq_grid)
            d.mul_(s[None, :])
            layer.experts.gate_up_proj[e, Ie:].div_(s[:, None])  # the up half feeds down's input channels
            done[f"expert_down_in.{e}"] = s
    return done


def _exists(layer, name) -> bool:
    try:
        _param(layer, name)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def quantize_layer(layer: DecoderLayer, stats: LayerStats, plan: dict[str, TensorPlan], recipe: Recipe,
                   batched_gptq: bool = True, lattice=None, write_back: bool = True):
    """Quantize every planned matrix of `layer` (plan keys relative to the layer), replace its weights by the
    dequantized result in place (so the next layer's inputs come from this quantized layer; write_back=False: the
    weights are left as they are, for a layer nothing runs afterwards), and return
    ({name: Packed | [Packed per expert] | float tensor}, {name: sqnr_db}, {expert tensor: [sqnr_db per expert]}).
    batched_gptq: under GPTQ, the experts of one tensor in batched sweeps (gemmaquant.algorithms.gptq_batched);
    False: one expert at a time (the reference loop).
    lattice: a qat_checkpoint.LatticeLog, filled for the matrices planned on the QAT lattice grid; AWQ's scales
    are not folded into a layer that has such matrices (the folded weights would leave the lattice)."""
    on_lattice = any(isinstance(p.fmt, Int4Lattice) for p in plan.values())
    awq = apply_awq(layer, stats, plan, recipe) if recipe.method == "awq" and not on_lattice else {}
    values, sqnr = {}, {}
    expert_sqnr: dict[str, list[float]] = {}
    factors: dict[int, object] = {}  # GPTQ's Hessian factors of the shared (non-expert) inputs, for this layer
    for name, p in plan.items():
        t = _param(layer, name) if _exists(layer, name) else None
        if t is None:
            continue
        if p.fmt is None:
            values[name] = t.detach().clone()
            continue
        if name.startswith("experts."):
            kind = "expert_in" if name.endswith("gate_up_proj") else "expert_down_in"
            per_expert = [stats.inputs.get(f"{kind}.{e}") for e in range(t.shape[0])]
            if recipe.method == "gptq" and batched_gptq and not isinstance(p.fmt, Int4Lattice):
                packs = _gptq_experts(t, per_expert, p.fmt, recipe)
            else:  # the lattice grid reads each expert's groups back first (_quantize_matrix)
                packs = [_quantize_matrix(t[e].float(), p.fmt, recipe.method, per_expert[e], recipe, name,
                                          awq.get(f"{kind}.{e}"), lattice=lattice) for e in range(t.shape[0])]
            values[name] = packs
            parts = []  # one expert at a time: float64 copies of one expert, never of the whole tensor
            for e, q in enumerate(packs):
                w_hat = q.fmt.dequantize(q)
                parts.append(_power_and_error(t[e], w_hat))
                if write_back:
                    t[e].copy_(w_hat.to(t.dtype))
            expert_sqnr[name] = [_db(*pe) for pe in parts]
            sqnr[name] = _db(math.fsum(pe[0] for pe in parts), math.fsum(pe[1] for pe in parts))
            continue
        group = group_of(name)
        pk = _quantize_matrix(t.float(), p.fmt, recipe.method, stats.inputs.get(group), recipe, name,
                              awq.get(group), factors, lattice)
        w_hat = pk.fmt.dequantize(pk)
        values[name] = pk
        sqnr[name] = sqnr_db(t, w_hat)
        if write_back:
            t.copy_(w_hat.to(t.dtype))
    return values, sqnr, expert_sqnr
