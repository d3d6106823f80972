"""compressed-tensors (vLLM) per-layer mixes: `--format safetensors --target-bpw B` / `--target-size GiB` / `--ct-mix`.

The GGUF search (gemmaquant.target_mix) chooses a type per tensor; vLLM cannot take that freedom. Its constraints
(vllm/model_executor/layers/quantization/compressed_tensors/{compressed_tensors.py, utils.py,
compressed_tensors_moe/compressed_tensors_moe.py}, vllm/model_executor/models/gemma4.py):
  * modules it fuses take one scheme: q/k/v -> `self_attn.qkv_proj`, gate/up -> `mlp.gate_up_proj`
    (`_match_fused_layer` takes the first shard's target without comparing the others);
  * all experts of one FusedMoE layer, gate, up and down, take one scheme ("All MoE projections need to have same
    quantization scheme");
  * transformers (5.x, `get_experts_scheme` in integrations/compressed_tensors.py) dequantizes every layer's
    experts with one config group, the first whose `re:` targets mention experts: so the quantized experts of all
    layers share one scheme (a layer's experts may still stay bf16); the search solves once per experts scheme and
    keeps the best, and a mix file that gives two layers' experts different quantized schemes is refused, unless
    `shared_experts=False` (`--per-layer-experts`): each layer's experts their own scheme, which vLLM loads and
    transformers would dequantize wrongly (gemmaquant.export.load_transformers refuses such an export);
  * weight-only schemes it runs with its WNA16 kernels (Marlin, Machete, the MoE Marlin / WNA16 kernels): int4
    symmetric with groups of 32, 64 or 128 (MARLIN_SUPPORTED_GROUP_SIZES; the group must divide the input width),
    int8 symmetric per channel; a module in `ignore` runs unquantized (bf16).
So the *units* of the choice are, per layer: attention q/k/v, o_proj, MLP gate/up, MLP down, the experts (all of
them, both tensors), the PLE gate, the PLE projection. Each unit's options are the schemes below whose group
divides its input width: (exact bytes of the export, loss) with the loss the sum of its tensors' measured losses
(gemmaquant.sensitivity with this module's candidates: Hessian proxy scaled by the KL of the tensor quantized alone),
and the allocation is the GGUF search's own solver (gemmaquant.mix_search.solve).

    mix = choose_ct_mix("tiny-dense", recipe, target_bpw=8.5)   # {"ct_schemes": {tensor: scheme}, "families", ...}
    write_mix(mix, path); read_ct_mix(path, cfg)                 # -> {tensor: scheme}, checked (target_mix.write_mix)
The export writes one config_group per scheme whose `re:` targets list exactly its modules, and the bf16 ones in
`ignore` (gemmaquant.export.ct_targets).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gemmaquant.export.gguf_mix import MixError
from gemmaquant.mix_search import TargetError, Unit, solve, solve_least_loss, total

GIB = 1 << 30
MIX_FORMAT = "gemmaquant-ct-mix"
FLOAT_SCHEME = "bf16"
# scheme name (a gemmaquant.formats name, or bf16) -> (bits, group size or None for per channel)
SCHEMES = {"int4_g32_sym": (4, 32), "int4_g64_sym": (4, 64), "int4_g128_sym": (4, 128), "int8": (8, None),
           FLOAT_SCHEME: (16, None)}
SEARCHED = ("int4_g128_sym", "int4_g32_sym", "int8", FLOAT_SCHEME)  # the solver's candidates
# a unit of the choice: its key within a layer -> the tensors (relative to the layer) that share its scheme
UNITS = {"self_attn.qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
         "self_attn.o_proj": ("self_attn.o_proj.weight",),
         "mlp.gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
         "mlp.down_proj": ("mlp.down_proj.weight",),
         "experts": ("experts.gate_up_proj", "experts.down_proj"),
         "per_layer_input_gate": ("per_layer_input_gate.weight",),
         "per_layer_projection": ("per_layer_projection.weight",)}
_WHY = {"self_attn.qkv": "vLLM fuses q/k/v into qkv_proj", "mlp.gate_up": "vLLM fuses gate/up into gate_up_proj",
        "experts": "vLLM runs a layer's experts (gate, up and down) as one FusedMoE"}


def scheme_fits(scheme: str, k: int) -> bool:
    """Whether a matrix with `k` inputs can hold the scheme (groups divide k; codes pack into int32 words)."""
    bits, group = SCHEMES[scheme]
    return bits == 16 or (k % (group or 32 // bits) == 0 and k % (32 // bits) == 0)


def units_of(cfg) -> dict[str, list[str]]:
    """{unit name: [tensor names]} for every tensor the compressed-tensors export quantizes, e.g.
    "layers.0.self_attn.qkv" -> [layers.0.self_attn.q_proj.weight, layers.0.self_attn.k_proj.weight]."""
    from gemmaquant.checkpoint import expected_shapes
    from gemmaquant.export.compressed_tensors import is_quantized

    out: dict[str, list[str]] = {}
    for name in expected_shapes(cfg):
        if not is_quantized(name):
            continue
        i, rel = name.split(".", 2)[1:]
        key = next(k for k, members in UNITS.items() if rel in members)
        out.setdefault(f"layers.{i}.{key}", []).append(name)
    return out


def unit_of(name: str) -> str:
    i, rel = name.split(".", 2)[1:]
    return f"layers.{i}." + next(k for k, members in UNITS.items() if rel in members)


class CTSpace:
    """The candidates and exact bytes of the compressed-tensors search, per tensor (gemmaquant.sensitivity's
    `space`): the searched schemes whose group divides the tensor's input width, bytes as the export writes them."""

    float_candidate = FLOAT_SCHEME

    def skeleton(self, cfg):
        from gemmaquant.checkpoint import expected_shapes
        from gemmaquant.export.compressed_tensors import is_quantized
        from gemmaquant.export.sizes import ct_tensor_nbytes
        from gemmaquant.sensitivity import Sensitivity

        shapes = expected_shapes(cfg)
        units, fixed, weights = [], 0, 0
        for n, s in shapes.items():
            numel = 1
            for d in s:
                numel *= d
            weights += numel
            if is_quantized(n):
                units.append(Unit(n, tuple(s), {t: (ct_tensor_nbytes(n, tuple(s), t), 0.0) for t in SEARCHED
                                                if scheme_fits(t, s[-1])}))
            else:
                fixed += ct_tensor_nbytes(n, tuple(s), FLOAT_SCHEME)
        return Sensitivity(units, fixed, weights)


