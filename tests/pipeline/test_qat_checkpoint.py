"""QAT checkpoints (issue 31): `quantize` detects a checkpoint on an int4 group-32 lattice and reads it back. The Q4_0
GGUF (dequantized by the gguf package) and the compressed-tensors W4A16 export (loaded by transformers in bf16)
give back the checkpoint's weights bit for bit; a compressed-tensors checkpoint repacks to the same Q4_0 blocks;
bad input (forced on float weights, a tensor off the lattice) is refused or reported."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gemmaquant
from gemmaquant.checkpoint import Checkpoint
from gemmaquant.export.gguf_names import gguf_name
from gemmaquant.fixtures.lattice import make_lattice_checkpoint
from gemmaquant.plan import float_reason
from gemmaquant.qat_checkpoint import LatticeError
from gemmaquant.workflow import run_quantize

OFF = "layers.1.mlp.down_proj"  # left off the lattice in the partial checkpoint


def quantized_names(ckpt: Checkpoint) -> list[str]:
    return [n for n in ckpt.text_names() if n.startswith("layers.") and float_reason(n) is None
            and len(ckpt.shape(n)) >= 2]


def small_recipe(directory, method: str):
    """The default int4 g32 recipe with a small calibration set (the lattice needs none; GPTQ some)."""
    path = directory / f"int4-{method}.toml"
    path.write_text(f'method = "{method}"\nweight_format = "int4_g32_sym"\nn_samples = 4\nseq_len = 64\n')
    return path


def gguf_values(path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(str(path))
    return {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat-dense")
    codes = make_lattice_checkpoint("tiny-dense", root / "qat", seed=1)
    res = run_quantize(str(root / "qat"), recipe_file=small_recipe(root, "gptq"), out=root / "out", evaluate=False,
                       progress=False, device="cpu")
    return root, codes, res


def test_quantize_detects_and_reads_the_lattice_back(dense):
    root, codes, res = dense
    assert res["recipe"]["weight_format"] == "int4_g32_lattice"
    assert res["lattice"]["detection"]["detected"] and res["lattice"]["share"] == 1.0
    assert res["lattice"]["rerounded"] == {} and "QAT lattice read back" in res["text"]
    ckpt = Checkpoint(root / "qat")
    tensors = gguf_values(res["files"]["gguf"])
    for n in quantized_names(ckpt):
        t = tensors[gguf_name(n)]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, n
        deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(ckpt.shape(n))
        # llama.cpp's d * (u - 8) in fp32, rounded to the checkpoint's bf16: its weights, bit for bit
        assert torch.equal(deq.to(torch.bfloat16), ckpt.get(n)), n


def test_w4a16_export_in_transformers_equals_the_qat_weights_bit_for_bit(dense):
    from transformers import AutoModelForCausalLM

    root, codes, res = dense
    hf = AutoModelForCausalLM.from_pretrained(res["files"]["safetensors"], dtype=torch.bfloat16,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        hf(torch.arange(3, 9)[None])  # compressed-tensors decompresses on the first forward
    theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ckpt = Checkpoint(root / "qat")
    names = quantized_names(ckpt)
    assert names and all(theirs[n].dtype == torch.bfloat16 for n in names)
    for n in names:
        assert torch.equal(theirs[n], ckpt.get(n)), n


def test_dry_run_reads_the_lattice_layer_by_layer(dense):
    root, _, _ = dense
    res = run_quantize(str(root / "qat"), dry_run=True, progress=False)
    assert "QAT lattice: detected" in res["text"] and "40/40 tensors wholly on the lattice" in res["text"]
    assert len(res["lattice"]["scan"]) == 40 and all(r["share"] == 1.0 for r in res["lattice"]["scan"])
    off = run_quantize(str(root / "qat"), dry_run=True, progress=False, from_qat=False)
    assert off["recipe"]["weight_format"] == "int4_g32_sym" and "lattice" not in off


def test_float_checkpoint_is_not_detected_and_refused_when_forced(tmp_path):
    res = run_quantize("tiny-dense", dry_run=True, progress=False)
    assert res["recipe"]["weight_format"] == "int4_g32_sym" and "QAT lattice: not detected" in res["text"]
    with pytest.raises(LatticeError, match=r"tensor 'layers\.0\.self_attn\.q_proj\.weight' has 0\.0% of its groups"):
        run_quantize("tiny-dense", dry_run=True, progress=False, from_qat=True)


def test_cli_from_qat_on_float_weights_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from gemmaquant.cli import app

    r = CliRunner().invoke(app, ["quantize", "tiny-dense", "--from-qat", "--dry-run"])
    assert r.exit_code == 2 and "not on an int4 group-32 lattice" in r.output and len(r.output.splitlines()) == 1


def test_partial_lattice_lists_what_was_rerounded(tmp_path):
    make_lattice_checkpoint("tiny-dense", tmp_path / "qat", seed=2, off_tensors=(OFF,))
    res = run_quantize(str(tmp_path / "qat"), recipe_file=small_recipe(tmp_path, "rtn"), out=tmp_path / "out",
                       evaluate=False, progress=False, device="cpu", formats="gguf")
    assert set(res["lattice"]["rerounded"]) == {f"{OFF}.weight"}
    assert res["lattice"]["rerounded"][f"{OFF}.weight"]["by"] == "rtn"
    assert f"re-rounded by rtn: {OFF}.weight" in res["text"]
    from gemmaquant.eval.report import lattice_lines

    layers = json.loads((tmp_path / "out" / ".gemmaquant-work" / "layers.json").read_text())
    assert f"| {OFF}.weight | {192 * 576 // 32} | rtn |" in lattice_lines(layers)  # the report's table
    ckpt = Checkpoint(tmp_path / "qat")
    t = gguf_values(res["files"]["gguf"])[gguf_name("layers.0.mlp.down_proj.weight")]
    deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(t.data.shape[0], -1)
    assert torch.equal(deq.to(torch.bfloat16), ckpt.get("layers.0.mlp.down_proj.weight"))


def test_library_call_on_a_model_object_detects_it_and_leaves_it_unchanged(dense, tmp_path):
    root, _, _ = dense
    model = gemmaquant.load(root / "qat")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = small_recipe(tmp_path, "rtn")
    res = gemmaquant.quantize(model, recipe, out=tmp_path / "on", tokenizer_dir=root / "qat", progress=False)
    assert res.recipe.weight_format == "int4_g32_lattice" and res.lattice["share"] == 1.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    off = gemmaquant.quantize(model, recipe, out=tmp_path / "off", tokenizer_dir=root / "qat", progress=False,
                              from_qat=False)
    assert off.recipe.weight_format == "int4_g32_sym" and off.lattice is None


def test_compressed_tensors_checkpoint_repacks_to_the_same_q4_0(tmp_path):
    """tiny-moe (experts too): our W4A16 export of a QAT checkpoint, given back to `quantize`, becomes a Q4_0 GGUF
    whose blocks are byte for byte those of the GGUF written from the lattice directly."""
    make_lattice_checkpoint("tiny-moe", tmp_path / "qat", seed=3)
    res = run_quantize(str(tmp_path / "qat"), recipe_file=small_recipe(tmp_path, "rtn"), out=tmp_path / "out",
                       evaluate=False, progress=False, device="cpu")
    ct = res["files"]["safetensors"]
    rep = run_quantize(ct, out=tmp_path / "repacked", progress=False)
    assert "no rounding" in rep["text"]
    a, b = gguf_values(res["files"]["gguf"]), gguf_values(rep["files"]["gguf"])
    ckpt = Checkpoint(tmp_path / "qat")
    for n in quantized_names(ckpt):
        g = gguf_name(n)
        assert b[g].tensor_type == gguf.GGMLQuantizationType.Q4_0, n
        assert np.array_equal(a[g].data, b[g].data), n


def test_repack_refuses_a_scale_fp16_cannot_hold(dense, tmp_path):
    import shutil

    from safetensors.torch import save_file

    ct = tmp_path / "ct"
    shutil.copytree(dense[2]["files"]["safetensors"], ct)
    f = f"{ct}/model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("q_proj.weight_scale"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = 1e-30  # a bf16 value far below fp16's range
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(LatticeError, match="weight_scale holds a value fp16 cannot store"):
        run_quantize(str(ct), out=tmp_path / "repacked", progress=False)


def test_qat_train_output_is_read_back_and_repacked_exactly(tmp_path):
    """The second QAT-like fixture: gemmaquant's own qat_train result. Its compressed-tensors export repacks into
    the very Q4_0 blocks qat_train's GGUF holds; its weights saved as a bf16 checkpoint are detected as a QAT
    checkpoint, every group is read back, and the Q4_0 GGUF gives those weights back bit for bit."""
    from gemmaquant.checkpoint import save_checkpoint
    from gemmaquant.fixtures import documents, fixture_path
    from gemmaquant.qat import qat_train

    data = tmp_path / "train.txt"
    data.write_text("\n<eos>\n".join(documents("train")[:20]) + "\n")
    rep = qat_train("tiny-dense", bits=4, data=data, steps=2, out=tmp_path / "qat", progress=False, batch_size=2,
                    seq_len=32, calib_samples=4, calib_seq_len=32, eval_seqs=0)
    repacked = run_quantize(rep["files"]["safetensors"], out=tmp_path / "repacked", progress=False)
    a, b = gguf_values(rep["files"]["gguf"]), gguf_values(repacked["files"]["gguf"])
    names = [n for n in a if a[n].tensor_type == gguf.GGMLQuantizationType.Q4_0]
    assert names and all(np.array_equal(a[n].data, b[n].data) for n in names)

    ckpt_dir = save_checkpoint(gemmaquant.load(rep["files"]["safetensors"]), tmp_path / "ckpt",
                               tokenizer_dir=fixture_path("tiny-dense"))
    res = run_quantize(str(ckpt_dir), recipe_file=small_recipe(tmp_path, "gptq"), out=tmp_path / "out",
                       evaluate=False, progress=False, device="cpu", formats="gguf")
    assert res["lattice"]["share"] == 1.0 and res["lattice"]["detection"]["detected"]
    ckpt = Checkpoint(ckpt_dir)
    ours = gguf_values(res["files"]["gguf"])
    for n in quantized_names(ckpt):
        t = ours[gguf_name(n)]
        deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(ckpt.shape(n))
        assert torch.equal(deq.to(torch.bfloat16), ckpt.get(n)), n
