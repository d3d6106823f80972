"""End to end on a trained fixture: GPTQ and AWQ beat round-to-nearest on held-out KL divergence (issue #4, item 8).

The full table, on every fixture, is benchmarks/bench_quality.py -> docs/quality.md; this is its smallest slice,
with margins well inside what that table measures (AWQ/RTN KL 0.72-0.96, GPTQ/RTN 0.5-0.7).
"""

from __future__ import annotations

import pytest
import torch

import gemmaquant
from gemmaquant.eval.metrics import compare_logits, heldout_ids
from gemmaquant.hub import resolve
from gemmaquant.quantize import quantize
from gemmaquant.quantized import QuantizedSource
from gemmaquant.recipe import Recipe
from gemmaquant.workflow import default_heldout


def heldout_kl(fixture, method, fmt, tmp_path) -> float:
    r = Recipe.from_dict({"method": method, "weight_format": fmt, "n_samples": 16, "seq_len": 256})
    res = quantize(fixture, r, out=tmp_path / method, progress=False)
    model = gemmaquant.load(fixture)
    model.load_state_dict({k: v.float() for k, v in QuantizedSource(res.work_dir).dequantized_state().items()})
    ref = gemmaquant.load(fixture)
    return compare_logits(ref, model, heldout_ids(resolve(fixture), default_heldout(), 16, 128))["kl_mean"]


@pytest.mark.parametrize("fmt", ["int4_g32_sym", "int3_g32_sym"])
def test_gptq_and_awq_beat_rtn_on_tiny_edge(tmp_path, fmt):
    torch.set_num_threads(1)
    kl = {m: heldout_kl("tiny-edge", m, fmt, tmp_path) for m in ("rtn", "gptq", "awq")}
    assert kl["gptq"] < 0.8 * kl["rtn"], kl
    assert kl["awq"] < 0.95 * kl["rtn"], kl
