"""Exporters: GGUF for llama.cpp and compressed-tensors safetensors for vLLM / transformers, and their readers.

    from gemmaquant.export import FloatSource, export_gguf, export_compressed_tensors
    export_gguf(FloatSource("ckpt/"), "model.gguf", type="Q4_K_M")          # llama-quantize-like RTN path
    export_compressed_tensors(source, "model-w4a16/", scheme="W4A16")       # pack-quantized int4, group 32
    gemmaquant.load("model.gguf")                                            # dequantized reference model
    load_transformers("model-w4a16/")       # transformers' AutoModelForCausalLM, MoE experts included

Both exporters take a *tensor source* (source.py). See docs/export.md.
"""

from gemmaquant.export.compressed_tensors import export_compressed_tensors
from gemmaquant.export.errors import ExportError
from gemmaquant.export.gguf import export_gguf
from gemmaquant.export.gguf_mix import gguf_mix_plan
from gemmaquant.export.source import FloatSource, TensorSource
from gemmaquant.export.transformers_loader import load_transformers

__all__ = ["ExportError", "FloatSource", "TensorSource", "export_compressed_tensors", "export_gguf", "gguf_mix_plan",
           "load_transformers"]
