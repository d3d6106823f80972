"""What each exported file will hold, byte for byte, from the plan alone (no weights): the dry run's sizes.

Bits per weight means one thing everywhere in gemmaquant: the bytes of every tensor in the file (scales, F32 norms
and rope_freqs included, headers not) times 8, over the weights the file holds. `gemmaquant inspect` computes it
from a written file (`gemmaquant.export.inspect.file_bits`); the functions here predict the same figure exactly
(tests/test_bits_per_weight.py checks both against each other on a real run).

GGUF types are the exporter's own choice: a quantized matrix keeps its block type (int4 g32 is Q4_0, int8 is Q8_0),
every float tensor gets what `gguf_mix_plan` gives it for the file type (llama.cpp's rules, fallbacks included:
the 160-wide tiny-moe embedding cannot hold Q6_K's 256-blocks and is stored Q8_0).
"""

from __future__ import annotations

from gemmaquant.config import Gemma4Config
from gemmaquant.plan import TensorPlan

# our grid -> the GGUF type that holds it exactly (int4_g32_lattice: a QAT checkpoint's lattice, qat_checkpoint.py)
LOSSLESS_GGUF = {"int4_g32_sym": "Q4_0", "int8": "Q8_0", "int4_g32_lattice": "Q4_0"}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def gguf_file_type(recipe) -> str | None:
    """The GGUF file type (mix) a recipe exports to, or None when its grid has no lossless GGUF type."""
    return recipe.gguf_type or LOSSLESS_GGUF.get(recipe.weight_format)


def gguf_types(cfg: Gemma4Config, plan: dict[str, TensorPlan], recipe) -> dict[str, str]:
    """name -> the ggml type the GGUF exporter writes for it."""
    from gemmaquant.export.gguf_mix import gguf_mix_plan

    mix = gguf_mix_plan(cfg, gguf_file_type(recipe), token_embd_type=recipe.embedding_gguf_type,
                        shapes={p.name: tuple(p.shape) for p in plan.values()},
                        tensor_types=recipe.tensor_types if recipe.gguf_type else None)
    out = {}
    for name, p in plan.items():
        if p.fmt is None:
            out[name] = mix[name]
        elif getattr(p.fmt, "ggml_type", None) is not None:  # a GGUF block format (Q4_K, Q6_K, ...)
            out[name] = p.fmt.ggml_type.name
        else:  # int4 g32 / int8, repacked losslessly
            out[name] = LOSSLESS_GGUF[p.fmt.name]
    return out


def gguf_size(cfg: Gemma4Config, plan: dict[str, TensorPlan], recipe) -> dict:
    """{"bytes", "weights", "bits_per_weight", "params_by_type", "families"} of the GGUF file (tensor data,
    rope_freqs too). families: `gguf_families`, the type of each tensor family and why."""
    from gemmaquant.export.gguf_pack import tensor_nbytes

    rope = cfg.global_head_dim // 2  # the generated rope_freqs tensor, F32
    nbytes, weights, by_type = 4 * rope, rope, {"F32": rope}
    types = gguf_types(cfg, plan, recipe)
    for name, t in types.items():
        shape = tuple(plan[name].shape)
        nbytes += tensor_nbytes(t, shape)
        weights += _numel(shape)
        by_type[t] = by_type.get(t, 0) + _numel(shape)
    return {"bytes": nbytes, "weights": weights, "bits_per_weight": 8 * nbytes / weights, "params_by_type": by_type,
            "families": gguf_families(cfg, plan, recipe, types, nbytes)}


def gguf_families(cfg: Gemma4Config, plan: dict[str, TensorPlan], recipe, types: dict[str, str],
                  file_bytes: int) -> list[dict]:
    """One row per (tensor family, type, reason): {"family" (GGUF name, blk.* for every layer), "layers" (e.g.
    "0-3,7"; "" outside layers), "type", "why" ("" for the file type's default; else llama.cpp's rule and / or
    the fallback taken, "row of 704: 704 % 256 = 192, Q4_K impossible -> Q5_0"), "tensors", "params",
    "bits_per_weight" (of the type), "bytes", "share" (of the file's tensor bytes)}, largest share first."""
    from gemmaquant.export.gguf_mix import gguf_mix_choices
    from gemmaquant.export.gguf_names import gguf_name, layer_of
    from gemmaquant.export.gguf_pack import tensor_nbytes

    choices = gguf_mix_choices(cfg, gguf_file_type(recipe), token_embd_type=recipe.embedding_gguf_type,
                               shapes={p.name: tuple(p.shape) for p in plan.values()},
                               tensor_types=getattr(recipe, "tensor_types", None))
    from gemmaquant.padding import pad_note

    rows: dict[tuple, dict] = {}
    for name, t in types.items():
        mix_type, why = choices[name]
        if t != mix_type:  # the recipe's own grid, not the mix's choice
            why = (f"{plan[name].fmt.name} stored losslessly as {t}" if plan[name].fmt is not None
                   else f"kept float, written as {t}")
        padded = pad_note(name, tuple(plan[name].shape), cfg)  # "" unless the plan pads this matrix
        why = "; ".join(w for w in (padded, why) if w)
        g = gguf_name(name)
        layer = layer_of(g)
        family = g.removesuffix(".weight") if layer is None else "blk.*." + g.split(".", 2)[2].removesuffix(".weight")
        shape = tuple(plan[name].shape)
        row = rows.setdefault((family, t, why), {"family": family, "layers": [], "type": t, "why": why,
                                                  "tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += _numel(shape)
        row["bytes"] += tensor_nbytes(t, shape)
        if layer is not None:
            row["layers"].append(layer)
    out = []
    for row in rows.values():
        row["layers"] = _ranges(sorted(row["layers"]))
        row["bits_per_weight"] = 8 * row["bytes"] / row["params"]
        row["share"] = row["bytes"] / file_bytes
        out.append(row)
    return sorted(out, key=lambda r: (-r["bytes"], r["family"]))


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> "0-3,7,9-10"."""
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def safetensors_size(plan: dict[str, TensorPlan], dtype_bytes: int = 2) -> dict:
    """{"bytes", "weights", "bits_per_weight"} of the compressed-tensors export (text model, bf16): per quantized
    matrix (each expert its own) int32-packed codes, a scale per group (int4) or row (int8) and an int64[2]
    weight_shape; every other tensor in bf16."""
    nbytes = weights = 0
    for p in plan.values():
        weights += _numel(p.shape)
        nbytes += ct_tensor_nbytes(p.name, p.shape, p.fmt.name if p.fmt is not None else "bf16", dtype_bytes)
    return {"bytes": nbytes, "weights": weights, "bits_per_weight": 8 * nbytes / max(weights, 1)}


def ct_tensor_nbytes(name: str, shape, scheme: str, dtype_bytes: int = 2) -> int:
    """Bytes one tensor takes in the compressed-tensors export under `scheme` ("bf16", "int8" or an int4 group
    format name such as int4_g32_sym): the model dtype, or codes + scales + an int64[2] weight_shape per module."""
    n = _numel(shape)
    if scheme in ("bf16", "float"):
        return n * dtype_bytes
    experts = shape[0] if len(shape) == 3 else 1
    N, K = shape[-2], shape[-1]
    bits = 8 if scheme == "int8" else 4
    scales = 1 if bits == 8 else K // int(scheme.split("_g")[1].split("_")[0])
    modules = experts * (2 if name.endswith("gate_up_proj") else 1)  # experts unfused, gate_up split in two
    return experts * (N * K * bits // 8 + N * scales * dtype_bytes) + 16 * modules  # + int64[2] weight_shape
