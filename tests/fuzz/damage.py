"""Damaged inputs made from the bundled fixtures: each builder writes one broken checkpoint, GGUF, text or recipe file.

Every entry is `name: (builder, what the error must name)`. Builders take the path to write and the `Good` inputs
(the fixture, a GGUF and a compressed-tensors export) to start from; none needs more than a few MB.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gemmaquant.fixtures import fixture_path

FIXTURE = "tiny-moe"
PREFIX = "model."
Q = "model.layers.0.self_attn.q_proj.weight"
MARKER = "PICKLE_RAN"  # a file the malicious pickle would create if anything unpickled it


CT_FIXTURE = "tiny-dense"  # its W4A16 export takes a second or two (tiny-moe's experts: ten)


class Good:
    """The undamaged inputs: the fixture (read-only), and, made on first use, a BF16 GGUF of it and a W4A16
    compressed-tensors export of CT_FIXTURE."""

    def __init__(self, root: Path):
        self.root, self.ckpt = root, fixture_path(FIXTURE)

    @cached_property
    def gguf(self) -> Path:
        from gemmaquant.export import export_gguf
        from gemmaquant.export.source import FloatSource

        return Path(export_gguf(FloatSource(self.ckpt), self.root / "good-BF16.gguf", type="BF16"))

    @cached_property
    def ct(self) -> Path:
        from gemmaquant.export import export_compressed_tensors
        from gemmaquant.export.source import FloatSource

        return Path(export_compressed_tensors(FloatSource(fixture_path(CT_FIXTURE)), self.root / "good-ct",
                                              scheme="W4A16"))


# ---- checkpoints --------------------------------------------------------------------------------------------
def _copy(good: Good, d: Path) -> Path:
    shutil.copytree(good.ckpt, d)
    return d / "model.safetensors"


def _edit_tensors(edit):
    def build(d: Path, good: Good):
        st = _copy(good, d)
        t = load_file(str(st))
        edit(t)
        save_file(t, str(st), metadata={"format": "pt"})
    return build


def _edit_bytes(edit):
    def build(d: Path, good: Good):
        st = _copy(good, d)
        st.write_bytes(edit(st.read_bytes()))
    return build


def _edit_header(edit):
    """Rewrite the JSON header (and keep the data) of model.safetensors."""
    def change(raw: bytes) -> bytes:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        edit(header)
        new = json.dumps(header).encode()
        return len(new).to_bytes(8, "little") + new + raw[8 + n:]
    return _edit_bytes(change)


def _edit_config(edit):
    def build(d: Path, good: Good):
        _copy(good, d)
        cfg = json.loads((d / "config.json").read_text())
        out = edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg if out is None else out))
    return build


def _write_file(name: str, data: bytes | None):
    def build(d: Path, good: Good):
        _copy(good, d)
        if data is None:
            (d / name).unlink()
        else:
            (d / name).write_bytes(data)
    return build


def _set(**kw):
    return _edit_config(lambda c: c.update(kw))


def _nan(name, value=float("nan")):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[3] = value
    return edit


def _pickle_only(d: Path, good: Good):
    _copy(good, d)
    (d / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / MARKER}",))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))


def _index(weight_map):
    def build(d: Path, good: Good):
        _copy(good, d)
        (d / "model.safetensors.index.json").write_text(json.dumps(weight_map) if not isinstance(weight_map, bytes)
                                                         else weight_map.decode("latin-1"))
    return build


def _header_entry(**kw):
    return _edit_header(lambda h: h[Q].update(kw))


def _more_layers(c):
    c["num_hidden_layers"] = 5
    c["layer_types"] = c["layer_types"] + ["full_attention"]


def _fewer_layers(c):
    c["num_hidden_layers"] = 3
    c["layer_types"] = c["layer_types"][:3]


SAFETENSORS = {  # damage to the safetensors file itself: every reader refuses it
    "st_truncated_half": (_edit_bytes(lambda b: b[:len(b) // 2]), "model.safetensors"),
    "st_truncated_last_byte": (_edit_bytes(lambda b: b[:-1]), "model.safetensors"),
    "st_truncated_in_header": (_edit_bytes(lambda b: b[:100]), "model.safetensors"),
    "st_empty": (_edit_bytes(lambda b: b""), "model.safetensors"),
    "st_four_bytes": (_edit_bytes(lambda b: b[:4]), "model.safetensors"),
    "st_garbled_header": (_edit_bytes(lambda b: b[:8] + bytes(range(7, 71)) + b[72:]), "model.safetensors"),
    "st_header_length_huge": (_edit_bytes(lambda b: (1 << 62).to_bytes(8, "little") + b[8:]), "model.safetensors"),
    "st_header_not_utf8": (_edit_bytes(lambda b: b[:9] + b"\xff\xfe" + b[11:]), "model.safetensors"),
    "st_header_a_list": (_edit_bytes(lambda b: (2).to_bytes(8, "little") + b"[]"), "model.safetensors"),
    "st_unknown_dtype": (_header_entry(dtype="Q4"), Q),
    "st_offsets_outside": (_header_entry(data_offsets=[0, 1 << 40]), Q),
    "st_offsets_reversed": (_header_entry(data_offsets=[100, 10]), Q),
    "st_offsets_wrong_size": (_header_entry(shape=[10, 10]), Q),
    "st_negative_shape": (_header_entry(shape=[-128, -160]), Q),
    "st_shape_not_list": (_header_entry(shape="128x160"), Q),
    "st_offsets_overlap": (_edit_header(lambda h: h[Q].update(data_offsets=h["model.embed_tokens.weight"]
                                                                ["data_offsets"][:1] + [h["model.embed_tokens.weight"]
                                                                                        ["data_offsets"][0] + 40960])),
                           Q),
    "index_missing_shard": (_index({"weight_map": {"model.embed_tokens.weight": "model-00002.safetensors"}}),
                            "model-00002.safetensors"),
    "index_invalid_json": (_index(b"{\"weight_map\": "), "model.safetensors.index.json"),
    "index_weight_map_list": (_index({"weight_map": ["model.safetensors"]}), "model.safetensors.index.json"),
    "index_shard_is_dir": (_index({"weight_map": {"model.embed_tokens.weight": "."}}), "index"),
    "pickle_only": (_pickle_only, "pickle"),
}

CONFIGS = {  # a damaged or wrong config.json
    "cfg_missing": (_write_file("config.json", None), "config.json"),
    "cfg_invalid_json": (_write_file("config.json", b'{"model_type": "gemma4_text",'), "config.json"),
    "cfg_not_utf8": (_write_file("config.json", b'{"model_type": "gemma4_text\xff"}'), "config.json"),
    "cfg_a_list": (_write_file("config.json", b"[1, 2, 3]"), "config.json"),
    "cfg_wrong_architecture": (_set(model_type="llama"), "llama"),
    "cfg_text_config_not_dict": (_set(model_type="gemma4", text_config=[1]), "config.json"),
    "cfg_hidden_size_wrong": (_set(hidden_size=128), "model.embed_tokens.weight"),
    "cfg_vocab_wrong": (_set(vocab_size=4000), "model.embed_tokens.weight"),
    "cfg_more_layers": (_edit_config(_more_layers), "model.layers.4."),
    "cfg_fewer_layers": (_edit_config(_fewer_layers), "unexpected tensor"),
    "cfg_hidden_size_string": (_set(hidden_size="160"), "hidden_size"),
    "cfg_hidden_size_bool": (_set(hidden_size=True), "hidden_size"),
    "cfg_layers_float": (_set(num_hidden_layers=4.5), "num_hidden_layers"),
    "cfg_heads_negative": (_set(num_attention_heads=-4), "num_attention_heads"),
    "cfg_kv_heads_zero": (_set(num_key_value_heads=0), "num_key_value_heads"),
    "cfg_head_dim_zero": (_set(head_dim=0), "head_dim"),
    "cfg_layer_types_short": (_edit_config(lambda c: c.update(layer_types=c["layer_types"][:2])), "layer_types"),
    "cfg_layer_type_unknown": (_edit_config(lambda c: c["layer_types"].__setitem__(0, "local")), "layer types"),
    "cfg_layer_types_string": (_set(layer_types="sliding_attention"), "layer_types"),
    "cfg_experts_null": (_set(num_experts=None), "num_experts"),
    "cfg_top_k_above_experts": (_set(top_k_experts=9), "top_k_experts"),
    "cfg_rope_theta_string": (_edit_config(lambda c: c["rope_parameters"]["sliding_attention"].update(
        rope_theta="ten thousand")), "rope_theta"),
    "cfg_rope_not_dict": (_set(rope_parameters=[10000.0]), "rope_parameters"),
    "cfg_eps_negative": (_set(rms_norm_eps=-1e-6), "rms_norm_eps"),
    "cfg_softcap_zero": (_set(final_logit_softcapping=0.0), "final_logit_softcapping"),
    "cfg_window_zero": (_set(sliding_window=0), "sliding_window"),
    "cfg_activation_unknown": (_set(hidden_activation="relu"), "hidden_activation"),
    "cfg_bos_outside_vocab": (_set(bos_token_id=10 ** 6), "bos_token_id"),
    "cfg_kv_shared_all": (_set(num_kv_shared_layers=4), "num_kv_shared_layers"),
}

TENSORS = {  # a readable checkpoint whose tensors are wrong for its config
    "nan_in_q_proj": (_edit_tensors(_nan(Q)), Q),
    "inf_in_embeddings": (_edit_tensors(_nan("model.embed_tokens.weight", float("inf"))), "model.embed_tokens.weight"),
    "nan_in_last_norm": (_edit_tensors(_nan("model.layers.3.post_feedforward_layernorm.weight")),
                         "model.layers.3.post_feedforward_layernorm.weight"),
    "nan_in_experts": (_edit_tensors(_nan("model.layers.2.experts.gate_up_proj")), "model.layers.2.experts"),
    "int32_weight": (_edit_tensors(lambda t: t.update({Q: (t[Q].float() * 1000).round().to(torch.int32)})), Q),
    "int8_weight": (_edit_tensors(lambda t: t.update({Q: t[Q].float().round().to(torch.int8)})), Q),
    "bool_norm": (_edit_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"] > 0})),
                  "model.norm.weight"),
    "missing_q_proj": (_edit_tensors(lambda t: t.pop(Q)), Q),
    "missing_embeddings": (_edit_tensors(lambda t: t.pop("model.embed_tokens.weight")), "embed_tokens"),
    "missing_last_layer_down": (_edit_tensors(lambda t: t.pop("model.layers.3.mlp.down_proj.weight")),
                                "model.layers.3.mlp.down_proj.weight"),
    "extra_tensor": (_edit_tensors(lambda t: t.update({"model.layers.0.self_attn.bogus.weight": t[Q].clone()})),
                     "model.layers.0.self_attn.bogus.weight"),
    "extra_layer": (_edit_tensors(lambda t: t.update({"model.layers.9.input_layernorm.weight":
                                                      t["model.norm.weight"].clone()})), "model.layers.9"),
    "transposed_q_proj": (_edit_tensors(lambda t: t.update({Q: t[Q].T.contiguous()})), Q),
    "router_shape_wrong": (_edit_tensors(lambda t: t.update({"model.layers.1.router.proj.weight":
                                                             t["model.layers.1.router.proj.weight"][:7]})),
                           "model.layers.1.router.proj.weight"),
    "scalar_norm": (_edit_tensors(lambda t: t.update({"model.norm.weight": torch.tensor(1.0)})), "model.norm.weight"),
    "no_text_weights": (_edit_tensors(lambda t: [t.pop(k) for k in list(t) if k != Q] and
                                      t.update({"vision.w": t.pop(Q)})), "text weights"),
}

TOKENIZERS = {  # what quantize, eval and qat need beside the weights
    "tok_missing": (_write_file("tokenizer.json", None), "tokenizer.json"),
    "tok_garbled": (_write_file("tokenizer.json", b'{"version": "1.0", "model": '), "tokenizer.json"),
    "tok_not_utf8": (_write_file("tokenizer.json", b'{"version": "\xff\xfe"}'), "tokenizer.json"),
}

CHECKPOINTS = {**SAFETENSORS, **CONFIGS, **TENSORS, **TOKENIZERS}


# ---- GGUF files ---------------------------------------------------------------------------------------------
def _gguf_bytes(edit):
    def build(p: Path, good: Good):
        p.write_bytes(edit(good.gguf.read_bytes()))
    return build


def _gguf_tensor_data(name: str, data: bytes):
    """Overwrite the first bytes of a tensor's data."""
    def build(p: Path, good: Good):
        import gguf

        r = gguf.GGUFReader(str(good.gguf))
        t = next(t for t in r.tensors if t.name == name)
        raw = bytearray(good.gguf.read_bytes())
        raw[t.data_offset:t.data_offset + len(data)] = data
        p.write_bytes(bytes(raw))
    return build