def group_units(cfg, tensor_units: list[Unit]) -> list[Unit]:
    """Per-tensor options -> per fused unit: the schemes every member can hold, bytes and losses summed."""
    by_name = {u.name: u for u in tensor_units}
    out = []
    for unit, members in units_of(cfg).items():
        common = [t for t in SEARCHED if all(t in by_name[m].options for m in members)]
        out.append(Unit(unit, (len(members),), {t: (sum(by_name[m].options[t][0] for m in members),
                                                    sum(by_name[m].options[t][1] for m in members)) for t in common}))
    return out


def budget_bytes(skel, units: list[Unit], target_bpw: float | None, target_size_gib: float | None) -> int:
    """The byte budget a target names; TargetError when it is below the smallest mix or above the bf16 size."""
    if (target_bpw is None) == (target_size_gib is None):
        raise TargetError("give exactly one of --target-bpw and --target-size")
    budget = int(target_bpw * skel.weights / 8) if target_bpw is not None else int(target_size_gib * GIB)
    what = f"--target-bpw {target_bpw}" if target_bpw is not None else f"--target-size {target_size_gib}"
    smallest = skel.fixed_bytes + sum(min(b for b, _ in u.options.values()) for u in units)
    largest = skel.fixed_bytes + sum(max(b for b, _ in u.options.values()) for u in units)
    if budget < smallest:
        raise TargetError(f"{what}: below the smallest compressed-tensors mix ({8 * smallest / skel.weights:.3f} "
                          f"bpw, {smallest / GIB:.4g} GiB: every layer int4 with groups of 128 where they fit)")
    if budget > largest:
        raise TargetError(f"{what}: above the bf16 size of the model ({8 * largest / skel.weights:.3f} bpw, "
                          f"{largest / GIB:.4g} GiB)")
    return budget


