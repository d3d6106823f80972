"""The streaming PTQ pipeline on the bundled trained fixtures: every matrix (every expert included) lands on its
planned grid, MoE coverage is recorded, a killed run resumes to byte-identical output, bad input is refused."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import gemmaquant
from gemmaquant.calibration import CalibrationError
from gemmaquant.checkpoint import CheckpointError, save_checkpoint
from gemmaquant.formats.base import Packed
from gemmaquant.hub import resolve
from gemmaquant.plan import make_plan
from gemmaquant.quantize import QuantizeError, quantize
from gemmaquant.quantized import QuantizedSource, finished_layers
from gemmaquant.recipe import Recipe

SMALL = dict(n_samples=8, seq_len=64, batch_size=4)


def recipe(method="gptq", fmt="int4_g32_sym", **kw):
    return Recipe.from_dict({"method": method, "weight_format": fmt, **SMALL, **kw})


@pytest.mark.parametrize("fixture", ["tiny-moe", "tiny-edge", "tiny-dense"])
def test_every_planned_matrix_is_quantized_onto_its_grid(tmp_path, fixture):
    r = recipe()
    res = quantize(fixture, r, out=tmp_path, progress=False)
    src = QuantizedSource(res.work_dir)
    cfg = src.config
    plan = make_plan(cfg, r)
    for name, p in plan.items():
        v = src.get(name)
        if p.fmt is None:
            assert isinstance(v, torch.Tensor), name
            assert p.reason, f"{name} kept in float without a stated reason"
            continue
        packs = v if isinstance(v, list) else [v]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert len(packs) == cfg.num_experts, name
        for pk in packs:
            assert isinstance(pk, Packed) and pk.fmt == p.fmt, name
            # the stored codes are a fixed point of the grid: re-quantizing the dequantized weights gives them back
            again = pk.fmt.quantize(pk.fmt.dequantize(pk), params=pk.fmt.params(pk))
            assert torch.equal(again.fmt.codes(again), pk.fmt.codes(pk)), name
    if cfg.enable_moe_block:
        for info in res.layers:
            assert len(info["expert_tokens"]) == cfg.num_experts
            assert sum(info["expert_tokens"]) == SMALL["n_samples"] * SMALL["seq_len"] * cfg.top_k_experts


def test_rare_experts_get_forced_routing_statistics(tmp_path):
    r = recipe(moe_min_tokens=10**6)  # every expert counts as rare
    res = quantize("tiny-moe", r, out=tmp_path, progress=False)
    cfg = QuantizedSource(res.work_dir).config
    for info in res.layers:
        assert info["forced_experts"] == list(range(cfg.num_experts))


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import gemmaquant  # noqa: F401  (gemmaquant.quantize is the function; the module is in sys.modules)
    q = sys.modules["gemmaquant.quantize"]
    from gemmaquant.recipe import Recipe
    kill_at = int(sys.argv[2])
    real = q.save_layer
    def save_layer(work, i, values, info):
        if i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # after layer i's inputs were written, before the layer
        real(work, i, values, info)
    q.save_layer = save_layer
    r = Recipe.from_dict(dict(method="gptq", weight_format="int4_g32_sym", n_samples=8, seq_len=64, batch_size=4))
    q.quantize("tiny-edge", r, out=sys.argv[1], progress=False)
""")


def _files(work):
    # the weights; the per-layer .json files also hold timings
    return {p.name: p.read_bytes() for p in sorted(work.glob("*.safetensors"))
            if p.name.startswith(("layer_", "globals"))}


def test_kill_9_then_rerun_resumes_byte_identical(tmp_path):
    r = recipe()
    whole = quantize("tiny-edge", r, out=tmp_path / "whole", progress=False)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), "2"], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    work = out / ".gemmaquant-work"
    assert finished_layers(work) == 2
    resumed = quantize("tiny-edge", r, out=out, progress=False)
    assert _files(resumed.work_dir) == _files(whole.work_dir)


def test_resume_refuses_a_different_recipe(tmp_path):
    quantize("tiny-dense", recipe(), out=tmp_path, progress=False, stop_after_layer=0)
    with pytest.raises(QuantizeError, match="another recipe"):
        quantize("tiny-dense", recipe(method="rtn"), out=tmp_path, progress=False)
    with pytest.raises(QuantizeError, match="another recipe"):
        quantize("tiny-dense", recipe(importance_params=False), out=tmp_path, progress=False)


