"""Resumption beyond the layers: the source fingerprint (changed weights are refused), the output directory a rerun
accepts as its own, a finished run rerun, and the exports' metadata keys."""

import json
import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gemmaquant
from gemmaquant.checkpoint import Checkpoint, save_checkpoint
from gemmaquant.export import export_compressed_tensors, export_gguf
from gemmaquant.export.gguf_reader import gguf_metadata
from gemmaquant.fingerprint import SourceFingerprint
from gemmaquant.hub import resolve
from gemmaquant.quantize import QuantizeError, quantize
from gemmaquant.quantized import QuantizedSource, finished_layers
from gemmaquant.recipe import Recipe
from gemmaquant.workflow import UsageError, prepare_out, run_quantize

SMALL = dict(method="rtn", weight_format="int4_g32_sym", n_samples=2, seq_len=32, batch_size=2)
DAY = 86_400 * 10**9


@pytest.fixture
def ckpt(tmp_path):
    """tiny-dense as a checkpoint directory of its own (to be changed in place), shard dated a day back."""
    d = tmp_path / "ckpt"
    save_checkpoint(gemmaquant.load("tiny-dense"), d, tokenizer_dir=resolve("tiny-dense"))
    _age(d / "model.safetensors")
    return d


def _age(f, ns=DAY):
    t = time.time_ns() - ns
    os.utime(f, ns=(t, t))


def _edit(ckpt, name):
    """Change one weight of the shard in place (same path, same config)."""
    f = ckpt / "model.safetensors"
    t = load_file(str(f))
    t[name][0, 0] += 1
    save_file(t, str(f), metadata={"format": "pt"})