def choose_ct_mix(model, recipe, *, target_bpw: float | None = None, target_size_gib: float | None = None,
                  calib: str | None = None, kl: bool | None = None, progress: bool | None = None,
                  shared_experts: bool = True) -> dict:
    """Measure each quantized tensor's sensitivity to each scheme and solve the per-unit allocation for the target.
    Returns the mix record ({"ct_schemes": {tensor: scheme}, "unit_schemes", "bits_per_weight", "bytes",
    "predicted_loss", "families", ...}). kl: as gemmaquant.target_mix.choose_mix."""
    from gemmaquant.evaluate_run import MAX_EVAL_PARAMS
    from gemmaquant.model.gemma4 import param_counts
    from gemmaquant.quantize import open_source
    from gemmaquant.sensitivity import measure
    from gemmaquant.workflow import model_config

    space = CTSpace()
    cfg = model_config(model) if isinstance(model, (str, os.PathLike)) else open_source(model).config
    skel = space.skeleton(cfg)
    budget_bytes(skel, group_units(cfg, skel.units), target_bpw, target_size_gib)  # fails before any work
    if kl is None:
        kl = param_counts(cfg)["total"] <= MAX_EVAL_PARAMS
    sens = measure(model, recipe, calib=calib, kl=kl, progress=progress, space=space)
    mix = solve_ct_mix(cfg, sens, budget_bytes(sens, group_units(cfg, sens.units), target_bpw, target_size_gib),
                       shared_experts)
    return {"format": MIX_FORMAT, "target_bpw": target_bpw, "target_size_gib": target_size_gib, **mix,
            "loss": "sum of KL(float || model) of each tensor quantized alone" if kl
            else "Hessian proxy x the fixtures' KL per unit of proxy for the tensor's role and position",
            "spearman_proxy_vs_kl": sens.spearman(), "sensitivity": sens.to_dict()}


def solve_ct_mix(cfg, sens, budget: int, shared_experts: bool = True) -> dict:
    """The allocation for `budget` bytes on measured per-tensor options `sens` (CTSpace): {"budget_bytes",
    "bytes", "bits_per_weight", "predicted_loss", "families", "unit_schemes", "ct_schemes"}. shared_experts: the
    quantized experts of all layers on one scheme (what transformers loads); False: each layer its own."""
    units = group_units(cfg, sens.units)
    choice = solve_one_expert_scheme(units, budget, sens.fixed_bytes, per_layer=not shared_experts)
    nbytes, loss = total(units, choice)
    nbytes += sens.fixed_bytes
    schemes = {m: choice[u] for u, members in units_of(cfg).items() for m in members}
    return {"budget_bytes": budget, "bytes": nbytes, "bits_per_weight": 8 * nbytes / sens.weights,
            "predicted_loss": loss, "families": families(choice), "unit_schemes": dict(sorted(choice.items())),
            "ct_schemes": dict(sorted(schemes.items()))}


def solve_one_expert_scheme(units: list[Unit], budget: int, fixed_bytes: int,
                            per_layer: bool = False) -> dict[str, str]:
    """mix_search.solve with the quantized experts of every layer on one scheme (see the module docstring): one
    solve per experts scheme (each experts unit restricted to it and bf16), the least predicted loss kept.
    per_layer: the unrestricted solve competes too (the restricted ones are valid per-layer mixes as well, and the
    greedy allocation can miss them: large expert units block each other's upgrades)."""
    experts = [u for u in units if u.name.endswith(".experts")]
    if not experts:
        return solve(units, budget, fixed_bytes)
    restricted = ((scheme, [Unit(u.name, u.shape, {t: v for t, v in u.options.items() if t in (scheme, FLOAT_SCHEME)})
                            if u in experts else u for u in units])
                  for scheme in SEARCHED if scheme != FLOAT_SCHEME and all(scheme in u.options for u in experts))
    best = solve_least_loss(([(None, units)] if per_layer else []) + list(restricted), budget, fixed_bytes)
    if best is None:
        raise TargetError(f"a budget of {budget} bytes is below every mix with one experts scheme")
    return best[0]


