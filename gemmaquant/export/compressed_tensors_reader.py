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

import json
import os
from pathlib import Path

import torch

from gemmaquant.checkpoint import Checkpoint, CheckpointError, expected_shapes
from gemmaquant.config import Gemma4Config
from gemmaquant.export.compressed_tensors import EXPERTS, is_quantized
from gemmaquant.export.ct_pack import dequantize, unpack_int32
from gemmaquant.export.errors import ExportError


class CompressedTensorsError(ExportError):
    pass


def quantization_config(raw: dict) -> dict:
    """The quantization_config of an HF config dict (top level, or text_config's for a multimodal export)."""
    return raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config") or {}


def is_compressed_tensors(path: Path) -> bool:
    """True for a checkpoint directory whose config.json declares quant_method compressed-tensors."""
    cfg = Path(path) / "config.json"
    return (cfg.is_file()
            and quantization_config(json.loads(cfg.read_text())).get("quant_method") == "compressed-tensors")


def _bits(qc: dict, path: Path) -> int:
    if qc.get("format") != "pack-quantized":
        raise CompressedTensorsError(f"{path}: compressed-tensors format {qc.get('format')!r} is not read "
                                     f"(gemmaquant writes pack-quantized)")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not groups[0].get("weights") or not groups[0]["weights"].get("symmetric", False):
        raise CompressedTensorsError(f"{path}: expected one symmetric weight-only config group")
    return int(groups[0]["weights"]["num_bits"])


def _weight(ckpt: Checkpoint, base: str, bits: int) -> torch.Tensor:
    shape = [int(x) for x in ckpt.get(f"{base}.weight_shape").tolist()]
    q = unpack_int32(ckpt.get(f"{base}.weight_packed"), bits, shape[1])
    if list(q.shape) != shape:
        raise CompressedTensorsError(f"{ckpt.path}: {base}.weight_packed unpacks to {list(q.shape)}, "
                                     f"weight_shape says {shape}")
    return dequantize(q, ckpt.get(f"{base}.weight_scale"))


def load_compressed_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu"):
    from gemmaquant.model.gemma4 import Gemma4, rope_inv_freqs

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    bits = _bits(quantization_config(raw), path)
    cfg = Gemma4Config.from_hf_dict(raw, source=str(path / "config.json"))
    ckpt = Checkpoint(path)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        try:
            if name.endswith(EXPERTS):
                layer = name.rsplit(".experts.", 1)[0]
                projs = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
                w = torch.stack([torch.cat([_weight(ckpt, f"{layer}.experts.{e}.{p}", bits) for p in projs])
                                 for e in range(cfg.num_experts)])
            elif is_quantized(name):
                w = _weight(ckpt, name.removesuffix(".weight"), bits)
            elif name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            else:
                w = ckpt.get(name)
        except CheckpointError as e:
            raise CompressedTensorsError(str(e)) from None
        if tuple(w.shape) != tuple(shape):
            raise CompressedTensorsError(f"{path}: {name} has shape {list(w.shape)}, expected {list(shape)}")
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
