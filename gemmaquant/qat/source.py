"""A converted model as a *tensor source* for the exporters, and as the quantizer's on-disk work directory.

    packed = convert(model)
    src = export_source(model, tokenizer_dir="path/to/checkpoint")
    export_gguf(src, "model-Q4_0.gguf", type="Q4_0")                 # int4_g32_sym repacks losslessly as Q4_0
    export_compressed_tensors(src, "model-w4a16/", scheme="W4A16")   # and as pack-quantized W4A16 g32
    write_work_dir(src, "out/quantized")                             # QuantizedSource layout, any format
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from gemmaquant.qat.prepare import PACKED_ATTR, QATError, TOWER_PREFIXES, checkpoint_name, model_config


class ModelSource:
    """Tensor source (gemmaquant.export.source) over a model after `convert`: Packed values for the quantized
    weights, the model's own tensors for the rest (norms, router, embeddings)."""

    def __init__(self, model: nn.Module, packed: dict | None = None, source_dir: str | os.PathLike | None = None,
                 metadata: dict[str, str] | None = None):
        from gemmaquant.checkpoint import expected_shapes

        packed = packed if packed is not None else getattr(model, PACKED_ATTR, None)
        if packed is None:
            raise QATError("export_source: the model has no quantized values; call convert(model) first")
        self.config = model_config(model)
        self._packed = dict(packed)
        self._state = {}
        for k, v in model.state_dict().items():
            name = checkpoint_name(k)
            if not name.startswith(TOWER_PREFIXES):
                self._state.setdefault(name, v)
        self._names = list(expected_shapes(self.config))
        missing = [n for n in self._names if n not in self._packed and n not in self._state]
        if missing:
            raise QATError(f"export_source: the model lacks tensor {missing[0]!r}")
        if source_dir is None:
            guess = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
            source_dir = guess if guess and Path(guess).is_dir() else None
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.metadata = dict(metadata or {})

    def names(self) -> list[str]:
        return list(self._names)

    def quantized_names(self) -> set[str]:
        return set(self._packed)

    def get(self, name: str):
        if name in self._packed:
            return self._packed[name]
        return self._state[name].detach().cpu()  # host memory for the writers (the same tensor on the CPU)


def export_source(model: nn.Module, packed: dict | None = None, tokenizer_dir: str | os.PathLike | None = None,
                  metadata: dict[str, str] | None = None) -> ModelSource:
    """The exporters' view of a converted model; `tokenizer_dir` is the checkpoint directory with the tokenizer
    (found from a transformers model's name_or_path when it is a local directory)."""
    return ModelSource(model, packed, tokenizer_dir, metadata)


def write_work_dir(source, work: str | os.PathLike) -> Path:
    """Write a tensor source in the PTQ pipeline's work-directory layout (gemmaquant.quantized), so that
    `QuantizedSource(work)` reads it back with the exact Packed values - for every format, exportable or not."""
    from gemmaquant.quantized import save_atomic, save_layer, write_json_atomic

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = source.config
    values: dict[int, dict] = {}
    globals_ = {}
    for name in source.names():
        v = source.get(name)
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            values.setdefault(int(i), {})[rest] = v
        else:
            globals_[name] = v.detach().contiguous()
    save_atomic(globals_, work / "globals.safetensors")
    for i in range(cfg.num_hidden_layers):
        save_layer(work, i, values.get(i, {}), {"layer": i})
    state = {"config": cfg.to_hf_dict(), "source_dir": str(source.source_dir) if source.source_dir else None,
             "metadata": {k: str(v) for k, v in (source.metadata or {}).items()}}
    write_json_atomic(state, work / "state.json")
    return work


def dequantized_model(source):
    """gemmaquant's reference Gemma4 holding a tensor source's (dequantized) weights, fp32, eval mode."""
    from gemmaquant.model.gemma4 import Gemma4
    from gemmaquant.quantized import dequantize_value

    model = Gemma4(source.config)
    state = {n: dequantize_value(source.get(n)).float() for n in source.names()}
    model.load_state_dict(state, strict=True)
    return model.eval()

