"""gemmaquant.export.gguf_header (the tensor table and scalar metadata, arrays stepped over) against gguf-py's
GGUFReader on our exports, and its refusals of damaged files."""

import gguf
import numpy as np
import pytest

from gemmaquant.export import FloatSource, export_gguf
from gemmaquant.export.gguf_header import read_header
from gemmaquant.export.gguf_reader import GGUFFormatError
from gemmaquant.export.inspect import file_bits
from gemmaquant.fixtures import FIXTURES


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    return export_gguf(FloatSource(FIXTURES["tiny-moe"]), tmp_path_factory.mktemp("h") / "m.gguf", type="Q4_K_M")


def test_header_equals_gguf_py(moe_gguf):
    meta, tensors = read_header(moe_gguf)
    r = gguf.GGUFReader(str(moe_gguf))
    assert [(t.name, t.type, t.shape, t.n_elements, t.n_bytes, t.offset) for t in tensors] == [
        (t.name, t.tensor_type.name, [int(x) for x in reversed(t.shape)], int(t.n_elements), int(t.n_bytes),
         int(t.data_offset)) for t in r.tensors]
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}  # gguf-py's header pseudo-fields
    assert meta.keys() == fields.keys()
    for key, field in fields.items():
        value = field.contents()
        assert meta[key] == (len(value) if isinstance(value, list) else value), key
    assert meta["tokenizer.ggml.tokens"] > 0
    bits = file_bits(moe_gguf)
    assert bits["bytes"] == sum(int(t.n_bytes) for t in r.tensors)


def test_vocabulary_arrays_are_stepped_over(tmp_path):
    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_token_list([f"t{i}".encode() for i in range(5000)])
    w.add_token_scores([0.5] * 5000)
    w.add_string("gemmaquant.recipe", "int4-gptq")
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    meta, tensors = read_header(path)
    assert meta["tokenizer.ggml.tokens"] == 5000 and meta["tokenizer.ggml.scores"] == 5000
    assert meta["gemmaquant.recipe"] == "int4-gptq"
    assert [(t.name, t.shape, t.n_bytes) for t in tensors] == [("a", [2, 32], 256)]
    data = path.read_bytes()
    assert np.frombuffer(data[tensors[0].offset:tensors[0].offset + 256], np.float32)[5] == 5.0


@pytest.mark.parametrize("cut", ["magic", "kv", "tensor_data"])
def test_damaged_files_are_refused_naming_them(moe_gguf, tmp_path, cut):
    data = moe_gguf.read_bytes()
    _, tensors = read_header(moe_gguf)
    bad = tmp_path / f"{cut}.gguf"
    bad.write_bytes({"magic": b"GGUX" + data[4:], "kv": data[:2000],
                     "tensor_data": data[:tensors[-1].offset + 1]}[cut])
    with pytest.raises(GGUFFormatError, match=str(bad)):
        read_header(bad)
