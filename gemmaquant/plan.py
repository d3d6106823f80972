"""Which grid every tensor of a Gemma 4 checkpoint goes onto, and why the others stay in float.

The plan is decided before any weight is read, so `--dry-run` can print it for the real variants with no weights
present, and the algorithm quantizes onto exactly the grid the exporter writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemmaquant.checkpoint import expected_shapes
from gemmaquant.config import Gemma4Config
from gemmaquant.recipe import Recipe, RecipeError

FLOAT_REASONS = {
    "norm": "norm weight: kept in float (F32 in GGUF), too small to matter and absorbs AWQ scales",
    "scalar": "layer_scalar: a per-layer scalar, kept in float (F32 in GGUF)",
    "router": "router (projection, input scale, per-expert scale): kept in float (F32 in GGUF, like llama.cpp); "
              "routing decisions are too sensitive to quantize",
    "embedding": "embedding table: bf16 in safetensors (compressed-tensors ignores it, as vLLM expects); "
                 "GGUF gets {gguf} by round-to-nearest (llama.cpp's rule for the tied output/embedding tensor: "
                 "Q6_K, Q8_0 when a row is not a multiple of Q6_K's 256-element blocks)",
    "ple_projection": "per_layer_model_projection: kept in float, as llama-quantize keeps it "
                      "('not too big so keep them as it is')",
    "lm_head": "lm_head: kept in float (untied output head)",
}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    fmt: object | None  # a gemmaquant.formats format, or None for float
    reason: str  # why float, or the fallback taken ("" for the plain choice)


def float_reason(name: str) -> str | None:
    if name.endswith("layer_scalar"):
        return "scalar"
    if ".router." in name:
        return "router"
    if name.endswith("norm.weight") or "layernorm" in name:
        return "norm"
    if name in ("embed_tokens.weight", "embed_tokens_per_layer.weight"):
        return "embedding"
    if name == "per_layer_model_projection.weight":
        return "ple_projection"
    if name == "lm_head.weight":
        return "lm_head"
    return None


def make_plan(cfg: Gemma4Config, recipe: Recipe) -> dict[str, TensorPlan]:
    from gemmaquant.formats import get_format

    mix = None
    if recipe.gguf_type:
        from gemmaquant.export.gguf_mix import gguf_mix_plan

        mix = gguf_mix_plan(cfg, recipe.gguf_type, tensor_types=recipe.tensor_types)
    plan = {}
    embedding_types = _embedding_gguf_types(cfg, recipe)
    for name, shape in expected_shapes(cfg).items():
        why = float_reason(name)
        if why is not None or len(shape) < 2:
            text = FLOAT_REASONS[why or "norm"].format(gguf=embedding_types.get(name))
            if name in (recipe.tensor_types or {}):
                text = (f"embedding table: bf16 in safetensors; GGUF gets {recipe.tensor_types[name]} by "
                        f"round-to-nearest (chosen per tensor)")
            plan[name] = TensorPlan(name, shape, None, text)
            continue
        if name in (recipe.ct_schemes or {}):  # a compressed-tensors per-layer mix (gemmaquant.ct_mix)
            scheme = recipe.ct_schemes[name]
            if scheme == "bf16":
                plan[name] = TensorPlan(name, shape, None, "per-layer compressed-tensors mix: bf16 (in `ignore`)")
                continue
            fmt = get_format(scheme)
        elif mix is not None:
            choice = mix[name]
            if isinstance(choice, str) and choice.upper() in ("F32", "F16", "BF16"):
                why = (f"per-tensor mix: {choice}" if name in (recipe.tensor_types or {})
                       else f"{recipe.gguf_type}: llama.cpp keeps it {choice}")
                plan[name] = TensorPlan(name, shape, None, why)
                continue
            fmt = get_format(choice) if isinstance(choice, str) else choice
        else:
            fmt = get_format(recipe.weight_format)
        K = shape[-1]
        reason = ""
        block = fmt.row_block  # a K-quant / IQ4_XS row holds whole 256-element super-blocks
        if fmt.name != "int8" and K % block:  # int8 is one block per row, whatever K is
            raise RecipeError(f"{name}: {K} input features do not fit {fmt.name}'s {block}-element blocks "
                              f"and the recipe names no fallback")
        plan[name] = TensorPlan(name, shape, fmt, reason)
    return plan


def _embedding_gguf_types(cfg: Gemma4Config, recipe: Recipe) -> dict[str, str]:
    """The GGUF type the exporter gives each embedding table ("no GGUF export" for a grid GGUF cannot hold)."""
    from gemmaquant.export.gguf_mix import gguf_mix_plan
    from gemmaquant.export.sizes import gguf_file_type

    names = ("embed_tokens.weight", "embed_tokens_per_layer.weight")
    file_type = gguf_file_type(recipe)
    if file_type is None:
        return dict.fromkeys(names, "no GGUF export")
    mix = gguf_mix_plan(cfg, file_type, token_embd_type=recipe.embedding_gguf_type,
                        tensor_types=recipe.tensor_types if recipe.gguf_type else None)
    return {n: mix[n] for n in names if n in mix}


def plan_summary(plan: dict[str, TensorPlan]) -> dict:
    """Counts and sizes: parameters per format, float tensors with their reasons, bits per weight."""
    by_fmt: dict[str, int] = {}
    bits = 0.0
    floats = {}
    for p in plan.values():
        n = 1
        for s in p.shape:
            n *= s
        key = p.fmt.name if p.fmt is not None else "float"
        by_fmt[key] = by_fmt.get(key, 0) + n
        bits += n * (p.fmt.bits if p.fmt is not None else 16)
        if p.fmt is None:
            floats[p.name] = p.reason
    total = sum(by_fmt.values())
    return {"params_by_format": by_fmt, "total_params": total, "bits_per_weight": bits / max(total, 1),
            "float_tensors": floats}
