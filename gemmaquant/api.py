"""The library entry points: load a Gemma 4 model from any of the forms gemmaquant reads or writes."""

from __future__ import annotations

import os

import torch

from gemmaquant.checkpoint import Checkpoint, load_state_into
from gemmaquant.hub import resolve
from gemmaquant.model.gemma4 import Gemma4, rope_inv_freqs


def load(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Gemma4:
    """Load a Gemma 4 text model as the reference `Gemma4` module.

    `model` is an alias (`tiny-dense`, `26b-a4b`, ...), a Hugging Face checkpoint directory (either naming,
    sharded or not), a GGUF file, or a compressed-tensors directory written by gemmaquant. Quantized inputs
    come back dequantized: their logits equal the model built from the dequantized weights.
    """
    path = resolve(model)
    if path.is_file() and path.suffix == ".gguf":
        from gemmaquant.export.gguf_reader import load_gguf

        return load_gguf(path, dtype=dtype, device=device)
    from gemmaquant.export.compressed_tensors_reader import is_compressed_tensors, load_compressed_tensors

    if path.is_dir() and is_compressed_tensors(path):
        return load_compressed_tensors(path, dtype=dtype, device=device)
    ckpt = Checkpoint(path)
    with torch.device("meta"):
        m = Gemma4(ckpt.config)
    load_state_into(m, ckpt, dtype=dtype, device=device)
    for kind, inv in rope_inv_freqs(m.config).items():  # non-persistent buffers are not in checkpoints
        m.register_buffer(f"inv_freq_{kind}", inv.to(device), persistent=False)
    return m.eval()
