"""Read a compressed-tensors checkpoint (pack-quantized int4 / int8, as written by export_compressed_tensors) back
as the reference `Gemma4` with dequantized weights: `gemmaquant.load(dir)` for such a directory.

Dequantization is the exact `w = q * scale` (see ct_pack.py), cast to the requested dtype: in float32 it is what
transformers runs when it loads the export in float32, in bf16 what vLLM and compressed-tensors compute.
Per-expert tensors (`layers.i.experts.{e}.{gate,up,down}_proj.*`) are fused back into `experts.gate_up_proj` /
`experts.down_proj`.

transformers has no checkpoint conversion for Gemma 4's per-expert names (its Gemma4 experts are fused parameters):
load an MoE export with `gemmaquant.export.load_transformers(dir)` (transformers_loader.py), which registers the
merge for that call and fails loudly on weights transformers did not load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gemmaquant.checkpoint import Checkpoint, CheckpointError, expected_shapes, read_json
from gemmaquant.export.compressed_tensors import EXPERTS, is_quantized
from gemmaquant.export.ct_pack import dequantize, unpack_int32
from gemmaquant.export.errors import ExportError


class CompressedTensorsError(ExportError):
    pass


def quantization_config(raw: dict) -> dict:
    """The quantization_config of an HF config dict (top level, or text_config's for a multimodal export)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    qc = raw.get("quantization_config") or text.get("quantization_config") or {}
    return qc if isinstance(qc, dict) else {}


def is_compressed_tensors(path: Path) -> bool:
    """True for a checkpoint directory whose config.json declares quant_method compressed-tensors."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = quantization_config(read_json(cfg, "config"))
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _check_groups(qc: dict, path: Path) -> None:
    """Every config group a symmetric weight-only int4 / int8 pack-quantized scheme (what gemmaquant writes)."""
    if qc.get("format") != "pack-quantized":
        raise CompressedTensorsError(f"{path}: compressed-tensors format {qc.get('format')!r} is not read "
                                     f"(gemmaquant writes pack-quantized)")
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise CompressedTensorsError(f"{path}: quantization_config has no config_groups")
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict) or \
                not g["weights"].get("symmetric", False) or not isinstance(g.get("targets"), list):
            raise CompressedTensorsError(f"{path}: expected symmetric weight-only config groups with targets")
        bits = g["weights"].get("num_bits")
        if bits not in (4, 8) or isinstance(bits, bool):
            raise CompressedTensorsError(f"{path}: quantization_config num_bits = {bits!r}; gemmaquant reads 4 or 8")


def _bits(qc: dict, path: Path) -> int:
    """The bits of a single-scheme export (one config group); CompressedTensorsError for a per-layer mix."""
    _check_groups(qc, path)
    groups = list(qc["config_groups"].values())
    if len(groups) != 1:
        raise CompressedTensorsError(f"{path}: expected one symmetric weight-only config group, found {len(groups)} "
                                     f"(a per-layer mix)")
    return groups[0]["weights"]["num_bits"]


def _module_bits(qc: dict, ckpt: Checkpoint, base: str) -> int | None:
    """The bits of the scheme vLLM gives module `base` (our name, without `.weight`), None when it is unquantized
    (gemmaquant.export.ct_targets.scheme_of on the module's name in the file)."""
    from gemmaquant.export.ct_targets import scheme_of

    w = scheme_of(qc, ckpt.full_name(base))
    return None if w is None else w["num_bits"]


def read_packed(ckpt: Checkpoint, name: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], scale [N, G]) of one packed weight, checked: int32 words, a 2-element weight_shape the
    packed words hold, a finite float scale whose groups divide K. CompressedTensorsError naming the tensor."""
    where = ckpt.path / ckpt.weight_map.get(ckpt.full_name(f"{name}.weight_packed"), "")
    base = ckpt.full_name(name)  # in messages: the name in the file
    try:
        packed, shape_t, scale = (ckpt.get(f"{name}.{k}") for k in ("weight_packed", "weight_shape", "weight_scale"))
    except CheckpointError as e:
        raise CompressedTensorsError(str(e)) from None
    shape = [int(x) for x in shape_t.tolist()] if shape_t.dim() == 1 and not shape_t.is_floating_point() else None
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise CompressedTensorsError(f"{where}: {base}.weight_packed is {packed.dtype} {list(packed.shape)}, "
                                     f"expected 2-D int32 words")
    per = 32 // bits  # codes per int32 word
    if shape is None or len(shape) != 2 or shape[0] != packed.shape[0] or shape[1] <= 0 or \
            -(-shape[1] // per) != packed.shape[1]:
        raise CompressedTensorsError(f"{where}: {base}.weight_shape {shape_t.tolist()} does not match "
                                     f"{base}.weight_packed {list(packed.shape)} at {bits} bits")
    if not scale.is_floating_point() or scale.dim() != 2 or scale.shape[0] != shape[0] or scale.shape[1] == 0 or \
            shape[1] % scale.shape[1] or not bool(torch.isfinite(scale).all()):
        raise CompressedTensorsError(f"{where}: {base}.weight_scale ({scale.dtype} {list(scale.shape)}) is not a "
                                     f"finite float scale of {shape[0]} rows dividing {shape[1]} inputs")
    return unpack_int32(packed, bits, shape[1]), scale


def _weight(ckpt: Checkpoint, base: str, qc: dict) -> torch.Tensor:
    bits = _module_bits(qc, ckpt, base)
    if bits is None:
        return ckpt.get(f"{base}.weight")
    return dequantize(*read_packed(ckpt, base, bits))


def load_compressed_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu"):
    from gemmaquant.model.gemma4 import Gemma4, rope_inv_freqs

    path = Path(path)
    ckpt = Checkpoint(path)
    raw, cfg = ckpt.raw_config, ckpt.config
    qc = quantization_config(raw)
    _check_groups(qc, path)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        try:
            if name.endswith(EXPERTS) and _module_bits(qc, ckpt, name.rsplit(".experts.", 1)[0] + ".experts.0.gate_proj") \
                    is None:  # unquantized experts (a per-layer mix's bf16 choice): fused, as in the source
                w = ckpt.get(name)
            elif name.endswith(EXPERTS):
                layer = name.rsplit(".experts.", 1)[0]
                projs = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
                w = torch.stack([torch.cat([_weight(ckpt, f"{layer}.experts.{e}.{p}", qc) for p in projs])
                                 for e in range(cfg.num_experts)])
            elif is_quantized(name):
                w = _weight(ckpt, name.removesuffix(".weight"), qc)
            elif name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            else:
                w = ckpt.get(name)
        except CheckpointError as e:
            raise CompressedTensorsError(str(e)) from None
        if tuple(w.shape) != tuple(shape):
            raise CompressedTensorsError(f"{path}: {name} has shape {list(w.shape)}, expected {list(shape)}")
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise CompressedTensorsError(f"{path}: {name} contains NaN or Inf")
        state[name] = w.to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = Gemma4(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    for kind, inv in rope_inv_freqs(cfg).items():
        model.register_buffer(f"inv_freq_{kind}", inv.to(device), persistent=False)
    return model.eval()


def register_transformers_gemma4_experts() -> None:
    """Teach transformers, for the rest of the process, to merge Gemma 4's per-expert checkpoint names into its fused
    expert parameters. Idempotent. Prefer `gemmaquant.export.load_transformers(dir)`: registered globally, the
    merge also runs backwards when a Gemma 4 model built in the process (from_config, not from_pretrained) is saved,
    and `save_pretrained` then writes its experts unfused."""
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    from gemmaquant.export.transformers_loader import MODEL_TYPES, expert_mapping

    for t in MODEL_TYPES:
        if get_checkpoint_conversion_mapping(t) is None:
            register_checkpoint_conversion_mapping(t, expert_mapping())
