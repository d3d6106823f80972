"""GGUF export: float round trips are exact, the metadata is what llama.cpp reads, bad input leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import gguf
import pytest
import torch

import gemmaquant
from gemmaquant.checkpoint import Checkpoint
from gemmaquant.export import ExportError, FloatSource, export_gguf
from gemmaquant.export.gguf_reader import gguf_metadata
from gemmaquant.fixtures import FIXTURES


@pytest.mark.parametrize("fixture", list(FIXTURES))
@pytest.mark.parametrize("type_", ["F32", "F16", "BF16"])
def test_float_round_trip_is_exact(fixture, type_, tmp_path):
    out = export_gguf(FloatSource(FIXTURES[fixture]), tmp_path / "m.gguf", type=type_)
    ckpt = Checkpoint(FIXTURES[fixture])
    back = gemmaquant.load(out).state_dict()
    cast = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_]
    for name in ckpt.text_names():
        w = ckpt.get(name)
        want = w.float() if (w.ndim <= 1 or "norm" in name or "router" in name) else w.to(cast).float()
        assert torch.equal(back[name], want), f"{name} changed in the {type_} round trip"
    assert gemmaquant.load(out).config == ckpt.config


def test_metadata_is_what_llamacpp_reads(tmp_path):
    src = FloatSource(FIXTURES["tiny-edge"], metadata={"recipe": "int4-gptq", "calibration_sha256": "ab12"})
    out = export_gguf(src, tmp_path / "e.gguf", type="F16")
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()}
    cfg = src.config
    assert f["general.architecture"] == "gemma4" and f["general.file_type"] == 1
    assert f["gemma4.block_count"] == cfg.num_hidden_layers
    assert f["gemma4.attention.sliding_window_pattern"] == [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
    assert f["gemma4.feed_forward_length"] == [cfg.layer_intermediate_size(i) for i in range(cfg.num_hidden_layers)]
    assert f["gemma4.attention.shared_kv_layers"] == cfg.num_kv_shared_layers
    assert f["gemma4.embedding_length_per_layer_input"] == cfg.hidden_size_per_layer_input
    assert f["gemma4.attention.key_length"] == f["gemma4.attention.value_length"] == cfg.global_head_dim
    assert f["gemma4.attention.key_length_swa"] == f["gemma4.attention.value_length_swa"] == cfg.head_dim
    assert f["gemma4.rope.dimension_count"] == cfg.global_head_dim
    assert f["gemma4.final_logit_softcapping"] == pytest.approx(30.0)
    assert f["tokenizer.ggml.model"] == "gemma4" and f["tokenizer.ggml.add_bos_token"] is True
    assert len(f["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert gguf_metadata(out) == {"recipe": "int4-gptq", "calibration_sha256": "ab12"}
    rope = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    rotated = int(cfg.global_head_dim * cfg.partial_rotary_factor_full / 2)
    want = torch.tensor([1.0] * rotated + [1e30] * (cfg.global_head_dim // 2 - rotated), dtype=torch.float32)
    assert torch.equal(torch.from_numpy(rope.data.copy()), want)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.layer_output_scale.weight"] == "F32" and types["blk.0.attn_q_norm.weight"] == "F32"
    assert types["per_layer_token_embd.weight"] == "F16" and types["blk.0.inp_gate.weight"] == "F16"


def test_moe_metadata_and_f32_router(tmp_path):
    out = export_gguf(FloatSource(FIXTURES["tiny-moe"]), tmp_path / "m.gguf", type="BF16")
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()}
    cfg = Checkpoint(FIXTURES["tiny-moe"]).config
    assert f["gemma4.expert_count"] == cfg.num_experts and f["gemma4.expert_used_count"] == cfg.top_k_experts
    assert f["gemma4.expert_feed_forward_length"] == cfg.moe_intermediate_size
    assert f["gemma4.attention.head_count_kv"] == [cfg.layer_kv_heads(i) for i in range(cfg.num_hidden_layers)]
    t = {x.name: x for x in r.tensors}
    assert "blk.3.attn_v.weight" not in t  # k_eq_v full layer
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert t["blk.0.ffn_down_exps.scale"].tensor_type.name == "F32"
    E, Ie, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert list(t["blk.0.ffn_gate_up_exps.weight"].shape) == [H, 2 * Ie, E]  # ggml ne: {H, 2*Ie, E}
    assert list(t["blk.0.ffn_down_exps.weight"].shape) == [Ie, H, E]


# ---------------------------------------------------------------------------------------------------------
# bad input: a clear error and nothing at the target path


class _Source:
    """A FloatSource with a hook to break it."""

    def __init__(self, path, names=None, get=None):
        base = FloatSource(path)
        self.config, self.source_dir, self.metadata = base.config, base.source_dir, {}
        self._names, self._get, self._base = names or base.names(), get, base

    def names(self):
        return self._names

    def get(self, name):
        return self._get(self._base, name) if self._get else self._base.get(name)


def _clean(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(FloatSource(FIXTURES["tiny-dense"]), target, type="F16")
    assert target.read_bytes() == b"keep me"
    export_gguf(FloatSource(FIXTURES["tiny-dense"]), target, type="F16", overwrite=True)
    assert gguf.GGUFReader(str(target)).fields["general.architecture"].contents() == "gemma4"


@pytest.mark.parametrize("case,match", [
    ("type", "unknown GGUF type"),
    ("clash", "name clash"),
    ("shape", r"layers\.1\.mlp\.up_proj\.weight: shape"),
    ("unknown", "no GGUF name"),
    ("missing", "lacks tensor"),
    ("int", "not a float tensor"),
])
def test_bad_input_leaves_nothing(case, match, tmp_path):
    path = FIXTURES["tiny-dense"]
    names = FloatSource(path).names()
    src, type_ = FloatSource(path), "F16" if case != "type" else "Q3_K_XL"
    if case == "clash":
        src = _Source(path, names=names + [names[3]])
    elif case == "shape":
        src = _Source(path, get=lambda b, n: b.get(n)[:-1] if n == "layers.1.mlp.up_proj.weight" else b.get(n))
    elif case == "unknown":
        src = _Source(path, names=names + ["layers.0.mlp.fc9.weight"])
    elif case == "missing":
        src = _Source(path, names=names[:-1])
    elif case == "int":
        src = _Source(path, get=lambda b, n: b.get(n).to(torch.int32) if n.endswith("o_proj.weight") else b.get(n))
    with pytest.raises(ExportError, match=match):
        export_gguf(src, tmp_path / "m.gguf", type=type_)
    assert _clean(tmp_path) == []


def test_interrupted_write_leaves_nothing(tmp_path):
    def get(base, name):
        if name.startswith("layers.3."):
            raise KeyboardInterrupt
        return base.get(name)

    with pytest.raises(KeyboardInterrupt):
        export_gguf(_Source(FIXTURES["tiny-dense"], get=get), tmp_path / "m.gguf", type="F16")
    assert _clean(tmp_path) == []


def test_full_disk_is_a_clear_error(tmp_path):
    """A write that fails half-way (here: a file-size limit, as a full disk would) raises ExportError and leaves no
    partial file: run in a child process with RLIMIT_FSIZE below the GGUF's size."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        from gemmaquant.export import ExportError, FloatSource, export_gguf
        try:
            export_gguf(FloatSource({str(FIXTURES["tiny-dense"])!r}), {str(tmp_path / "m.gguf")!r}, type="F32")
        except ExportError as e:
            print("EXPORT-ERROR", e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "writing failed" in r.stdout and "nothing was written" in r.stdout
    assert _clean(tmp_path) == []


def test_tokenizer_that_llamacpp_would_split_differently_is_refused(tmp_path, tokenizer_dir):
    """A BPE whose merges cross newlines (llama.cpp's gemma4 tokenizer splits on newlines first) must not be
    exported silently: the export-time check catches it."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(["one\ntwo\n three\n\nfour five\n six"] * 50,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    d = json.loads(tok.to_str())
    d["added_tokens"] = d["added_tokens"][:4]
    ckpt = tmp_path / "ckpt"
    import shutil

    shutil.copytree(FIXTURES["tiny-dense"], ckpt)
    (ckpt / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(ExportError, match="tokenize differently"):
        export_gguf(FloatSource(ckpt), tmp_path / "m.gguf", type="F16")
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------------------------------------
# quantized values: RTN by the mix plan, or the source's own Packed values written as they are


def test_rtn_export_equals_format_quantization(tmp_path):
    """FloatSource + a mix: every tensor gets the type gguf_mix_plan picks, and its blocks are exactly
    gemmaquant.formats' quantization of the checkpoint weight (read back with gguf-py's own dequantizer)."""
    from gemmaquant.export.gguf_mix import gguf_mix_plan
    from gemmaquant.export.gguf_names import gguf_name
    from gemmaquant.export.gguf_pack import gguf_format

    src = FloatSource(FIXTURES["tiny-moe"])
    out = export_gguf(src, tmp_path / "m.gguf", type="Q4_K_M")
    plan = gguf_mix_plan(src.config, "Q4_K_M")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    back = gemmaquant.load(out).state_dict()
    for name in src.names():
        assert types[gguf_name(name)] == plan[name], name
        if plan[name] in ("F32", "F16", "BF16"):
            continue
        w = src.get(name).float()
        fmt = gguf_format(plan[name])
        rows = w.reshape(-1, w.shape[-1])
        want = fmt.dequantize(fmt.quantize(rows)).reshape(w.shape)
        assert torch.equal(back[name], want.float()), name


def test_export_device_cpu_is_the_default_file_and_a_missing_device_is_refused(tmp_path, monkeypatch):
    """device= moves each float chunk where it is quantized; on the CPU that is the default's file, byte for byte
    (a GPU's bytes are compared in tests/formats/test_gguf_device.py), and a device that is not there is refused
    before anything is written."""
    from gemmaquant.device import DeviceError

    src = FloatSource(FIXTURES["tiny-moe"])
    a = export_gguf(src, tmp_path / "a.gguf", type="Q4_K_M")
    b = export_gguf(src, tmp_path / "b.gguf", type="Q4_K_M", device="cpu")
    assert a.read_bytes() == b.read_bytes()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        export_gguf(src, tmp_path / "c.gguf", type="Q4_K_M", device="cuda")
    assert not (tmp_path / "c.gguf").exists()


@pytest.mark.parametrize("kind", ["gguf-types", "int4-g32", "int8-channel"])
def test_packed_values_written_bit_for_bit(kind, tmp_path):
    """A source of already-quantized values (what PTQ / QAT chose): GGUF block formats are written byte for byte;
    gemmaquant's int4 symmetric group-32 and int8 per-channel grids are repacked losslessly as Q4_0 / Q8_0."""
    from gemmaquant.formats import Int4Group, Int8Channel
    from gemmaquant.export.gguf_names import gguf_name
    from gemmaquant.export.gguf_pack import gguf_format

    fmt = {"gguf-types": None, "int4-g32": Int4Group(group_size=32, symmetric=True, scale_dtype=torch.bfloat16),
           "int8-channel": Int8Channel(scale_dtype=torch.bfloat16)}[kind]
    chosen = {}

    def get(b, name):
        w = b.get(name)
        if w.ndim < 2 or ".router." in name or name == "embed_tokens.weight":
            return w
        f = fmt or gguf_format("Q8_0" if "experts" in name else "Q5_1")
        packs = [f.quantize(x.float() * 0.7) for x in (w if w.ndim == 3 else [w])]  # not RTN of w itself
        chosen[name] = (packs, torch.stack([f.dequantize(p) for p in packs]).reshape(w.shape))
        return packs if w.ndim == 3 else packs[0]

    out = export_gguf(_Source(FIXTURES["tiny-moe"], get=get), tmp_path / "m.gguf", type="Q4_K_M")
    back = gemmaquant.load(out).state_dict()
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for name, (packs, deq) in chosen.items():
        assert torch.equal(back[name], deq.float()), name
        t = tensors[gguf_name(name)]
        if kind == "gguf-types":
            raw = torch.from_numpy(t.data.copy()).reshape(-1).numpy().tobytes()
            assert raw == b"".join(p.fmt.to_gguf_bytes(p).tobytes() for p in packs), name
        else:
            assert t.tensor_type.name == ("Q4_0" if kind == "int4-g32" else "Q8_0"), name


def test_type_that_cannot_hold_the_rows_is_refused(tmp_path):
    # token embeddings of width 160 do not fill 256-weight K-quant blocks
    with pytest.raises(ExportError, match="multiple of 256"):
        export_gguf(FloatSource(FIXTURES["tiny-moe"]), tmp_path / "m.gguf", type="Q4_K_M", token_embd_type="Q6_K")
    assert _clean(tmp_path) == []


def test_reader_refuses_other_architectures(tmp_path):
    from gemmaquant.export.gguf_reader import GGUFFormatError

    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFormatError, match="'llama', expected 'gemma4'"):
        gemmaquant.load(tmp_path / "llama.gguf")
