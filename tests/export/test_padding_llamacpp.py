"""Zero-padded MLP widths in stock llama.cpp: a model with 26B-A4B's odd widths (dense 2112, experts 704) padded
to 2304 / 768 gives llama.cpp's logits bit for bit equal to the unpadded file's, in F32 and through the quantize
pipeline in Q8_0 (the 32-blocks of the real columns are quantized alike; the padded ones are zero); our reader of
the padded file gives the unpadded model's logits. Needs LLAMA_CPP_DIR (see tests/export/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import gemmaquant
from gemmaquant.checkpoint import save_checkpoint
from gemmaquant.config import FULL, SLIDING, Gemma4Config
from gemmaquant.export import FloatSource, export_gguf
from gemmaquant.model.testing import random_model
from gemmaquant.padding import PaddedSource

pytestmark = pytest.mark.llamacpp


def _odd_widths() -> Gemma4Config:
    # llama.cpp's constraints for a fixture: a sliding layer, global_head_dim != head_dim
    return Gemma4Config(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
                        global_head_dim=128, sliding_window=16, final_logit_softcapping=30.0,
                        layer_types=(SLIDING, SLIDING, SLIDING, FULL), max_position_embeddings=1024,
                        intermediate_size=2112, num_key_value_heads=2, num_global_key_value_heads=1,
                        attention_k_eq_v=True, hidden_size_per_layer_input=0, enable_moe_block=True,
                        num_experts=4, top_k_experts=2, moe_intermediate_size=704)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizer_dir):
    model = random_model(_odd_widths(), seed=1)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("odd") / "ckpt", dtype=torch.float32,
                                  tokenizer_dir=small_tokenizer_dir)


def _ids() -> torch.Tensor:
    return torch.randint(5, 400, (3, 40), generator=torch.Generator().manual_seed(0))  # > sliding window (16)


def test_f32_padded_equals_unpadded_in_llamacpp(checkpoint, llama_cpp, tmp_path):
    import gguf

    model, ckpt = checkpoint
    plain = export_gguf(FloatSource(ckpt), tmp_path / "plain.gguf", type="F32")
    padded = export_gguf(PaddedSource(FloatSource(ckpt), ("mlp", "experts")), tmp_path / "padded.gguf", type="F32")
    r = gguf.GGUFReader(padded)
    assert int(r.fields["gemma4.feed_forward_length"].parts[-1][0]) == 2304
    assert int(r.fields["gemma4.expert_feed_forward_length"].parts[-1][0]) == 768
    ids = _ids()
    a, b = llama_cpp.logits(plain, ids, tmp_path), llama_cpp.logits(padded, ids, tmp_path)
    assert torch.equal(a, b), (a - b).abs().max()
    with torch.no_grad():
        ref, ours = model(ids), gemmaquant.load(padded)(ids)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5 * ref.abs().max().item()), (ours - ref).abs().max()


def test_q8_0_pipeline_padded_equals_unpadded_in_llamacpp(checkpoint, llama_cpp, tmp_path):
    """The quantize pipeline with pad_to_block (RTN onto Q8_0, whose absmax blocks do not see the padding): the
    same llama.cpp logits as the unpadded run's file, and the same logits in our reader."""
    from gemmaquant.quantize import quantize
    from gemmaquant.recipe import Recipe
    from gemmaquant.workflow import export_outputs

    _, ckpt = checkpoint
    files = {}
    for pad in (None, ("mlp", "experts")):
        r = Recipe(method="rtn", gguf_type="Q8_0", pad_to_block=pad, n_samples=2, seq_len=32)
        out = tmp_path / ("padded" if pad else "plain")
        res = quantize(ckpt, r, out=out, progress=False)
        files[pad] = export_outputs(res.work_dir, out, "odd", r, ("gguf",))["gguf"]
    ids = _ids()
    a = llama_cpp.logits(files[None], ids, tmp_path)
    b = llama_cpp.logits(files[("mlp", "experts")], ids, tmp_path)
    assert torch.equal(a, b), (a - b).abs().max()
    with torch.no_grad():
        x, y = gemmaquant.load(files[None])(ids), gemmaquant.load(files[("mlp", "experts")])(ids)
    assert torch.allclose(x, y, rtol=0, atol=1e-5 * x.abs().max().item()), (x - y).abs().max()