def test_work_dir_from_before_a_recipe_key_resumes(tmp_path):
    """A state.json written before `importance_params` existed lacks it, and was made with plain GPTQ: it resumes
    under `importance_params = false` and is refused under today's default (true) rather than mixed with it."""
    quantize("tiny-dense", recipe(importance_params=False), out=tmp_path, progress=False, stop_after_layer=0)
    state_file = tmp_path / ".gemmaquant-work" / "state.json"
    state = json.loads(state_file.read_text())
    del state["recipe"]["importance_params"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(QuantizeError, match="another recipe"):
        quantize("tiny-dense", recipe(), out=tmp_path, progress=False)
    res = quantize("tiny-dense", recipe(importance_params=False), out=tmp_path, progress=False)
    assert finished_layers(res.work_dir) == QuantizedSource(res.work_dir).config.num_hidden_layers


def test_importance_params_reaches_gptq(tmp_path):
    """The recipe key (default on) turns on GPTQ's imatrix-style block parameters: the scales move, the grid
    stays."""
    assert Recipe().importance_params
    plain = QuantizedSource(quantize("tiny-dense", recipe(importance_params=False), out=tmp_path / "a",
                                     progress=False).work_dir)
    weighted = QuantizedSource(quantize("tiny-dense", recipe(), out=tmp_path / "b", progress=False).work_dir)
    name = "layers.0.self_attn.q_proj.weight"
    p, w = plain.get(name), weighted.get(name)
    assert isinstance(p, Packed) and p.fmt.name == w.fmt.name == "int4_g32_sym"
    assert not torch.equal(p.data["scale"], w.data["scale"])


def test_empty_and_short_calibration_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="empty"):
        quantize("tiny-dense", recipe(), out=tmp_path / "a", calib=str(empty), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    with pytest.raises(CalibrationError, match="too short"):
        quantize("tiny-dense", recipe(), out=tmp_path / "b", calib=str(short), progress=False)


def test_nan_weight_is_named(tmp_path):
    model = gemmaquant.load("tiny-dense")
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(QuantizeError, match=r"layers\.1\.mlp\.up_proj\.weight.*NaN"):
        quantize(model, recipe(), out=tmp_path, tokenizer_dir=resolve("tiny-dense"), progress=False)


def test_not_gemma4_is_refused(tmp_path):
    d = tmp_path / "llama"
    save_checkpoint(gemmaquant.load("tiny-dense"), d)
    raw = json.loads((d / "config.json").read_text())
    raw["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type"):
        quantize(str(d), recipe(), out=tmp_path / "o", progress=False)


def test_accepts_a_transformers_model_object(tmp_path):
    from gemmaquant.model.testing import hf_causal_lm

    model = gemmaquant.load("tiny-moe")
    hf = hf_causal_lm(model)
    a = quantize(hf, recipe(method="rtn"), out=tmp_path / "hf", tokenizer_dir=resolve("tiny-moe"), progress=False)
    b = quantize("tiny-moe", recipe(method="rtn"), out=tmp_path / "ours", progress=False)
    assert _files(a.work_dir).keys() == _files(b.work_dir).keys()
    for i in range(model.config.num_hidden_layers):
        assert (a.work_dir / f"layer_{i:05d}.safetensors").read_bytes() == \
               (b.work_dir / f"layer_{i:05d}.safetensors").read_bytes()


def test_top_level_verb_takes_a_recipe_object_file_or_name(tmp_path):
    """Issue #4's API: gemmaquant.quantize(model_or_path, recipe, ...), the recipe as an object, a file or a name."""
    import gemmaquant

    small = dict(method="rtn", weight_format="int8", n_samples=2, seq_len=32, batch_size=2)
    a = gemmaquant.quantize("tiny-dense", gemmaquant.Recipe.from_dict(small), out=tmp_path / "a", progress=False)
    f = tmp_path / "r.toml"
    f.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in small.items()))
    b = gemmaquant.quantize("tiny-dense", f, out=tmp_path / "b", progress=False)
    layer = "layer_00000.safetensors"
    assert (a.work_dir / layer).read_bytes() == (b.work_dir / layer).read_bytes()
    c = gemmaquant.quantize("tiny-dense", "default/int8-rtn", out=tmp_path / "c", progress=False, stop_after_layer=0)
    assert (c.work_dir / layer).is_file()
    with pytest.raises(gemmaquant.recipe.RecipeError, match="no bundled recipe"):
        gemmaquant.quantize("tiny-dense", "no/such-recipe", out=tmp_path / "d")


