"""Helpers to build random Gemma 4 models and their transformers twins (used by tests and benchmarks)."""

from __future__ import annotations

import torch

from gemmaquant.config import Gemma4Config
from gemmaquant.model.gemma4 import Gemma4


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter and persistent buffer so that no formula hides behind an identity init:
    norm weights 1 +- 0.3, router/per-expert scales and layer_scalar in [0.6, 1.4), matrices N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if "layer_scalar" in n]:
        if t.ndim <= 1:
            t.copy_(0.6 + 0.8 * torch.rand(t.shape, generator=g))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return model


def random_model(cfg: Gemma4Config, seed: int = 0, dtype=torch.float32) -> Gemma4:
    return randomize_(Gemma4(cfg), seed).to(dtype).eval()


def hf_text_config(cfg: Gemma4Config):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**cfg.to_hf_dict())
