"""QAT is never silently worse than its GPTQ start (issue 29): the held-out split, best-state selection, its
survival across a resume, the report's plain statement, and the run length set from the amount of text."""

import pytest
import torch

from gemmaquant.fixtures import documents
from gemmaquant.qat import QATError, QATRecipe, qat_train
from gemmaquant.qat.heldout import split_heldout
from gemmaquant.qat.schedule import MAX_STEPS, MIN_STEPS, default_steps
from gemmaquant.quantized import QuantizedSource

SMALL = dict(batch_size=2, seq_len=64, calib_samples=4, calib_seq_len=64, eval_seqs=2, eval_seq_len=64, save_every=50,
             select_windows=4)
# rates far past anything that trains: every step undoes GPTQ's work, so the held-out KL only rises
BAD = dict(lr=5.0, scale_lr=1.0, float_lr=0.3, embed_lr=0.3, warmup=0, average=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n<eos>\n".join(documents("train")[:40]) + "\n")
    return path


def dequantized(work) -> dict[str, torch.Tensor]:
    return QuantizedSource(work).dequantized_state()


def test_split_holds_out_the_tail_in_whole_windows():
    stream = torch.arange(10_000)
    r = QATRecipe(batch_size=4, seq_len=100, select_windows=8, heldout_share=0.1)
    train, ids, source = split_heldout(stream, r, None)
    assert torch.equal(train, stream[:9000]) and ids.shape == (8, 100) and "10%" in source
    assert ids.min() >= 9000 and ids[-1, -1] == 9999 and len(set(ids[:, 0].tolist())) == 8  # never trained on
    held = torch.arange(50_000, 50_250)  # a held-out file: the training text stays whole
    train, ids, source = split_heldout(stream, r, held)
    assert torch.equal(train, stream) and ids.shape == (2, 100) and ids.min() >= 50_000 and "file" in source
    with pytest.raises(QATError, match="too short to hold out"):
        split_heldout(torch.arange(450), r, None)
    with pytest.raises(QATError, match="held-out text"):
        split_heldout(stream, r, torch.arange(99))
    with pytest.raises(QATError, match="heldout_share"):
        QATRecipe(heldout_share=1.0)
    with pytest.raises(QATError, match="select_windows"):
        QATRecipe(select_windows=-1)


def test_steps_follow_the_amount_of_text():
    assert default_steps(833_286, 8, 128) == MAX_STEPS == 1000  # the bundled text: the measured 1000 steps
    assert default_steps(120_000, 8, 128) == 585  # a 310 KB text: at most 5 passes over it
    assert default_steps(73_000, 8, 128) == MIN_STEPS == 400  # a 190 KB text: repeated rather than trained less
    assert default_steps(20_000, 8, 128) == 400
    assert default_steps(150_000, 32, 128) == 400  # an MoE model's 4x batch goes through the text 4x faster
    from gemmaquant.qat.schedule import MAX_RATE_SCALE, for_data, rate_scale
    from gemmaquant.qat.train import LR, SCALE_LR

    assert rate_scale(1000) == rate_scale(2000) == 1.0 and rate_scale(500) == min(2.0, MAX_RATE_SCALE)
    assert rate_scale(400) == 2.5 and rate_scale(100) == MAX_RATE_SCALE == 4.0
    r = for_data(QATRecipe(batch_size=8), 20_000)  # 400 steps: the rates raised so steps x rate is the 1000-step run's
    assert r.steps == 400 and r.lr == LR * 2.5 and r.scale_lr == SCALE_LR * 2.5
    assert (r.batch_size, r.seq_len) == (8, 128)  # batch and sequence length do not follow the text
    r = for_data(QATRecipe(batch_size=8, steps=200, lr=0.001), 20_000)  # what the caller sets stays
    assert r.steps == 200 and r.lr == 0.001 and r.scale_lr == SCALE_LR * rate_scale(200)
    assert for_data(QATRecipe(batch_size=8), 10**6).lr == LR


def test_a_run_that_only_gets_worse_exports_its_gptq_start_and_says_so(tmp_path, data):
    """Rates that wreck the model: no held-out evaluation beats step 0, so the exported model is the GPTQ start,
    also after an interruption and a resume (the best state and its score come back from the checkpoint); the
    summary and the report say it plainly; export_last=True exports the last (worse) state with a warning."""
    kw = dict(bits=4, data=data, steps=4, eval_every=1, progress=False, export=False, **SMALL, **BAD)
    stopped = qat_train("tiny-dense", out=tmp_path, stop_after_step=1, **kw)
    assert stopped["stopped_at_step"] == 2
    rep = qat_train("tiny-dense", out=tmp_path, **kw)  # resumes after step 2
    sel = rep["selection"]
    assert [e["step"] for e in sel["evals"]] == [0, 1, 2, 3, 4]
    assert sel["best_step"] == 0 and sel["exported"] == "gptq" and not sel["qat_beat_ptq"]
    assert all(e["kl"] > sel["ptq_kl"] for e in sel["evals"][1:]) and sel["best_kl"] == sel["ptq_kl"]
    assert "DID NOT BEAT ITS GPTQ START" in rep["text"]
    assert "DID NOT BEAT ITS GPTQ START" in (tmp_path / "qat-report.md").read_text()
    gptq, exported = dequantized(rep["work_dir"]), dequantized(rep["files"]["quantized"])
    for name, w in gptq.items():  # the GPTQ start's weights exactly, quantized and float alike
        assert torch.equal(exported[name].float(), w.float()), name
    assert rep["qat"]["kl_mean"] == pytest.approx(rep["ptq"]["kl_mean"], rel=1e-6)

    last = qat_train("tiny-dense", out=tmp_path, export_last=True, **kw)  # nothing to train: exports the last state
    assert last["selection"]["exported"] == "last" and "WARNING" in last["text"]
    assert last["qat"]["kl_mean"] > 2 * last["ptq"]["kl_mean"]


def test_a_run_that_improves_exports_its_best_state(tmp_path, data):
    rep = qat_train("tiny-dense", bits=4, data=data, steps=6, out=tmp_path, eval_every=3, progress=False,
                    export=False, **SMALL)
    sel = rep["selection"]
    assert [e["step"] for e in sel["evals"]] == [0, 3, 6]
    assert sel["best_kl"] == min(e["kl"] for e in sel["evals"])
    assert sel["qat_beat_ptq"] == (sel["best_step"] != 0) and sel["exported"] in ("best", "gptq")
    assert rep["exposure"]["tokens_seen"] == 6 * 2 * 64 and "held-out selection" in rep["text"]


def test_cli_names_a_missing_heldout_file(tmp_path, data):
    from typer.testing import CliRunner

    from gemmaquant.cli import app

    res = CliRunner().invoke(app, ["qat", "tiny-dense", "--data", str(data), "--heldout", str(tmp_path / "gone.txt"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "held-out text" in res.output and "gone.txt" in res.output, res.output
    assert "Traceback" not in res.output
