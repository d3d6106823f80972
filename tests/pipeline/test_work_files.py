"""The work directory's layer files: quantized codes that fit a byte are stored as uint8 / int8 (a quarter of the
int32 bytes to write and read back) and come back as the int32 codes they were; expected_shapes (called by the
planner and both exporters) is built once per config, returns a fresh dict, and imports no torch._dynamo."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from gemmaquant.formats import get_format
from gemmaquant.formats.base import Packed
from gemmaquant.quantized import read_values, save_layer

ROOT = Path(__file__).resolve().parents[2]


def stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}


def test_codes_are_stored_narrow_and_read_back_as_int32(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 512, generator=g) * 0.02
    q4k, q80 = get_format("q4_k"), get_format("q8_0")
    experts = [q4k.quantize(w * (e + 1)) for e in range(3)]
    wide = Packed(q4k, (4, 512), {**q4k.quantize(w).data, "codes": torch.full((4, 512), 300, dtype=torch.int32)})
    values = {"a.weight": q4k.quantize(w), "b.weight": q80.quantize(w), "experts.x": experts, "wide.weight": wide,
              "norm.weight": torch.ones(512)}
    save_layer(tmp_path, 0, values, {"layer": 0})
    dtypes = stored_dtypes(tmp_path / "layer_00000.safetensors")
    assert dtypes["a.weight::codes"] == torch.uint8  # Q4_K codes 0..15
    assert dtypes["b.weight::codes"] == torch.int8  # Q8_0 codes -128..127
    assert dtypes["experts.x::codes"] == torch.uint8
    assert dtypes["wide.weight::codes"] == torch.int32  # does not fit a byte: kept as it was
    back = read_values(tmp_path / "layer_00000.safetensors")
    for name in ("a.weight", "b.weight", "wide.weight"):
        p, r = values[name], back[name]
        assert r.data["codes"].dtype == torch.int32 and torch.equal(r.data["codes"], p.data["codes"]), name
        assert all(torch.equal(r.data[k], p.data[k]) for k in p.data), name
    for p, r in zip(experts, back["experts.x"]):
        assert r.data["codes"].dtype == torch.int32
        assert (q4k.to_gguf_bytes(r) == q4k.to_gguf_bytes(p)).all()
    assert torch.equal(back["norm.weight"], values["norm.weight"])
    layer_json = json.loads((tmp_path / "layer_00000.json").read_text())
    assert "codes_dtype" not in json.dumps(layer_json)  # the report's record keeps only the formats


def test_expected_shapes_is_cached_fresh_and_imports_no_dynamo():
    code = (
        "import sys, torch\n"
        "from gemmaquant.checkpoint import expected_shapes\n"
        "from gemmaquant.config import VARIANTS\n"
        "import dataclasses\n"
        "cfg = dataclasses.replace(VARIANTS['26b-a4b'], eos_token_id=[1, 106])  # a list, as real configs hold\n"
        "a = expected_shapes(cfg)\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
        "a['extra'] = (1,)\n"
        "b = expected_shapes(cfg)\n"
        "assert 'extra' not in b, 'the cached dict leaked a change'\n"
        "import gemmaquant.checkpoint as c\n"
        "assert len(c._SHAPES) == 1, 'built more than once'\n"
        "from gemmaquant.model.gemma4 import Gemma4\n"
        "with torch.device('meta'):\n"
        "    m = Gemma4(cfg)\n"
        "assert b == {n: tuple(t.shape) for n, t in m.state_dict().items()}\n"
        "assert m.inv_freq_full_attention.shape == (cfg.global_head_dim // 2,)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
