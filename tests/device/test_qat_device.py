"""QAT on the device of the model: one training step (prepare_qat, the distillation loss and its backward, gradient
clipping, AdamW, the moving average: what each step of qat_train does) with every tensor a fake CUDA tensor
(tests/device/fake_cuda.py: a tensor left on the CPU raises), and one real qat_train step with device="cpu"."""

import dataclasses

import pytest
import torch

from gemmaquant.config import TINY_VARIANTS
from gemmaquant.model.gemma4 import Gemma4
from gemmaquant.model.testing import random_model
from gemmaquant.qat import QATRecipe, prepare_qat
from gemmaquant.qat.distill import Taps
from gemmaquant.qat.state import WeightAverage
from gemmaquant.qat.train import _device_for, for_model, param_groups
from tests.device.fake_cuda import fake_cuda

# tiny-26b-a4b shrunk to 2 layers and 4 experts (K = 256: a Q4_K super-block), so the fake-tensor ops stay few
MICRO = dataclasses.replace(TINY_VARIANTS["tiny-26b-a4b"], vocab_size=256, hidden_size=256, intermediate_size=256,
                            moe_intermediate_size=256, num_experts=4, top_k_experts=2, num_hidden_layers=2,
                            num_attention_heads=8,
                            layer_types=("sliding_attention", "full_attention"))


def _one_step(teacher, student, ids, fmt, monkeypatch):
    """One qat_train step, as its loop makes it (gemmaquant/qat/train.py), but for autograd: recording a graph on
    a CUDA tensor, or running its backward, needs the CUDA runtime (a CPU-only build aborts the process), so the
    forward passes run without a graph, the gradients are set by hand (zeros on each parameter's device, where
    autograd puts them) and grid_sensitivity (an autograd.grad inside param_groups) is taken as 1. What stays:
    prepare_qat, both forward passes with the loss and its taps, gradient clipping, AdamW and the moving average.
    The real backward on CUDA runs in test_qat_train_on_cuda (GPU only, scripts/gpu_check.sh)."""
    import gemmaquant.qat.train as train
    from gemmaquant.qat.distill import qat_loss

    monkeypatch.setattr(train, "grid_sensitivity", lambda fmt, params: {k: 1.0 for k in params})
    r = for_model(QATRecipe(batch_size=ids.shape[0], seq_len=ids.shape[1], steps=10), teacher.config)
    prepare_qat(student, fmt, learnable_scales=True, learnable_ints=True)
    opt = torch.optim.AdamW(param_groups(student, r), betas=(0.9, 0.95), weight_decay=0.0)
    average = WeightAverage(student, 0.9)
    t_taps, s_taps = Taps(teacher, True, True), Taps(student, True, True)
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # (the student's too: recording autograd's graph on a CUDA tensor needs CUDA)
        loss, parts = qat_loss(student(ids), teacher(ids), s_taps, t_taps, r)
    assert loss.device.type == "cuda" and set(parts) >= {"kl"}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], r.grad_clip)
    opt.step()
    average.update()
    t_taps.remove(), s_taps.remove()
    return opt, average


@pytest.mark.parametrize("fmt", ["int4_g32_sym", pytest.param("q4_k", marks=pytest.mark.slow)])  # q4_k: ~1 min
def test_one_qat_step_on_a_fake_cuda_device(fmt, monkeypatch):
    ids = torch.randint(0, MICRO.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with fake_cuda():
        with torch.device("cuda"):
            teacher, student = Gemma4(MICRO).eval(), Gemma4(MICRO)
        for p in teacher.parameters():
            p.requires_grad_(False)
        opt, average = _one_step(teacher, student, ids.to("cuda"), fmt, monkeypatch)
        trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        assert any(".parametrizations.weight.0." in n for n, _ in trained)  # the block scales train too
        wrong = [n for n, p in trained if p.device.type != "cuda"]
        assert not wrong, f"left off the device: {wrong[:5]}"
        moments = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
        assert moments and all(t.device.type == "cuda" for t in moments)
        assert all(t.device.type == "cuda" for t in average.avg.values())


def test_device_follows_the_model_object():
    m = random_model(MICRO)
    assert _device_for(m, None) == torch.device("cpu")
    assert _device_for("tiny-moe", "cpu") == torch.device("cpu")
    with fake_cuda():
        assert _device_for(m.to("cuda"), None).type == "cuda"


def test_one_real_qat_step_with_device_cpu(tmp_path):
    from gemmaquant.fixtures import documents
    from gemmaquant.qat import qat_train

    data = tmp_path / "train.txt"
    data.write_text("\n<eos>\n".join(documents("train")[:20]) + "\n")
    rep = qat_train("tiny-moe", data=data, steps=1, out=tmp_path / "o", progress=False, export=False, device="cpu",
                    batch_size=2, seq_len=32, calib_samples=2, calib_seq_len=32, eval_seqs=0)
    assert len(rep["log"]) == 1 and rep["log"][0]["kl"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_qat_train_on_cuda(tmp_path):
    """The whole of qat_train on the GPU, against the same run on the CPU: the same training to float rounding."""
    from gemmaquant.fixtures import documents
    from gemmaquant.qat import qat_train

    data = tmp_path / "train.txt"
    data.write_text("\n<eos>\n".join(documents("train")[:20]) + "\n")
    kw = dict(data=data, steps=2, progress=False, batch_size=2, seq_len=32, calib_samples=2, calib_seq_len=32,
              eval_seqs=2, eval_seq_len=32)
    gpu = qat_train("tiny-moe", out=tmp_path / "cuda", device="cuda", **kw)
    cpu = qat_train("tiny-moe", out=tmp_path / "cpu", device="cpu", **kw)
    assert (tmp_path / "cuda" / "tiny-moe-Q4_0.gguf").is_file()
    # the GPU's GPTQ start runs a bf16 forward: the same training, not the same bits
    assert gpu["qat"]["kl_mean"] == pytest.approx(cpu["qat"]["kl_mean"], rel=0.5)
    assert gpu["qat"]["kl_mean"] < gpu["ptq"]["kl_mean"] * 1.5
