"""llama.cpp itself loads our GGUFs and computes the logits of our reference model (marked llamacpp; needs
LLAMA_CPP_DIR). The harness (llamacpp_logits.cpp) runs llama.cpp's CPU backend with an F32 KV cache and flash
attention off.

What "equal" means, by type (docs/export.md, "Checking against llama.cpp"):
  * F32: the same arithmetic in another order: max |Δ| <= 1e-4 on sequences longer than the sliding window.
  * every other type: llama.cpp multiplies each weight by activations rounded to that type's `vec_dot_type`
    (F16, BF16, Q8_0, Q8_1 or Q8_K). llamacpp_sim.py reproduces that rounding on our dequantized model. Rounding
    amplifies the last-ulp disagreement of fp32 arithmetic into occasional one-step flips, so two checks:
      - short sequences: at least a quarter of them match llama.cpp to 1e-4 (no flip happened): a wrong weight,
        scale or layout anywhere would shift every sequence;
      - long sequences: each sequence's max |Δ| is at most twice the spread (+ 1e-4) that perturbing our own
        activations by a relative EPS causes, EPS being llama.cpp's own fp32 disagreement with us on the F32 file
        of the same fixture (max |Δ| / max |logit|, measured by the fixture `fp32_eps`).
The max |Δ| per type is also printed against the plain (unrounded) dequantized model for the report.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import gemmaquant
from gemmaquant.export import FloatSource, export_gguf
from gemmaquant.export.gguf_vocab import SAMPLE_TEXT, LlamaGemma4Tokenizer, read_vocab
from gemmaquant.fixtures import FIXTURES, TOKENIZER_DIR
from tests.export.llamacpp_sim import emulate

pytestmark = pytest.mark.llamacpp
FLOAT_TYPES = ["F32", "F16", "BF16"]
QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL",
               "IQ4_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q2_K"]
SEEDS = 6


@pytest.fixture(scope="module")
def token_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    text = (Path(gemmaquant.__file__).parent / "calibration/data/heldout.txt").read_text(encoding="utf-8")
    ids = tok.encode(text[:40000]).ids
    long = torch.tensor([ids[i * 48:(i + 1) * 48] for i in range(4)])  # > sliding window (32)
    short = torch.tensor([ids[400 + 9 * i:400 + 9 * i + 4] for i in range(48)])
    return long, short


@pytest.fixture(scope="module")
def fp32_eps(llama_cpp, token_ids, tmp_path_factory):
    """Per fixture: llama.cpp's relative fp32 disagreement with our reference on the F32 GGUF."""
    eps = {}
    for name, ckpt in FIXTURES.items():
        work = tmp_path_factory.mktemp(name)
        path = export_gguf(FloatSource(ckpt), work / "f32.gguf", type="F32")
        got = llama_cpp.logits(path, token_ids[0], work)
        with torch.no_grad():
            ref = gemmaquant.load(path)(token_ids[0])
        eps[name] = max(((got - ref).abs().max() / got.abs().max()).item(), 2.0**-23)
    return eps


def _measure(llama_cpp, path, ids, work, eps):
    got = llama_cpp.logits(path, ids, work)
    with torch.no_grad():
        plain = gemmaquant.load(path)(ids)
        emu = emulate(gemmaquant.load(path), path)(ids)
        spread = torch.zeros(ids.shape[0])
        for s in range(SEEDS):
            pert = emulate(gemmaquant.load(path), path, perturb=(torch.Generator().manual_seed(s), eps))(ids)
            spread = torch.maximum(spread, (pert - emu).abs().amax((-1, -2)))
    return got, plain, emu, spread


@pytest.mark.parametrize("fixture", list(FIXTURES))
@pytest.mark.parametrize("type_", FLOAT_TYPES + QUANT_TYPES)
def test_llamacpp_logits(fixture, type_, llama_cpp, token_ids, fp32_eps, tmp_path):
    path = export_gguf(FloatSource(FIXTURES[fixture]), tmp_path / f"{type_}.gguf", type=type_)
    check_against_llamacpp(llama_cpp, path, fixture, type_, token_ids, fp32_eps, tmp_path)


def test_qat_gguf_with_trained_subscales(llama_cpp, token_ids, fp32_eps, tmp_path):
    """A QAT model trained on llama.cpp's Q4_K_M mix, its K-quants' 6-bit sub-scales moved off GPTQ's: llama.cpp
    computes from the GGUF what our model computes from it, by the same rules as the exported fixtures."""
    from gemmaquant.fixtures import documents
    from gemmaquant.formats.base import Packed
    from gemmaquant.qat import qat_train
    from gemmaquant.quantized import QuantizedSource

    data = tmp_path / "train.txt"
    data.write_text("\n<eos>\n".join(documents("train")[:40]) + "\n")
    rep = qat_train("tiny-moe", gguf_type="Q4_K_M", data=data, steps=3, out=tmp_path / "qat", progress=False,
                    scale_lr=0.05, batch_size=2, seq_len=64, calib_samples=4, calib_seq_len=64, eval_seqs=2,
                    eval_seq_len=64, export_last=True)  # (3 steps may not beat GPTQ: the trained state)
    gptq, qat = QuantizedSource(rep["work_dir"]), QuantizedSource(rep["files"]["quantized"])
    values = {n: qat.get(n) for n in qat.names()}
    kquants = [n for n, v in values.items() if isinstance(v, Packed) and "sc" in v.data]  # (experts: Q5_0 lists)
    assert kquants and any(not torch.equal(values[n].data["sc"], gptq.get(n).data["sc"]) for n in kquants)
    check_against_llamacpp(llama_cpp, Path(rep["files"]["gguf"]), "tiny-moe", "Q4_K_M", token_ids, fp32_eps,
                           tmp_path)