def _gguf_written(arch: str, keys: dict):
    def build(p: Path, good: Good):
        import gguf
        import numpy as np

        w = gguf.GGUFWriter(str(p), arch)
        for k, v in keys.items():
            w.add_uint32(k, v)
        w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return build


def _poke(offset: int, data: bytes):
    return _gguf_bytes(lambda b: b[:offset] + data + b[offset + len(data):])


GGUFS = {
    "gguf_truncated_half": (_gguf_bytes(lambda b: b[:len(b) // 2]), ".gguf"),
    "gguf_truncated_last_byte": (_gguf_bytes(lambda b: b[:-1]), ".gguf"),
    "gguf_truncated_in_header": (_gguf_bytes(lambda b: b[:300]), ".gguf"),
    "gguf_empty": (_gguf_bytes(lambda b: b""), ".gguf"),
    "gguf_bad_magic": (_poke(0, b"GGUX"), ".gguf"),
    "gguf_bad_version": (_poke(4, struct.pack("<I", 99)), ".gguf"),
    "gguf_tensor_count_huge": (_poke(8, struct.pack("<Q", 1 << 60)), ".gguf"),
    "gguf_kv_count_huge": (_poke(16, struct.pack("<Q", 1 << 60)), ".gguf"),
    "gguf_garbled_metadata": (_poke(40, bytes(range(200, 256)) * 4), ".gguf"),
    "gguf_text_file": (lambda p, good: p.write_text("this is not a GGUF file\n"), ".gguf"),
    "gguf_nan_norm": (_gguf_tensor_data("output_norm.weight", struct.pack("<f", float("nan"))), "output_norm.weight"),
    "gguf_inf_norm": (_gguf_tensor_data("blk.0.attn_norm.weight", struct.pack("<f", float("inf"))),
                      "blk.0.attn_norm.weight"),
    "gguf_nan_bf16_embedding": (_gguf_tensor_data("token_embd.weight", b"\xc0\x7f"), "token_embd.weight"),
    "gguf_llama_architecture": (_gguf_written("llama", {}), "llama"),
    "gguf_gemma4_no_metadata": (_gguf_written("gemma4", {}), "gemma4.block_count"),
    "gguf_gemma4_zero_layers": (_gguf_written("gemma4", {"gemma4.block_count": 0}), ".gguf"),
}


# ---- compressed-tensors directories -------------------------------------------------------------------------
def _ct_copy(good: Good, d: Path) -> Path:
    shutil.copytree(good.ct, d)
    return d


def _ct_tensors(edit):
    def build(d: Path, good: Good):
        _ct_copy(good, d)
        st = next(d.glob("*.safetensors"))
        t = load_file(str(st))
        edit(t)
        save_file(t, str(st), metadata={"format": "pt"})
    return build


def _ct_config(edit):
    def build(d: Path, good: Good):
        _ct_copy(good, d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg["quantization_config"] if "quantization_config" in cfg else cfg["text_config"]["quantization_config"])
        (d / "config.json").write_text(json.dumps(cfg))
    return build


def _ct_bytes(edit):
    def build(d: Path, good: Good):
        _ct_copy(good, d)
        st = next(d.glob("*.safetensors"))
        st.write_bytes(edit(st.read_bytes()))
    return build


CTQ = "model.layers.0.self_attn.q_proj"
COMPRESSED = {
    "ct_truncated_half": (_ct_bytes(lambda b: b[:len(b) // 2]), ".safetensors"),
    "ct_format_dense": (_ct_config(lambda q: q.update(format="dense")), "dense"),
    "ct_num_bits_string": (_ct_config(lambda q: next(iter(q["config_groups"].values()))["weights"].update(
        num_bits="four")), "num_bits"),
    "ct_missing_packed": (_ct_tensors(lambda t: t.pop(f"{CTQ}.weight_packed")), f"{CTQ}.weight_packed"),
    "ct_weight_shape_wrong": (_ct_tensors(lambda t: t.update({f"{CTQ}.weight_shape": torch.tensor([128, 99])})),
                              CTQ),
    "ct_scale_nan": (_ct_tensors(lambda t: t[f"{CTQ}.weight_scale"].view(-1).__setitem__(0, float("nan"))), CTQ),
    "ct_packed_float": (_ct_tensors(lambda t: t.update({f"{CTQ}.weight_packed": t[f"{CTQ}.weight_packed"].float()})),
                        f"{CTQ}.weight_packed"),
    "ct_config_invalid_json": (lambda d, good: (_ct_copy(good, d), (d / "config.json").write_text("{")), "config.json"),
}


# ---- text files (calibration, held-out, QAT training data) --------------------------------------------------
TEXTS = {
    "txt_latin1": ("calib.txt", "Caf\xe9 cr\xe8me br\xfbl\xe9e\n\nna\xefve fa\xe7ade\n".encode("latin-1"), "calib.txt"),
    "txt_utf16": ("calib.txt", "hello world\n\nsecond document\n".encode("utf-16"), "calib.txt"),
    "txt_binary": ("calib.txt", bytes(range(256)) * 16, "calib.txt"),
    "txt_empty": ("calib.txt", b"", "calib.txt"),
    "txt_blank_lines": ("calib.txt", b"\n\n   \n\n", "calib.txt"),
    "txt_too_short": ("calib.txt", b"one short document\n", "calib.txt"),
    "jsonl_bad_line": ("calib.jsonl", b'{"text": "fine"}\n{"text": \n', "calib.jsonl:2"),
    "jsonl_no_text_field": ("calib.jsonl", b'{"content": "fine"}\n', "calib.jsonl:1"),
    "jsonl_text_not_string": ("calib.jsonl", b'{"text": 5}\n', "calib.jsonl:1"),
    "jsonl_latin1": ("calib.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "calib.jsonl"),
    "txt_missing": ("missing.txt", None, "missing.txt"),
    "txt_is_directory": ("adir", "dir", "adir"),
}


def write_text_case(name: str, root: Path) -> Path:
    fname, data, _ = TEXTS[name]
    d = root / name
    d.mkdir()
    p = d / fname
    if data == "dir":
        p.mkdir()
    elif data is not None:
        p.write_bytes(data)
    return p


# ---- recipe files -------------------------------------------------------------------------------------------
RECIPES = {  # TOML body -> what the error names
    "act_order_string": ('act_order = "yes"', "act_order"),
    "moe_min_tokens_negative": ("moe_min_tokens = -5", "moe_min_tokens"),
    "damp_negative": ("damp = -1.0", "damp"),
    "damp_above_one": ("damp = 2.0", "damp"),
    "damp_string": ('damp = "0.1"', "damp"),
    "damp_nan": ("damp = nan", "damp"),
    "awq_grid_zero": ('method = "awq"\nawq_grid = 0', "awq_grid"),
    "awq_grid_float": ("awq_grid = 2.5", "awq_grid"),
    "n_samples_string": ('n_samples = "32"', "n_samples"),
    "n_samples_zero": ("n_samples = 0", "n_samples"),
    "seq_len_negative": ("seq_len = -1", "seq_len"),
    "batch_size_bool": ("batch_size = true", "batch_size"),
    "block_size_zero": ("block_size = 0", "block_size"),
    "block_size_float": ("block_size = 12.5", "block_size"),
    "method_unknown": ('method = "sgd"', "method"),
    "method_number": ("method = 3", "method"),
    "weight_format_unknown": ('weight_format = "int5_g32_sym"', "weight_format"),
    "gguf_type_unknown": ('gguf_type = "Q9_K"', "gguf_type"),
    "gguf_type_number": ("gguf_type = 4", "gguf_type"),
    "embedding_type_unknown": ('embedding_gguf_type = "Q7"', "embedding_gguf_type"),
    "calibration_number": ("calibration = 5", "calibration"),
    "calibration_missing_file": ('calibration = "/nonexistent/calib.txt"', "calib.txt"),
    "name_table": ("[name]\nx = 1", "name"),
    "importance_params_string": ('importance_params = "no"', "importance_params"),
    "unknown_key": ("dampening = 0.1", "dampening"),
    "invalid_toml": ("damp = = 1", "not valid TOML"),
    "not_utf8": (b"name = \"caf\xe9\"", "recipe.toml"),
    "group_not_fitting": ('weight_format = "int4_g128_sym"', "128"),
}


def write_recipe_case(name: str, root: Path) -> Path:
    body, _ = RECIPES[name]
    d = root / name
    d.mkdir()
    p = d / "recipe.toml"
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    return p
