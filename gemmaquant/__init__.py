"""gemmaquant: exact quantization of Google's Gemma 4 (E2B, E4B, 26B-A4B, 31B) to GGUF and compressed-tensors."""

from gemmaquant.api import load
from gemmaquant.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from gemmaquant.config import VARIANTS, Gemma4Config, get_variant
from gemmaquant.errors import GemmaquantError
from gemmaquant.model.gemma4 import Gemma4, KVCache
from gemmaquant.quantize import quantize  # the function; the module stays importable as gemmaquant.quantize
from gemmaquant.recipe import Recipe

__all__ = ["load", "Checkpoint", "CheckpointError", "save_checkpoint", "Gemma4Config", "VARIANTS", "get_variant",
           "Gemma4", "KVCache", "quantize", "Recipe", "GemmaquantError", "qat"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`gemmaquant.qat` after a plain `import gemmaquant`, imported on first use."""
    if name == "qat":
        import importlib

        return importlib.import_module("gemmaquant.qat")
    raise AttributeError(f"module 'gemmaquant' has no attribute {name!r}")
