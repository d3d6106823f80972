"""compressed-tensors export: packing checked against the compressed-tensors library's own decompressor, names
checked against vLLM's Gemma 4 loader, towers and tokenizer copied, bad input leaves nothing."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import gemmaquant
from gemmaquant.checkpoint import Checkpoint, expected_shapes
from gemmaquant.export import ExportError, FloatSource, export_compressed_tensors
from gemmaquant.export.compressed_tensors import is_quantized, scheme_format
from gemmaquant.export.ct_pack import pack_int32, unpack_int32
from gemmaquant.fixtures import FIXTURES


def _tensors(out) -> dict[str, torch.Tensor]:
    t = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            t.update({k: s.get_tensor(k) for k in s.keys()})
    return t


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_equals_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(0)
    lo = -(1 << (bits - 1))
    q = torch.randint(lo, -lo, (5, 96), generator=g, dtype=torch.int8)
    assert torch.equal(pack_int32(q, bits), pack_to_int32(q, bits))
    assert torch.equal(unpack_int32(pack_int32(q, bits), bits, 96), q)
    assert torch.equal(unpack_from_int32(pack_int32(q, bits), bits, torch.Size([5, 96])), q)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct")
    return {(f, s): export_compressed_tensors(FloatSource(FIXTURES[f]), out / f"{f}-{s}", scheme=s)
            for f in FIXTURES for s in ("W4A16", "W8A16")}


@pytest.mark.parametrize("fixture", list(FIXTURES))
@pytest.mark.parametrize("scheme", ["W4A16", "W8A16"])
def test_weights_equal_compressed_tensors_decompression(fixture, scheme, exports):
    """Every module decompressed by compressed-tensors itself equals (a) what gemmaquant.load reads and (b) the
    format's own RTN of the checkpoint weight, so the file holds exactly the quantization we made."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = exports[(fixture, scheme)]
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme_obj = qc.config_groups["group_0"]
    tensors = _tensors(out)
    model = gemmaquant.load(out).state_dict()
    ckpt = Checkpoint(FIXTURES[fixture])
    fmt = scheme_format(scheme, 32, torch.bfloat16)
    for name, shape in expected_shapes(ckpt.config).items():
        if not is_quantized(name) or "experts" in name:
            continue
        base = "model." + name.removesuffix(".weight")
        sd = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(base + ".weight_")}
        w = PackedQuantizationCompressor.decompress(sd, scheme_obj)["weight"]  # bf16: the product rounded once
        assert torch.equal(model[name].to(torch.bfloat16), w), name
        p = fmt.quantize(ckpt.get(name).float())
        # compressed-tensors multiplies in the scale dtype: the exact product q * scale, rounded once to bf16
        assert torch.equal(w, fmt.dequantize(p).to(torch.bfloat16)), f"{name}: not the format's RTN quantization"


def test_expert_names_are_what_vllm_loads(exports):
    """Replays vllm/model_executor/models/gemma4.py: load_weights' renames and expert_params_mapping must send every
    expert tensor to a FusedMoE parameter (w13 for gate/up, w2 for down) with the right shard and expert id."""
    out = exports[("tiny-moe", "W4A16")]
    cfg = Checkpoint(FIXTURES["tiny-moe"]).config
    names = [n for n in _tensors(out) if ".experts." in n]
    assert len(names) == cfg.num_hidden_layers * cfg.num_experts * 3 * 3
    mapping = [("experts.w13_" if p in ("gate_proj", "up_proj") else "experts.w2_", f"experts.{e}.{p}.", e, s)
               for e in range(cfg.num_experts)
               for s, p in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))]
    seen = set()
    for n in names:
        v = n.replace("language_model.", "")
        v = re.sub(r"\.experts\.(\d+)\.", r".moe.experts.\1.", v)
        hits = [(v.replace(w, p), e, s) for p, w, e, s in mapping if w in v]
        assert len(hits) == 1, f"{n}: {hits}"
        target, e, s = hits[0]
        assert re.fullmatch(r"model\.layers\.\d+\.moe\.experts\.w(13|2)_weight_(packed|scale|shape)", target), target
        m = re.search(r"experts\.(\d+)\.(\w+)_proj", n)
        assert int(m.group(1)) == e and {"gate": "w1", "up": "w3", "down": "w2"}[m.group(2)] == s
        seen.add((target, e, s))
    assert len(seen) == len(names)


