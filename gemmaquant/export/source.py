"""What the exporters read: a *tensor source*, and `FloatSource`, the source over a float checkpoint.

The protocol (the quantizer's `gemmaquant.quantized.QuantizedSource` implements it too):

    config: Gemma4Config
    source_dir: Path | None          the original checkpoint dir: tokenizer files, generation_config, towers
    metadata: dict[str, str]         recipe, calibration hash, ... (GGUF `gemmaquant.*` keys, safetensors metadata)
    names() -> list[str]             text tensor names in checkpoint order, prefix stripped
    get(name) -> Tensor | Packed | list[Packed]
        a float tensor, a `Packed` for a 2-D weight, or one `Packed` per expert for the fused expert tensors
        `layers.i.experts.gate_up_proj` [E, 2*Ie, H] and `layers.i.experts.down_proj` [E, H, Ie]

Exporters call `get` once per name, in `names()` order, and drop the value after writing it, so a source that
reads lazily keeps the export's memory at one tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from gemmaquant.checkpoint import Checkpoint, CheckpointError
from gemmaquant.config import Gemma4Config
from gemmaquant.validate import check_float_checkpoint, require_finite


@runtime_checkable
class TensorSource(Protocol):
    config: Gemma4Config
    source_dir: Path | None
    metadata: dict[str, str]

    def names(self) -> list[str]: ...

    def get(self, name: str): ...


class FloatSource:
    """A float Hugging Face checkpoint as a tensor source: every value is the stored tensor.

    Given to `export_gguf(..., type="Q4_K_M")` it is quantized by round-to-nearest onto the types
    `gguf_mix_plan` picks (the llama-quantize path); given to `export_compressed_tensors` it is quantized by RTN
    onto the scheme's grid.
    """

    def __init__(self, checkpoint: Checkpoint | str | os.PathLike, metadata: dict[str, str] | None = None):
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        check_float_checkpoint(self.checkpoint)  # names, shapes and dtypes, before the exporter starts
        self.config = self.checkpoint.config
        self.source_dir: Path | None = self.checkpoint.path
        self.metadata = dict(metadata or {})

    def names(self) -> list[str]:
        return self.checkpoint.text_names()

    def get(self, name: str) -> torch.Tensor:
        t = self.checkpoint.get(name)
        full = self.checkpoint.full_name(name)
        require_finite(t, full, self.checkpoint.path / self.checkpoint.weight_map[full], CheckpointError)
        return t

    def __repr__(self) -> str:
        return f"FloatSource({str(self.checkpoint.path)!r})"
