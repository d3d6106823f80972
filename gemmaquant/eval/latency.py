"""Prefill and decode throughput of a model on the device in use. Compare models side by side in one run; these
numbers are for reports and benchmarks, never for tests."""

from __future__ import annotations

import platform
import time

import torch

from gemmaquant.model.gemma4 import KVCache


@torch.no_grad()
def measure_latency(model, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    model(ids[:, :8])  # warm-up
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        cache = KVCache(model.config)
        t0 = time.perf_counter()
        logits = model(ids, cache=cache)
        t1 = time.perf_counter()
        nxt = logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            nxt = model(nxt, cache=cache)[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"prefill_tokens_per_s": prompt_len / best_prefill, "decode_tokens_per_s": new_tokens / best_decode,
            "device": name, "threads": torch.get_num_threads(), "prompt_len": prompt_len, "new_tokens": new_tokens}
