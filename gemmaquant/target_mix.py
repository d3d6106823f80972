"""`--target-bpw B` / `--target-size GiB` / `--gguf-mix FILE`: a per-tensor GGUF mix, measured and solved, or read back.

    mix = choose_mix("tiny-dense", recipe, target_bpw=5.0)   # sensitivity (gemmaquant.sensitivity) + allocation
    write_mix(mix, "out/tiny-dense-mix.json")                # JSON: {"tensor_types": {tensor: type}, ...}
    read_mix("out/tiny-dense-mix.json", cfg)                 # -> {tensor: type}, checked against the model

The recipe then carries the mix (`tensor_types`), GPTQ runs on each chosen grid, and the exporter writes each
tensor in its type. The file type written as general.file_type is the llama.cpp mix whose default type holds
most of the weights (informational: llama.cpp reads each tensor's own type).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gemmaquant.export.gguf_mix import MixError
from gemmaquant.mix_search import TargetError, solve_padded, total
from gemmaquant.padding import padding_lines

GIB = 1 << 30
MIX_FORMAT = "gemmaquant-gguf-mix"
_FILE_TYPE_OF = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # default tensor type -> llama.cpp file type


def budget_bytes(sens, target_bpw: float | None, target_size_gib: float | None) -> int:
    """The byte budget a target names; TargetError when it is below the smallest mix or above the float size."""
    if (target_bpw is None) == (target_size_gib is None):
        raise TargetError("give exactly one of --target-bpw and --target-size")
    budget = (int(target_bpw * sens.weights / 8) if target_bpw is not None else int(target_size_gib * GIB))
    what = f"--target-bpw {target_bpw}" if target_bpw is not None else f"--target-size {target_size_gib}"
    if budget <= 0:
        raise TargetError(f"{what}: must be > 0")
    # padding (gemmaquant.padding) can lower the smallest mix (Q2_K on a padded ffn_down); the float size is the
    # unpadded model's
    smallest = sens.fixed_bytes + min(sum(min(b for b, _ in u.options.values()) for u in units)
                                      for _, units in (sens.variants() if hasattr(sens, "variants")
                                                       else [((), sens.units)]))
    largest = sens.fixed_bytes + sum(max(b for b, _ in u.options.values()) for u in sens.units)
    if budget < smallest:
        raise TargetError(f"{what}: below the smallest mix the grids allow ({8 * smallest / sens.weights:.3f} bpw, "
                          f"{smallest / GIB:.4g} GiB)")
    if budget > largest:
        raise TargetError(f"{what}: above the float (F16) size of the model ({8 * largest / sens.weights:.3f} bpw, "
                          f"{largest / GIB:.4g} GiB)")
    return budget


def choose_mix(model, recipe, *, target_bpw: float | None = None, target_size_gib: float | None = None,
               calib: str | None = None, kl: bool | None = None, progress: bool | None = None) -> dict:
    """Measure every tensor's sensitivity and solve the allocation for the target. Returns the mix record
    ({"tensor_types", "file_type", "bits_per_weight", "bytes", "predicted_loss", "families", ...}).
    kl: scale the losses by the KL of each tensor quantized alone (loads the whole model, one forward per tensor);
    None: on models the report evaluates too (up to evaluate_run.MAX_EVAL_PARAMS); above, the Hessian proxy scaled by
    the prior per role and position (gemmaquant.sensitivity.PRIOR_WEIGHTS)."""
    from gemmaquant.evaluate_run import MAX_EVAL_PARAMS
    from gemmaquant.model.gemma4 import param_counts
    from gemmaquant.progress import stage
    from gemmaquant.quantize import open_source
    from gemmaquant.sensitivity import measure, skeleton
    from gemmaquant.workflow import model_config

    cfg = model_config(model) if isinstance(model, (str, os.PathLike)) else open_source(model).config
    budget_bytes(skeleton(cfg), target_bpw, target_size_gib)  # a budget outside the grids fails before any work
    if kl is None:
        kl = param_counts(cfg)["total"] <= MAX_EVAL_PARAMS
        if not kl:
            stage("a large model: each tensor's loss is its Hessian proxy scaled by the prior measured on the "
                  "fixtures for its role and position (no KL per tensor)", progress)
    sens = measure(model, recipe, calib=calib, kl=kl, progress=progress)
    budget = budget_bytes(sens, target_bpw, target_size_gib)
    choice, pad = solve_padded(sens.units, sens.padded, sens.pad_kind, budget, sens.fixed_bytes)
    units = dict(sens.variants())[pad]
    nbytes, loss = total(units, choice)
    nbytes += sens.fixed_bytes
    shapes = _shapes(cfg, units, pad)
    return {"format": MIX_FORMAT, "target_bpw": target_bpw, "target_size_gib": target_size_gib,
            "budget_bytes": budget, "bytes": nbytes, "bits_per_weight": 8 * nbytes / sens.weights,
            "predicted_loss": loss, "loss": "sum of KL(float || model) of each tensor quantized alone" if kl
            else "Hessian proxy x the fixtures' KL per unit of proxy for the tensor's role and position", "spearman_proxy_vs_kl": sens.spearman(),
            "file_type": file_type_for(choice, shapes), "families": families(choice, shapes),
            "pad_to_block": list(pad), "padding": padding_lines(cfg, pad) if pad else [],
            "padding_considered": sorted(set(sens.pad_kind.values())),
            "tensor_types": dict(sorted(choice.items())), "sensitivity": sens.to_dict()}


def _shapes(cfg, units, pad: tuple[str, ...]) -> dict:
    """unit -> its shape in the file (padded where `pad` pads it)."""
    from gemmaquant.padding import padded_config, padded_shape

    pcfg = padded_config(cfg, pad)
    return {u.name: padded_shape(u.name, u.shape, cfg, pcfg) for u in units}


def file_type_for(choice: dict[str, str], shapes: dict) -> str:
    """The llama.cpp file type whose default tensor type holds most of the chosen weights."""
    from gemmaquant.export.gguf_mix import FILE_TYPES

    weights: dict[str, int] = {}
    for name, t in choice.items():
        n = 1
        for s in shapes[name]:
            n *= s
        weights[t] = weights.get(t, 0) + n
    for t in sorted(weights, key=lambda k: -weights[k]):
        ft = _FILE_TYPE_OF.get(t, t)
        if ft in FILE_TYPES:
            return ft
    return "Q8_0"


def family(name: str) -> str:
    """A tensor's family across layers: `layers.3.mlp.down_proj.weight` -> `mlp.down_proj`."""
    parts = name.split(".")
    if parts[0] == "layers":
        parts = parts[2:]
    return ".".join(p for p in parts if p != "weight")


