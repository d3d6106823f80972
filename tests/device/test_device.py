"""Device choice and its guards: `--device` names a device that exists or the command stops with one line and
exit status 2; a work directory records its device and is not resumed on another; the CPU default is the fp32
forward it always was, and a bf16 forward (autocast) is a recipe choice."""

import json

import pytest
import torch
from typer.testing import CliRunner

from gemmaquant.cli import app
from gemmaquant.device import DeviceError, forward_dtype, resolve_device
from gemmaquant.quantize import QuantizeError, quantize
from gemmaquant.recipe import Recipe, RecipeError

SMALL = dict(n_samples=4, seq_len=32, batch_size=2)


def test_auto_and_cpu_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    assert forward_dtype("auto", torch.device("cpu")) == torch.float32
    assert forward_dtype("auto", torch.device("cuda:0")) == torch.bfloat16


def test_missing_cuda_and_bad_index_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="has 2 CUDA devices"):
        resolve_device("cuda:2")
    with pytest.raises(DeviceError, match="choose auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.parametrize("args", [["quantize", "tiny-moe", "--device", "cuda:7", "--out", "{tmp}/q"],
                                  ["bench", "tiny-moe", "--device", "cuda:7"],
                                  ["eval", "tiny-moe", "{tmp}", "--device", "cuda:7"],
                                  ["qat", "tiny-moe", "--data", "x.txt", "--out", "{tmp}/q", "--device", "cuda:7"],
                                  ["quantize", "tiny-moe", "--device", "gpu", "--dry-run"]])
def test_cli_device_errors_are_one_line_exit_2(tmp_path, monkeypatch, args):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert res.output.strip().count("\n") == 0 and res.output.startswith("error: --device"), res.output


def test_dry_run_reports_device_memory():
    res = CliRunner().invoke(app, ["quantize", "26b-a4b", "--dry-run", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["device_peak_bytes_estimate"] > 0 and d["host_peak_bytes_estimate"] > 0 and "fits_24gb" in d
    assert "24 GB card" in d["text"]


def test_work_dir_records_its_device_and_refuses_another(tmp_path):
    r = Recipe.from_dict({"method": "rtn", **SMALL})
    res = quantize("tiny-dense", r, out=tmp_path, progress=False, device="cpu", stop_after_layer=0)
    state_file = res.work_dir / "state.json"
    state = json.loads(state_file.read_text())
    assert (state["device"], state["forward_dtype"]) == ("cpu", "float32")
    state["device"] = "cuda"  # as if started on a GPU
    state_file.write_text(json.dumps(state))
    with pytest.raises(QuantizeError, match="started on the CUDA"):
        quantize("tiny-dense", r, out=tmp_path, progress=False, device="cpu")


def test_forward_dtype_is_a_recipe_key_left_out_at_its_default():
    assert "forward_dtype" not in Recipe().to_dict()  # output metadata unchanged for every existing recipe
    assert Recipe.from_dict({"forward_dtype": "bfloat16"}).to_dict()["forward_dtype"] == "bfloat16"
    with pytest.raises(RecipeError, match="forward_dtype"):
        Recipe.from_dict({"forward_dtype": "int8"})


def test_bf16_forward_runs_under_autocast_with_fp64_statistics(tmp_path):
    """The GPU's default precision, run here on the CPU: the layers differ from the fp32 forward's (autocast
    took effect) while every matrix is still quantized."""
    base = dict(method="gptq", **SMALL)
    a = quantize("tiny-moe", Recipe.from_dict(base), out=tmp_path / "a", progress=False, device="cpu")
    b = quantize("tiny-moe", Recipe.from_dict({**base, "forward_dtype": "bfloat16"}), out=tmp_path / "b",
                 progress=False, device="cpu")
    assert [x["sqnr_db"].keys() for x in a.layers] == [x["sqnr_db"].keys() for x in b.layers]
    assert a.layers[-1]["sqnr_db"] != b.layers[-1]["sqnr_db"]
    assert json.loads((b.work_dir / "state.json").read_text())["forward_dtype"] == "bfloat16"


def test_host_copy_pins_only_cpu_tensors(monkeypatch):
    """A model object already on the GPU hands quantize() device tensors: only CPU ones can be pinned (a meta tensor
    stands in for a CUDA one here; pin_memory refuses both)."""
    from gemmaquant.device import host_copy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_device = torch.empty(2, device="meta")
    staged = host_copy({"w": on_device}, torch.device("cuda"))
    assert staged["w"] is on_device
