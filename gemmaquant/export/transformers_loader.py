"""Load a gemmaquant compressed-tensors export in transformers, MoE included, or fail loudly.

    from gemmaquant.export import load_transformers
    model = load_transformers("out/26b-int4/safetensors", dtype=torch.bfloat16)   # AutoModelForCausalLM

Why a loader: the export writes the experts unfused, one quantized Linear per expert
(`layers.{i}.experts.{e}.{gate,up,down}_proj.weight_packed`), the layout vLLM's Gemma 4 loader and llm-compressor
use, because compressed-tensors quantizes `Linear` modules only. transformers' Gemma 4 holds its experts as two
fused 3-D parameters (`experts.gate_up_proj` [E, 2*Ie, H], `experts.down_proj` [E, H, Ie]) and merges per-expert
checkpoint names into them only through a conversion mapping registered for the model type, which transformers
(5.25) ships for Qwen-style MoE models but not for Gemma 4. So a plain `AutoModelForCausalLM.from_pretrained(dir)`
on an MoE export initializes the experts at random and only logs a warning (MISSING / UNEXPECTED keys).
Dense exports load plainly.

`load_transformers` registers the merge (decompress every expert, stack, concatenate gate and up) for the duration
of the call only (registered for good, transformers also runs it backwards when it saves a Gemma 4 model built in
the process, writing that model's experts unfused), and raises if transformers reports any weight it did not find
or could not use.
"""

from __future__ import annotations

import contextlib
import os

from gemmaquant.export.compressed_tensors_reader import CompressedTensorsError

MODEL_TYPES = ("gemma4_text",)  # the text model: also the language model inside Gemma4ForConditionalGeneration


def expert_mapping():
    """transformers' conversion: per-expert checkpoint names -> the fused expert parameters (with
    compressed-tensors, transformers decompresses each expert first)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    return [WeightConverter(source_patterns=["experts.*.gate_proj.weight", "experts.*.up_proj.weight"],
                            target_patterns="experts.gate_up_proj",
                            operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
            WeightConverter(source_patterns="experts.*.down_proj.weight", target_patterns="experts.down_proj",
                            operations=[MergeModulelist(dim=0)])]


@contextlib.contextmanager
def gemma4_expert_mapping():
    """The per-expert merge registered with transformers inside the block, as it was before afterwards (a mapping
    registered by the caller stays)."""
    from transformers import conversion_mapping as cm

    added = [t for t in MODEL_TYPES if cm.get_checkpoint_conversion_mapping(t) is None]
    for t in added:
        cm.register_checkpoint_conversion_mapping(t, expert_mapping())
    try:
        yield
    finally:
        for t in added:  # transformers has no public unregister: undo what register_* did
            cm._checkpoint_conversion_mapping_cache.pop(t, None)
            cm.USER_REGISTERED_MAPPINGS.discard(t)


def load_transformers(path: str | os.PathLike, **from_pretrained_kwargs):
    """`transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)` for a compressed-tensors export of
    gemmaquant (dense or MoE). Raises CompressedTensorsError when transformers reports weights missing from the
    checkpoint (it would initialize them at random), unexpected or of another shape."""
    from transformers import AutoModelForCausalLM

    _refuse_per_layer_expert_schemes(path)
    with gemma4_expert_mapping():
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **from_pretrained_kwargs)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        text = "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, v[:3]))}"
                         + (", ..." if len(v) > 3 else "") for k, v in problems.items())
        raise CompressedTensorsError(f"{path}: transformers did not load every weight ({text}); it would have "
                                     f"initialized the missing ones at random")
    return model


def _refuse_per_layer_expert_schemes(path) -> None:
    """transformers (5.x, `get_experts_scheme`) dequantizes every layer's experts with the first config group whose
    `re:` targets mention experts: a per-layer mix whose experts use two schemes (gemmaquant --per-layer-experts,
    what vLLM loads) would load wrong weights without a word. Refused here."""
    from pathlib import Path

    from gemmaquant.checkpoint import read_json
    from gemmaquant.export.compressed_tensors_reader import quantization_config

    cfg = Path(path) / "config.json"
    qc = quantization_config(read_json(cfg, "config")) if cfg.is_file() else {}
    groups = [g for g in (qc.get("config_groups") or {}).values()
              if any(str(t).startswith("re:") and "experts" in str(t) for t in g.get("targets") or [])]
    if len(groups) > 1:
        raise CompressedTensorsError(f"{path}: its experts are quantized with {len(groups)} schemes (a per-layer "
                                     f"mix for vLLM); transformers dequantizes all experts with one, so it cannot "
                                     f"load this export correctly")