def families(choice: dict[str, str], shapes: dict) -> dict[str, dict[str, list[int]]]:
    """family -> type -> [layer indices] (or [] for a global tensor): the mix, readable."""
    out: dict[str, dict[str, list[int]]] = {}
    for name, t in sorted(choice.items()):
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        out.setdefault(family(name), {}).setdefault(t, [])
        if layer is not None:
            out[family(name)][t].append(layer)
    return out


def mix_text(mix: dict) -> str:
    lines = [f"mix: {mix['bits_per_weight']:.3f} bpw ({mix['bytes'] / GIB:.4g} GiB), predicted loss "
             f"{mix['predicted_loss']:.3g} ({mix['loss']})"]
    lines += [f"  zero-padded {p}" for p in mix.get("padding", [])]
    if mix.get("padding_considered") and not mix.get("pad_to_block"):
        lines.append(f"  zero-padding of {', '.join(mix['padding_considered'])} to the 256-block was considered "
                     f"and does not pay at this budget")
    for fam, types in mix["families"].items():
        lines.append(f"  {fam:<32} " + ", ".join(f"{t}" + (f" (layers {_ranges(ls)})" if ls else "")
                                                for t, ls in types.items()))
    return "\n".join(lines)


def _ranges(ls: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(ls):
        if start is None:
            start = v
        if i + 1 == len(ls) or ls[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def write_mix(mix: dict, path: str | os.PathLike) -> Path:
    """The mix as JSON (temporary name, then rename); `--gguf-mix` reads it back."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(mix, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_mix(path: str | os.PathLike, cfg) -> dict[str, str]:
    """{tensor: type} from a mix file (what write_mix wrote, or a plain {tensor: type} object; GGUF tensor names
    are accepted too), checked against `cfg`'s tensors (padded as the file says): MixError naming the file and the
    first bad entry."""
    return read_mix_record(path, cfg)[0]


def read_mix_record(path: str | os.PathLike, cfg) -> tuple[dict[str, str], tuple[str, ...]]:
    """(`read_mix`, the MLP kinds the mix zero-pads: its "pad_to_block", () when it has none)."""
    from gemmaquant.checkpoint import expected_shapes
    from gemmaquant.export.gguf_mix import check_tensor_types
    from gemmaquant.padding import PaddingError, check_kinds, padded_config
    from gemmaquant.validate import read_utf8

    path = Path(path)
    try:
        data = json.loads(read_utf8(path, MixError, "mix file", missing="mix file not found"))
    except json.JSONDecodeError as e:
        raise MixError(f"{path}: not valid JSON ({e})") from None
    types = data.get("tensor_types", data) if isinstance(data, dict) else None
    if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
        raise MixError(f"{path}: expected an object of tensor name -> GGUF type (or one with \"tensor_types\")")
    pad = data.get("pad_to_block") if "tensor_types" in data else None
    if pad is not None and not (isinstance(pad, list) and all(isinstance(k, str) for k in pad)):
        raise MixError(f"{path}: pad_to_block must be a list of MLP kinds (\"mlp\", \"experts\"), got {pad!r}")
    try:
        pad = check_kinds(pad, cfg, f"{path}: pad_to_block")
    except PaddingError as e:
        raise MixError(str(e)) from None
    types = {k: v for k, v in types.items() if k not in ("format", "pad_to_block")}
    return check_tensor_types(cfg, types, expected_shapes(padded_config(cfg, pad)), str(path)), pad


__all__ = ["TargetError", "MixError", "choose_mix", "read_mix", "read_mix_record", "write_mix", "budget_bytes",
           "mix_text"]