def check_against_llamacpp(llama_cpp, path, fixture, type_, token_ids, fp32_eps, tmp_path):
    long, short = token_ids
    got, plain, emu, spread = _measure(llama_cpp, path, long, tmp_path, fp32_eps[fixture])
    err = (got - emu).abs().amax((-1, -2))
    report = (f"{fixture} {type_}: max|Δ| vs llama.cpp-rounded model {err.max():.2e}, vs plain dequantized model "
              f"{(got - plain).abs().max():.2e}, perturbation spread {spread.max():.2e} (eps {fp32_eps[fixture]:.1e})")
    print(report)
    if type_ == "F32":
        assert err.max() <= 1e-4, report
        return
    bad = [(i, f"{e:.2g} > 2*{p:.2g}") for i, (e, p) in enumerate(zip(err.tolist(), spread.tolist()))
           if e > 2 * p + 1e-4]
    assert not bad, f"{report}; sequences beyond twice the rounding-flip spread: {bad}"
    if type_ in QUANT_TYPES:
        got_s = llama_cpp.logits(path, short, tmp_path)
        with torch.no_grad():
            emu_s = emulate(gemmaquant.load(path), path)(short)
        err_s = (got_s - emu_s).abs().amax((-1, -2))
        exact = (err_s <= 1e-4).sum().item()
        print(f"{fixture} {type_}: short sequences within 1e-4 of llama.cpp: {exact}/{short.shape[0]}, "
              f"median max|Δ| {err_s.median():.1e}")
        assert exact >= short.shape[0] // 4, f"{report}; only {exact}/{short.shape[0]} short sequences match to 1e-4"


@pytest.mark.parametrize("fixture", ["tiny-edge"])
def test_llama_tokenize_equals_hf_and_our_check(fixture, llama_cpp, tmp_path):
    """llama.cpp tokenizes our GGUF vocabulary exactly as the HF tokenizer does, and as the re-implementation the
    export-time check uses (so that check is a real stand-in for llama.cpp)."""
    from tokenizers import Tokenizer

    path = export_gguf(FloatSource(FIXTURES[fixture]), tmp_path / "m.gguf", type="F16")
    hf = Tokenizer.from_file(str(FIXTURES[fixture] / "tokenizer.json"))
    vocab = read_vocab(FIXTURES[fixture], 4096)
    ours = LlamaGemma4Tokenizer(vocab.tokens, vocab.types, vocab.merges)
    heldout = (Path(gemmaquant.__file__).parent / "calibration/data/heldout.txt").read_text(encoding="utf-8")
    for text in (SAMPLE_TEXT, "<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n", heldout[:3000]):
        (tmp_path / "p.txt").write_text(text, encoding="utf-8")
        r = subprocess.run([str(llama_cpp.bin / "llama-tokenize"), "-m", str(path), "-f", str(tmp_path / "p.txt"),
                            "--ids", "--no-bos", "--log-disable"], capture_output=True, text=True, check=True)
        llama_ids = eval(r.stdout.strip().splitlines()[-1])  # a Python list literal of ints
        want = hf.encode(text, add_special_tokens=False).ids
        assert llama_ids == want, f"llama.cpp vs HF differ on {text[:40]!r}"
        assert ours.encode(text) == want


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_bf16_export_equals_llamacpp_converter(fixture, llama_cpp, tmp_path):
    """Our BF16 GGUF holds what llama.cpp's own convert_hf_to_gguf.py writes for the same checkpoint: the same
    tensors (names, types, shapes, bytes) and the same metadata (up to the cosmetic general.name / size_label)."""
    import sys

    import gguf
    import numpy as np

    theirs = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, str(llama_cpp.root / "convert_hf_to_gguf.py"), str(FIXTURES[fixture]),
                    "--outfile", str(theirs), "--outtype", "bf16"], capture_output=True, text=True, check=True)
    ours = export_gguf(FloatSource(FIXTURES[fixture]), tmp_path / "ours.gguf", type="BF16")
    a, b = gguf.GGUFReader(str(theirs)), gguf.GGUFReader(str(ours))
    ta = {t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.asarray(t.data)) for t in a.tensors}
    tb = {t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.asarray(t.data)) for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for n in ta:
        assert ta[n][:2] == tb[n][:2], n
        assert np.array_equal(ta[n][2], tb[n][2]), n
    cosmetic = {"general.name", "general.size_label", "GGUF.kv_count"}
    fa = {k: f.contents() for k, f in a.fields.items() if k not in cosmetic}
    fb = {k: f.contents() for k, f in b.fields.items() if k not in cosmetic}
    assert {k: fa.get(k) for k in fa if fa.get(k) != fb.get(k)} == {}
    assert set(fb) - set(fa) == set()