def test_config_and_files(exports):
    out = exports[("tiny-edge", "W4A16")]
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"], w["group_size"]) == (4, True, "group", 32)
    assert "lm_head" in qc["ignore"] and any("router" in i for i in qc["ignore"])
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (FIXTURES["tiny-edge"] / f).read_bytes(), f
    t = _tensors(out)
    assert t["model.per_layer_model_projection.weight"].dtype == torch.bfloat16  # ignored: kept in float
    assert t["model.layers.0.per_layer_input_gate.weight_packed"].dtype == torch.int32
    w8 = json.loads((exports[("tiny-edge", "W8A16")] / "config.json").read_text())["quantization_config"]
    assert w8["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


def test_packed_values_are_written_bit_for_bit(tmp_path):
    """A source of already-quantized values (what PTQ/QAT chose) is written as is: the file's codes and scales are
    the Packed ones, not a requantization (checked on values RTN would not produce)."""
    base = FloatSource(FIXTURES["tiny-dense"])
    fmt = scheme_format("W4A16", 32, torch.bfloat16)
    chosen = {}

    class Src:
        config, source_dir, metadata = base.config, base.source_dir, {"recipe": "test"}

        def names(self):
            return base.names()

        def get(self, n):
            w = base.get(n)
            if not is_quantized(n):
                return w
            p = fmt.quantize(w.float() * 0.5)  # a quantization RTN of w itself would never give
            chosen[n] = fmt.dequantize(p)
            return p

    out = export_compressed_tensors(Src(), tmp_path / "ct")
    t = _tensors(out)
    state = gemmaquant.load(out).state_dict()
    for n, deq in chosen.items():
        base = "model." + n.removesuffix(".weight")
        q = unpack_int32(t[base + ".weight_packed"], 4, deq.shape[1]).double()
        s = t[base + ".weight_scale"].double()
        assert torch.equal((q.reshape(q.shape[0], s.shape[1], -1) * s[..., None]).reshape(q.shape), deq.double()), n
        assert torch.equal(state[n], deq.float()), n
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["gemmaquant.recipe"] == "test"


def test_towers_copied_and_shards_indexed(tmp_path):
    from gemmaquant.model.testing import save_multimodal_checkpoint

    model = gemmaquant.load(FIXTURES["tiny-dense"])
    ckpt = save_multimodal_checkpoint(model, tmp_path / "mm", dtype=torch.bfloat16,
                                      tokenizer_dir=FIXTURES["tiny-dense"])
    out = export_compressed_tensors(FloatSource(ckpt), tmp_path / "ct", scheme="W8A16", max_shard_bytes=1 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    t = _tensors(out)
    src = Checkpoint(ckpt)
    for n in src.tower_names():
        assert torch.equal(t[n], src.get(n)) and t[n].dtype == src.get(n).dtype, n
    assert any(k.startswith("model.language_model.layers.0.self_attn.q_proj.weight_packed") for k in t)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4" and cfg["vision_config"] == json.loads((ckpt / "config.json").read_text())[
        "vision_config"]
    ids = torch.arange(20)[None]
    torch.testing.assert_close(gemmaquant.load(out)(ids), gemmaquant.load(tmp_path / "ct")(ids))


@pytest.mark.parametrize("case,match", [
    ("scheme", "unknown scheme"),
    ("group", "cannot hold"),
    ("format", "groups"),
    ("clash", "name clash"),
    ("interrupt", None),
])
def test_bad_input_leaves_nothing(case, match, tmp_path):
    base = FloatSource(FIXTURES["tiny-dense"])
    kw = {"scheme": "W4A16"}
    src = base
    if case == "scheme":
        kw["scheme"] = "W3A16"
    elif case == "group":
        kw["group_size"] = 40
    elif case in ("format", "clash", "interrupt"):
        other = scheme_format("W4A16", 64, torch.bfloat16)

        class Src:
            config, source_dir, metadata = base.config, base.source_dir, {}

            def names(self):
                return base.names() + ([base.names()[0]] if case == "clash" else [])

            def get(self, n):
                if case == "interrupt" and n.startswith("layers.2."):
                    raise KeyboardInterrupt
                w = base.get(n)
                return other.quantize(w.float()) if case == "format" and n.endswith("q_proj.weight") else w

        src = Src()
    with pytest.raises(KeyboardInterrupt if case == "interrupt" else ExportError, match=match):
        export_compressed_tensors(src, tmp_path / "ct", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
