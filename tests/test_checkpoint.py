"""Bad checkpoints raise a CheckpointError that names the file and the tensor; nothing is ever unpickled."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmaquant
from gemmaquant.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from gemmaquant.config import TINY_VARIANTS
from gemmaquant.model.testing import random_model, save_multimodal_checkpoint

CFG = TINY_VARIANTS["tiny-31b"]


@pytest.fixture()
def ckpt(tmp_path):
    return save_checkpoint(random_model(CFG), tmp_path / "m", dtype=torch.float32)


@pytest.fixture()
def sharded(tmp_path):
    return save_multimodal_checkpoint(random_model(CFG), tmp_path / "mm", max_shard_bytes=300_000)


def test_missing_shard_names_the_file(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        gemmaquant.load(sharded)


def test_missing_tensor_named(ckpt):
    f = ckpt / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        gemmaquant.load(ckpt)


def test_wrong_shape_names_file_and_tensor(ckpt):
    f = ckpt / "model.safetensors"
    state = load_file(str(f))
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*q_proj\.weight.*shape \[3, 3\]"):
        gemmaquant.load(ckpt)


def test_wrong_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama'"):
        gemmaquant.load(ckpt)


def test_corrupt_safetensors_header(ckpt):
    f = ckpt / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:40] = b"{not json at all, garbage here!!"
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        gemmaquant.load(ckpt)


def test_nan_weight_named(ckpt):
    f = ckpt / "model.safetensors"
    state = load_file(str(f))
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*NaN"):
        gemmaquant.load(ckpt)


def test_pickle_checkpoint_refused_and_never_unpickled(tmp_path, monkeypatch):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**CFG.to_hf_dict()}))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loaded"):
        gemmaquant.load(d)


def test_lazy_layer_access_and_towers(sharded):
    c = Checkpoint(sharded)
    assert c.prefix == "model.language_model."
    assert any(n.startswith("model.vision_tower.") for n in c.tower_names())
    assert not any("vision" in n for n in c.text_names())
    layer = c.layer_state(3)
    assert set(layer) >= {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight", "layer_scalar"}
    assert "self_attn.v_proj.weight" not in layer  # full layer with k_eq_v has no v_proj
    assert c.get("model.vision_tower.patch_embedder.input_proj.weight").shape == (32, 768)


def test_unknown_alias_lists_valid_names():
    with pytest.raises(FileNotFoundError, match="26b-a4b"):
        gemmaquant.load("no-such-model")


def test_real_alias_without_weights_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"google/gemma-4-31B-it.*looked in"):
        gemmaquant.load("31b")