def test_a_row_that_does_not_hold_whole_super_blocks_is_refused_by_the_plan():
    """q4_k's affine block is 32 but a row must hold whole 256-element super-blocks: the plan says so up front."""
    from gemmaquant.workflow import model_config

    with pytest.raises(gemmaquant.recipe.RecipeError, match=r"192 input features do not fit q4_k's 256-element blocks"):
        make_plan(model_config("tiny-dense"), Recipe(weight_format="q4_k"))
    assert make_plan(model_config("tiny-dense"), Recipe(weight_format="iq4_nl"))  # 32-blocks fit 192


@pytest.mark.parametrize("mix", ["IQ4_XS", "Q3_K_S"])
def test_gptq_onto_a_new_gguf_mix_exports_the_grids_it_chose(tmp_path, mix):
    """GPTQ onto IQ4_XS (IQ4_NL on rows IQ4_XS cannot hold) / Q3_K_S (Q4_0 likewise), then the GGUF: every tensor has the mix's
    type and its bytes dequantize (gguf.quants) to exactly the values GPTQ chose."""
    import gguf
    import numpy as np

    from gemmaquant.export.gguf_mix import gguf_mix_plan
    from gemmaquant.export.gguf_names import text_name
    from gemmaquant.workflow import export_outputs

    r = Recipe.from_dict({"method": "gptq", "gguf_type": mix, **SMALL})
    res = quantize("tiny-moe", r, out=tmp_path / "work", progress=False)
    files = export_outputs(res.work_dir, tmp_path, "tiny-moe", r, ("gguf",))
    src = QuantizedSource(res.work_dir)
    want = gguf_mix_plan(src.config, mix, shapes={p.name: tuple(p.shape) for p in res.plan.values()})
    seen = set()
    for t in gguf.GGUFReader(files["gguf"]).tensors:
        name = text_name(t.name)
        if name is None or res.plan[name].fmt is None:
            continue
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        assert kind == want[name], name
        seen.add(kind)
        v = src.get(name)
        ours = torch.stack([p.fmt.dequantize(p) for p in (v if isinstance(v, list) else [v])]).numpy()
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ours.shape)
        assert np.array_equal(got.view(np.uint32), ours.view(np.uint32)), name
    assert {"IQ4_XS": {"IQ4_XS", "IQ4_NL"}, "Q3_K_S": {"Q3_K", "Q4_0"}}[mix] <= seen


def test_rtn_runs_no_forward_and_writes_the_float_exports_bytes(tmp_path, monkeypatch):
    """Plain RTN reads no statistics, so the quantizer runs no calibration forward (issue 26: the CLI's RTN path
    took 16x llama.cpp's time, most of it in that forward), and its GGUF holds exactly what export_gguf writes
    from the float checkpoint (the llama-quantize path): the same tensors, types and bytes."""
    import importlib

    import gguf
    import numpy as np

    from gemmaquant.export import FloatSource, export_gguf
    from gemmaquant.workflow import run_quantize

    def no_forward(*a, **k):
        raise AssertionError("RTN ran a calibration forward")

    monkeypatch.setattr(importlib.import_module("gemmaquant.quantize"), "run_layer", no_forward)
    res = run_quantize("tiny-moe", method="rtn", formats="gguf", gguf_type="Q4_K_M", out=tmp_path / "o",
                       evaluate=False, progress=False, device="cpu")
    assert not list((tmp_path / "o").rglob("acts_*.safetensors"))
    ref = export_gguf(FloatSource(resolve("tiny-moe")), tmp_path / "ref.gguf", type="Q4_K_M")
    ours = {t.name: t for t in gguf.GGUFReader(res["files"]["gguf"]).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.asarray(ours[name].data).tobytes() == np.asarray(t.data).tobytes(), name
