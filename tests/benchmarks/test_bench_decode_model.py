"""benchmarks/bench_decode_model.py: the smoke run writes its JSON / markdown with the ratios to bf16, and the
real 26B-A4B / 31B layer steps run on a (fake) CUDA device at their real widths with every tensor on the device."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_decode_model as bdm  # noqa: E402
from tests.device.fake_cuda import fake_cuda  # noqa: E402


def test_smoke_run_writes_rows_for_every_format(tmp_path):
    assert bdm.main(["--smoke", "--models", "tiny-dense", "--batches", "2", "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode_model_smoke_cpu.json").read_text())
    rows = {r["format"]: r for r in data["rows"]}
    assert set(rows) == set(bdm.FORMATS) and data["meta"]["device_type"] == "cpu"
    assert rows["bf16"]["speedup_vs_bf16"] == 1.0
    for r in rows.values():
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(2 / r["step_ms"] * 1e3)
        assert r["sliding_layer_ms"] and r["full_layer_ms"]
    assert "| tiny-dense | int4 | 2 |" in (tmp_path / "decode_model_smoke_cpu.md").read_text()


@pytest.mark.parametrize("model,kind", [("26b-a4b", "sliding_attention"), ("26b-a4b", "full_attention"),
                                        ("31b", "full_attention")])
@pytest.mark.parametrize("fmt", ["bf16", "int4", "int8"])
def test_real_geometry_step_on_fake_cuda(model, kind, fmt):
    """Shapes only (FakeTensorMode): q/k/v/o, the cache, the MLP and the experts at the real widths fit together,
    and nothing is left on the CPU; the Triton ops answer with their fake implementations."""
    cfg = bdm.model_config(model)
    with fake_cuda():
        step, nbytes = bdm.build_step(cfg, kind, fmt, 2, 64, torch.device("cuda"))
        y = step()
    assert y.shape == (2, cfg.hidden_size) and y.device.type == "cuda" and y.dtype == torch.bfloat16
    assert nbytes > 0


def test_layer_shapes_follow_the_config():
    cfg = bdm.model_config("31b")
    full, sliding = bdm.layer_shapes(cfg, "full_attention"), bdm.layer_shapes(cfg, "sliding_attention")
    assert "self_attn.v_proj.weight" not in full and "self_attn.v_proj.weight" in sliding  # k_eq_v full layers
    assert full["self_attn.q_proj.weight"] == (cfg.num_attention_heads * cfg.global_head_dim, cfg.hidden_size)
