"""The quantization_config of a per-layer compressed-tensors mix, and the target matching consumers replay on it.

One config_group per scheme (int4 g32 / g64 / g128 symmetric, int8 channel), its `targets` `re:` regexes naming
exactly that scheme's modules, one regex per unit kind with the layers listed, e.g.
    re:.*\\.layers\\.(0|3)\\.self_attn\\.(q|k|v)_proj$
    re:.*\\.layers\\.(1)\\.(moe\\.)?experts\\.\\d+\\.(gate|up|down)_proj$
The regexes match the checkpoint's / transformers' module names (`model.layers.1.experts.0.gate_proj`) and vLLM's
(`model.layers.1.moe.experts.0.gate_proj`, which `CompressedTensorsMoEMethod.get_moe_method` looks up for expert
0 of each FusedMoE; vLLM's multimodal prefix `language_model.model.` too: the regexes start with `.*`). bf16 units
join `ignore` the same way. No target is the class name "Linear": vLLM would match every module's class against
it before the fused shards are looked at.

`scheme_of(qc, module)` replays vLLM's lookup (vllm/model_executor/layers/quantization/compressed_tensors/utils.py
`should_ignore_layer`, `find_matched_target`: the ignore list first, then the first target, in config order,
equal to the name or a `re:` regex `re.match`ing it, then the class name) on an unfused module name; the reader
uses it to dequantize each module with its own scheme.
"""

from __future__ import annotations

import re

from gemmaquant.ct_mix import SCHEMES, UNITS

# unit kind -> the module-name regex tail (after `layers\.(i|j)\.`)
_TAILS = {"self_attn.qkv": r"self_attn\.(q|k|v)_proj$", "self_attn.o_proj": r"self_attn\.o_proj$",
          "mlp.gate_up": r"mlp\.(gate|up)_proj$", "mlp.down_proj": r"mlp\.down_proj$",
          "experts": r"(moe\.)?experts\.\d+\.(gate|up|down)_proj$",
          "per_layer_input_gate": r"per_layer_input_gate$", "per_layer_projection": r"per_layer_projection$"}
assert set(_TAILS) == set(UNITS)


def weights_args(scheme: str) -> dict:
    bits, group = SCHEMES[scheme]
    return {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False, "actorder": None,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {},
            "strategy": "group" if group else "channel", "group_size": group}


def unit_targets(units: list[str]) -> list[str]:
    """`re:` targets matching exactly the modules of these units (names as ct_mix.units_of gives them)."""
    by_kind: dict[str, list[int]] = {}
    for u in units:
        _, i, kind = u.split(".", 2)
        by_kind.setdefault(kind, []).append(int(i))
    return [f"re:.*\\.layers\\.({'|'.join(map(str, sorted(ls)))})\\.{_TAILS[kind]}"
            for kind, ls in sorted(by_kind.items(), key=lambda kv: list(_TAILS).index(kv[0]))]


def mix_quantization_config(unit_schemes: dict[str, str], base_ignore: list[str]) -> dict:
    """quantization_config for {unit: scheme}: a config_group per quantized scheme, the bf16 units in `ignore`."""
    groups = {}
    for scheme in (s for s in SCHEMES if s != "bf16"):
        units = [u for u, s in unit_schemes.items() if s == scheme]
        if units:
            groups[f"group_{len(groups)}"] = {"targets": unit_targets(units), "weights": weights_args(scheme),
                                              "input_activations": None, "output_activations": None,
                                              "format": "pack-quantized"}
    ignore = list(base_ignore) + unit_targets([u for u, s in unit_schemes.items() if s == "bf16"])
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def _matches(name: str, target: str, check_contains: bool = False) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if check_contains:
        return target.lower() in name.lower()
    return target == name


def scheme_of(qc: dict, module: str, cls: str = "Linear") -> dict | None:
    """The `weights` args vLLM gives the (unfused) module `module` of class `cls` under quantization_config `qc`,
    or None when it runs unquantized (ignored, or no target matches)."""
    if any(_matches(module, t) for t in qc.get("ignore") or []):
        return None
    targets = [(t, g) for g in (qc.get("config_groups") or {}).values() for t in g.get("targets") or []]
    for t, g in targets:
        if _matches(module, t):
            return g.get("weights")
    for t, g in targets:
        if _matches(cls, t, check_contains=True):
            return g.get("weights")
    return None