def families(choice: dict[str, str]) -> dict[str, dict[str, list[int]]]:
    """unit family -> scheme -> [layers] (the mix, readable)."""
    out: dict[str, dict[str, list[int]]] = {}
    for unit, t in sorted(choice.items(), key=lambda kv: (kv[0].split(".", 2)[2], int(kv[0].split(".")[1]))):
        out.setdefault(unit.split(".", 2)[2], {}).setdefault(t, []).append(int(unit.split(".")[1]))
    return out


def check_ct_schemes(cfg, schemes: dict[str, str], source: str = "mix", shared_experts: bool = True) -> dict[str, str]:
    """Validate {tensor name: scheme} (tensor names as in the checkpoint; a unit name such as
    `layers.0.self_attn.qkv` stands for all its tensors). Returns {tensor: scheme}. MixError naming `source`, the
    entry and the scheme for an unknown scheme, a tensor the model lacks or that compressed-tensors does not
    quantize, a group that does not divide the input width, a fused unit split across schemes, or (shared_experts)
    two layers' experts on different quantized schemes."""
    from gemmaquant.checkpoint import expected_shapes

    shapes = expected_shapes(cfg)
    units = units_of(cfg)
    out: dict[str, str] = {}
    for key, t in schemes.items():
        if not isinstance(t, str) or t.lower() not in SCHEMES:
            raise MixError(f"{source}: unknown compressed-tensors scheme {t!r} for {key!r}; valid: "
                           f"{', '.join(SCHEMES)}")
        t = t.lower()
        members = units.get(key) or ([key] if key in shapes else None)
        if members is None:
            raise MixError(f"{source}: tensor {key!r} does not exist in this model (names as in the checkpoint, "
                           f"e.g. {next(iter(shapes))!r}, or a unit, e.g. {next(iter(units))!r})")
        for name in members:
            if not any(name in m for m in units.values()):
                raise MixError(f"{source}: {key} is not a tensor the compressed-tensors export quantizes (norms, "
                               f"routers, embeddings and per_layer_model_projection stay bf16)")
            if not scheme_fits(t, shapes[name][-1]):
                raise MixError(f"{source}: {key!r} has {shapes[name][-1]} inputs, which {t}'s groups of "
                               f"{SCHEMES[t][1]} do not divide")
            out[name] = t
    expert_schemes = {out[m] for u, members in units.items() if u.endswith(".experts") for m in members
                      if m in out and out[m] != FLOAT_SCHEME}
    if shared_experts and len(expert_schemes) > 1:
        raise MixError(f"{source}: the experts of different layers are quantized with different schemes "
                       f"({', '.join(sorted(expert_schemes))}); transformers dequantizes all experts with one "
                       f"config group, so give every layer's experts one scheme (or bf16), or allow it "
                       f"(--per-layer-experts: vLLM only)")
    for unit, members in units.items():
        got = {out[m] for m in members if m in out}
        if len(got) > 1 or (got and any(m not in out for m in members)):
            named = {m: out.get(m, "(not named)") for m in members}
            raise MixError(f"{source}: {unit} is split across schemes ({', '.join(f'{m}: {s}' for m, s in named.items())}); "
                           f"{_WHY.get(unit.split('.', 2)[2], 'one module')} takes one scheme")
    return out