def test_resume_refuses_changed_weights_of_finished_layers(tmp_path, ckpt):
    r = Recipe.from_dict(SMALL)
    quantize(str(ckpt), r, out=tmp_path / "o", progress=False, stop_after_layer=1)  # layers 0, 1 finished
    _edit(ckpt, "model.layers.4.mlp.up_proj.weight")  # not read yet: the resumed run quantizes the new weights
    quantize(str(ckpt), r, out=tmp_path / "o", progress=False, stop_after_layer=2)
    _edit(ckpt, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(QuantizeError, match=r"model\.safetensors: tensor 'layers\.0\.mlp\.up_proj\.weight' differs "
                                            r"from the weights .* computed from.*--overwrite"):
        quantize(str(ckpt), r, out=tmp_path / "o", progress=False)
    assert finished_layers(tmp_path / "o" / ".gemmaquant-work") == 3  # nothing was added to the mixed run


def test_unchanged_shard_is_trusted_by_its_stat_a_touched_one_rehashed(tmp_path, ckpt):
    r = Recipe.from_dict(SMALL)
    res = quantize(str(ckpt), r, out=tmp_path / "o", progress=False, stop_after_layer=0)
    fp = SourceFingerprint(res.work_dir, Checkpoint(ckpt))
    assert fp._trusted("model.safetensors")  # the common resume: one stat, nothing re-read
    _age(ckpt / "model.safetensors", ns=DAY // 2)  # touched, same bytes: re-hashed, and it passes
    assert not SourceFingerprint(res.work_dir, Checkpoint(ckpt))._trusted("model.safetensors")
    res = quantize(str(ckpt), r, out=tmp_path / "o", progress=False)
    assert finished_layers(res.work_dir) == 6
    assert SourceFingerprint(res.work_dir, Checkpoint(ckpt))._trusted("model.safetensors")  # its new stat recorded
    (ckpt / "model.safetensors").touch()
    SourceFingerprint(res.work_dir, Checkpoint(ckpt)).verify(6, globals_done=True)  # same bytes: passes, recorded
    # a stat taken within RACY_NS of the file's mtime is not trusted: a write in the same clock tick may not show
    assert not SourceFingerprint(res.work_dir, Checkpoint(ckpt))._trusted("model.safetensors")


def test_model_object_weights_are_checked_too(tmp_path):
    model = gemmaquant.load("tiny-dense")
    r = Recipe.from_dict(SMALL)
    quantize(model, r, out=tmp_path, tokenizer_dir=resolve("tiny-dense"), progress=False, stop_after_layer=0)
    model = gemmaquant.load("tiny-dense")  # a fresh copy: the first call may have changed the object
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight[1, 2] += 1
    with pytest.raises(QuantizeError, match=r"the model object: tensor 'layers\.0\.self_attn\.q_proj\.weight'"):
        quantize(model, r, out=tmp_path, tokenizer_dir=resolve("tiny-dense"), progress=False)


def test_output_directory_holding_only_this_commands_work_is_accepted(tmp_path):
    out = tmp_path / "o"
    (out / ".gemmaquant-work").mkdir(parents=True)
    (out / ".m-Q4_0.gguf.tmp-x8a1").write_bytes(b"half a gguf")  # an export killed half-way
    (out / ".safetensors.tmp-k2j9").mkdir()
    (out / "m-Q4_0.gguf").write_bytes(b"written, not recorded")  # a planned output: its step is redone
    prepare_out(out, False, ("m-Q4_0.gguf", "safetensors"))
    assert sorted(p.name for p in out.iterdir()) == [".gemmaquant-work", "m-Q4_0.gguf"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"not empty \(notes\.txt is not this command's output\); pass --overwrite"):
        prepare_out(out, False, ("m-Q4_0.gguf", "safetensors"))
    prepare_out(out, True, ())
    assert not list(out.iterdir())  # --overwrite: everything goes, the run starts over


def test_planned_names_without_a_work_directory_are_not_ours(tmp_path):
    (tmp_path / "report.md").write_text("someone's notes")
    with pytest.raises(UsageError, match="not empty"):
        prepare_out(tmp_path, False, ("report.md",))


def test_finished_run_rerun_does_nothing_and_redoes_a_missing_output(tmp_path, ckpt, monkeypatch):
    out = tmp_path / "o"
    kw = dict(formats="gguf,safetensors", out=out, evaluate=False, progress=False)
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in SMALL.items()))
    first = run_quantize(str(ckpt), recipe_file=recipe_file, **kw)
    work = out / ".gemmaquant-work"
    assert not list(work.glob("*.safetensors"))  # pruned to the records
    gguf = out / "ckpt-Q4_0.gguf"
    stamp, data = gguf.stat().st_mtime_ns, gguf.read_bytes()
    second = run_quantize(str(ckpt), recipe_file=recipe_file, **kw)  # was: "not empty; pass --overwrite"
    assert second["files"] == first["files"] and gguf.stat().st_mtime_ns == stamp
    gguf.unlink()
    run_quantize(str(ckpt), recipe_file=recipe_file, **kw)  # the layers again (pruned), then the GGUF
    assert gguf.read_bytes() == data
    _edit(ckpt, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(QuantizeError, match="differs from the weights"):
        run_quantize(str(ckpt), recipe_file=recipe_file, **kw)


def test_exported_metadata_keys_have_one_prefix(tmp_path):
    res = quantize("tiny-dense", Recipe.from_dict(SMALL), out=tmp_path, progress=False)
    src = QuantizedSource(res.work_dir)
    meta = gguf_metadata(export_gguf(src, tmp_path / "m.gguf", type="Q4_0"))
    assert set(meta) == {"recipe", "calibration_sha256", "version"}  # was gemmaquant.gemmaquant.recipe, ...
    assert json.loads(meta["recipe"])["method"] == "rtn"
    export_compressed_tensors(src, tmp_path / "st")
    with safe_open(str(tmp_path / "st" / "model.safetensors"), framework="pt") as f:
        assert set(f.metadata()) == {"format", "gemmaquant.recipe", "gemmaquant.calibration_sha256",
                                     "gemmaquant.version"}
    state = json.loads((res.work_dir / "state.json").read_text())
    state["metadata"] = {f"gemmaquant.{k}": v for k, v in state["metadata"].items()}  # a work dir from before
    (res.work_dir / "state.json").write_text(json.dumps(state))
    assert set(QuantizedSource(res.work_dir).metadata) == {"recipe", "calibration_sha256", "version"}


@pytest.mark.parametrize("name,damage", [("layer_00000.json", b"{not json"), ("acts_00002.safetensors", b"\x00" * 40),
                                         ("state.json", b"[1, 2]"), ("source.json", b"\xff\xfe")])
def test_damaged_work_records_are_named(tmp_path, ckpt, name, damage):
    """A work directory file changed after gemmaquant wrote it: the resumed run names it and says what to do, with
    the library's error type (the CLI's exit 2), instead of an internal error."""
    from gemmaquant.errors import GemmaquantError
    from gemmaquant.quantized import DamagedWorkDir, read_values
    from gemmaquant.resume import Steps

    r = Recipe.from_dict({**SMALL, "method": "gptq"} if name.startswith("acts_") else SMALL)  # RTN keeps no acts
    work = tmp_path / "o" / ".gemmaquant-work"
    quantize(str(ckpt), r, out=tmp_path / "o", progress=False, stop_after_layer=1)
    assert (work / name).is_file()
    (work / name).write_bytes(damage)
    with pytest.raises(DamagedWorkDir, match=rf"{name}: damaged \(.*\); the run cannot resume .*--overwrite"):
        quantize(str(ckpt), r, out=tmp_path / "o", progress=False)
    assert issubclass(DamagedWorkDir, GemmaquantError)
    if name == "layer_00000.json":  # the exporters' and the later steps' readers of the same directory
        (work / "layer_00001.safetensors").write_bytes(b"\x00" * 40)
        with pytest.raises(DamagedWorkDir, match=r"layer_00001\.safetensors: damaged"):
            read_values(work / "layer_00001.safetensors")
        (work / "steps.json").write_text("{garbage")
        with pytest.raises(DamagedWorkDir, match=r"steps\.json: damaged"):
            Steps(tmp_path / "o")
