"""inspect_file reports every tensor's type and size, bits per weight and the metadata of both export formats."""

import re

import pytest

from gemmaquant.export import ExportError, FloatSource, export_compressed_tensors, export_gguf
from gemmaquant.export.inspect import inspect_file
from gemmaquant.fixtures import FIXTURES


def test_inspect_gguf(tmp_path):
    src = FloatSource(FIXTURES["tiny-moe"], metadata={"recipe": "rtn-test"})
    out = export_gguf(src, tmp_path / "m.gguf", type="BF16")
    text = inspect_file(out)
    assert "general.architecture = gemma4" in text and "gemmaquant.recipe = rtn-test" in text
    assert re.search(r"blk\.0\.ffn_gate_up_exps\.weight\s+BF16\s+8x256x160\s+.*16\.00", text), text[-2000:]
    assert re.search(r"blk\.0\.ffn_gate_inp\.weight\s+F32\s+8x160", text)
    assert re.search(r"^\s+BF16\s+[\d,]+\s+.*16\.00$", text, re.M) and re.search(r"^\s+total\s", text, re.M)
    assert "tokenizer.ggml.tokens = [4096 items" in text and "\n  tokenizer.chat_template = '" in text


def test_inspect_compressed_tensors(tmp_path):
    out = export_compressed_tensors(FloatSource(FIXTURES["tiny-dense"]), tmp_path / "ct", scheme="W4A16")
    text = inspect_file(out)
    assert "4-bit symmetric int, strategy group, group_size 32" in text
    # int4 codes + one bf16 scale per 32 weights: 4 + 16/32 = 4.5 bits per weight
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj\.weight\s+int4\+bf16 scale\s+128x192\s+.*4\.5\d", text)
    assert re.search(r"model\.embed_tokens\.weight\s+BF16\s+4096x192", text)


def test_inspect_bad_path(tmp_path):
    with pytest.raises(ExportError, match="expected a .gguf or .safetensors file"):
        inspect_file(tmp_path / "nothing.bin")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ExportError, match="not a readable GGUF"):
        inspect_file(tmp_path / "bad.gguf")