def read_ct_mix(path: str | os.PathLike, cfg, shared_experts: bool = True) -> dict[str, str]:
    """{tensor: scheme} from a mix file (what write_mix wrote for a compressed-tensors mix, or a plain
    {tensor or unit: scheme} object), checked against `cfg`: MixError naming the file and the first bad entry."""
    from gemmaquant.validate import read_utf8

    path = Path(path)
    try:
        data = json.loads(read_utf8(path, MixError, "mix file", missing="mix file not found"))
    except json.JSONDecodeError as e:
        raise MixError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "tensor_types" in data and "ct_schemes" not in data:
        raise MixError(f"{path}: a GGUF mix (tensor_types); --ct-mix reads compressed-tensors mixes (ct_schemes)")
    schemes = data.get("ct_schemes", data) if isinstance(data, dict) else None
    if not isinstance(schemes, dict):
        raise MixError(f"{path}: expected an object of tensor name -> scheme (or one with \"ct_schemes\")")
    return check_ct_schemes(cfg, {k: v for k, v in schemes.items() if k != "format"}, str(path), shared_experts)


def complete(cfg, schemes: dict[str, str], default: str, source: str, shared_experts: bool = True) -> dict[str, str]:
    """Every quantized tensor's scheme: those `schemes` names, the recipe's `default` grid for the others."""
    if default not in SCHEMES:
        raise MixError(f"{source}: the recipe's grid {default} is not a compressed-tensors scheme "
                       f"({', '.join(SCHEMES)}); name every tensor in the mix")
    full = {m: schemes.get(m, default) for members in units_of(cfg).values() for m in members}
    return check_ct_schemes(cfg, full, source, shared_experts)


__all__ = ["SCHEMES", "SEARCHED", "CTSpace", "choose_ct_mix", "check_ct_schemes", "read_ct_mix", "units_of",
           "group_units", "complete"]


def resolve_ct_mix(model, cfg, recipe, fmts, gguf_type, target_bpw, target_size, ct_mix, calib, out, progress,
                   flag: str, per_layer_experts: bool = False):
    """`--format safetensors` with --target-bpw / --target-size (a mix measured and solved) or --ct-mix FILE (read
    back): the recipe with the per-tensor schemes (`ct_schemes`), and the mix record. A finished or interrupted
    run's mix file in `out` for the same request is reused (workflow.resolve_mix does the same for GGUF)."""
    from gemmaquant.errors import UsageError
    from gemmaquant.recipe import Recipe

    if "gguf" in fmts:
        raise UsageError(f"{flag}: a compressed-tensors mix (int4 / int8 / bf16 per layer) has no GGUF file; use "
                         f"--format safetensors")
    if gguf_type is not None:
        raise UsageError(f"{flag} chooses compressed-tensors schemes; --gguf-type {gguf_type} names a GGUF grid")
    if recipe.method == "awq":
        raise UsageError(f"{flag}: AWQ folds scales across tensors of one mix; use --method gptq, imatrix or rtn")
    for what, v in (("--target-bpw", target_bpw), ("--target-size", target_size)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0 and v == v and v != float("inf")):
            raise UsageError(f"{what} {v}: must be a positive number")
    if ct_mix is not None:
        named = read_ct_mix(ct_mix, cfg, not per_layer_experts)
        schemes = complete(cfg, named, recipe.weight_format, str(ct_mix), not per_layer_experts)
        units = {unit_of(n): t for n, t in schemes.items()}
        mix = {"format": MIX_FORMAT, "source": str(ct_mix), "ct_schemes": schemes,
               "unit_schemes": dict(sorted(units.items())), "families": families(units)}
    else:
        request = {"target_bpw": target_bpw, "target_size_gib": target_size, "calibration": str(calib or
                   recipe.calibration), "method": recipe.method, "format": "compressed-tensors",
                   **({"per_layer_experts": True} if per_layer_experts else {})}
        saved = Path(out) / f"{Path(str(model)).name}-mix.json"
        mix = json.loads(saved.read_text()) if saved.is_file() else None
        if mix is None or mix.get("request") != request:
            mix = {"request": request, **choose_ct_mix(model, recipe, target_bpw=target_bpw,
                                                       target_size_gib=target_size, calib=calib, progress=progress,
                                                       shared_experts=not per_layer_experts)}
    return Recipe.from_dict({**recipe.to_dict(), "ct_schemes": mix["ct_schemes"]}), mix
