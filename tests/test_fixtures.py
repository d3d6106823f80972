"""The bundled tiny Gemma 4 fixtures: they load strictly into the reference model, they are trained (held-out
perplexity far below what an untrained model gets), their tokenizer is lossless and covers non-Latin scripts
without <unk>, and tiny-moe routes tokens to every expert."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from gemmaquant.config import FULL, SLIDING, Gemma4Config
from gemmaquant.fixtures import DOC_SEPARATOR, FIXTURES, NAMES, TOKENIZER_DIR, documents, fixture_path
from gemmaquant.model.gemma4 import Gemma4

# Held-out perplexity bound on N_WINDOWS windows of 128 tokens spread over heldout.txt. The trained fixtures
# measure 50 (dense), 41 (moe) and 37 (edge) there; an untrained model sits near the vocabulary size (~4000) and
# the add-one unigram model of train.txt above 1000, so the bound separates "trained" from "not trained" widely.
PPL_BOUND = 100.0
N_WINDOWS, SEQ = 12, 128
BOS, EOS, UNK = 2, 1, 3


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return documents("heldout")


@pytest.fixture(scope="module")
def windows(tokenizer, heldout) -> torch.Tensor:
    """N_WINDOWS windows of SEQ+1 tokens spread over all of heldout.txt (prose, code, scripts, chat)."""
    stream: list[int] = []
    for enc in tokenizer.encode_batch(heldout, add_special_tokens=False):
        stream += [BOS] + enc.ids + [EOS]
    stride = (len(stream) - SEQ - 1) // (N_WINDOWS - 1)
    return torch.tensor([stream[k * stride:k * stride + SEQ + 1] for k in range(N_WINDOWS)])


def load(name: str) -> Gemma4:
    path = fixture_path(name)
    cfg = Gemma4Config.from_hf_dict(json.loads((path / "config.json").read_text()))
    model = Gemma4(cfg)
    sd = load_file(str(path / "model.safetensors"))
    assert all(k.startswith("model.") for k in sd), "CausalLM naming: every tensor is model.<name>"
    model.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()}, strict=True)
    return model.float().eval()


def perplexity(model: Gemma4, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows[:, :-1]).float()
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())


def test_fixture_names_and_errors():
    assert set(FIXTURES) == set(NAMES) == {"tiny-dense", "tiny-moe", "tiny-edge"}
    for name in NAMES:
        assert fixture_path(name).is_dir()
    with pytest.raises(KeyError, match="tiny-dense, tiny-moe, tiny-edge"):
        fixture_path("tiny-huge")


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_layout(name):
    path = fixture_path(name)
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["Gemma4ForCausalLM"] and raw["model_type"] == "gemma4_text"
    assert raw["torch_dtype"] == "bfloat16" and raw["tie_word_embeddings"] is True
    assert raw["final_logit_softcapping"] == 30.0 and raw["vocab_size"] == 4096
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in names)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (path / f).read_bytes() == (TOKENIZER_DIR / f).read_bytes(), f"{name}/{f} differs from the shared one"
    # what llama.cpp's gemma4 loader needs
    cfg = Gemma4Config.from_hf_dict(raw)
    t = cfg.layer_types
    assert SLIDING in t and t[-1] == FULL and cfg.global_head_dim != cfg.head_dim
    if cfg.num_kv_shared_layers:
        first = cfg.first_kv_shared_layer
        assert t[first - 2:first] == (SLIDING, FULL)


def test_fixture_features():
    dense, moe, edge = (Gemma4Config.from_hf_dict(json.loads((fixture_path(n) / "config.json").read_text()))
                        for n in NAMES)
    assert dense.attention_k_eq_v and not dense.enable_moe_block and not dense.has_ple
    assert moe.enable_moe_block and moe.attention_k_eq_v and moe.num_experts == 8
    assert edge.has_ple and edge.num_kv_shared_layers == 2 and edge.use_double_wide_mlp
    for cfg in (dense, moe, edge):
        assert cfg.sliding_window < SEQ  # evaluation windows cross the sliding window


@pytest.mark.parametrize("name", NAMES)
def test_heldout_perplexity(name, windows):
    model = load(name)
    ppl = perplexity(model, windows)
    assert ppl < PPL_BOUND, f"{name}: held-out perplexity {ppl:.1f} >= {PPL_BOUND}"
    untrained = Gemma4(model.config).eval()  # default init: the bound is out of its reach
    with torch.no_grad():
        for p in untrained.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    assert perplexity(untrained, windows[:4]) > 10 * PPL_BOUND


def rtn_(model: Gemma4, bits: int, group: int | None) -> Gemma4:
    """Symmetric round-to-nearest of every matrix in place: per output row, or per row in groups of `group`."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                w = p.reshape(-1, group or p.shape[-1])
                scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
                p.copy_(((w / scale).round().clamp(-qmax - 1, qmax) * scale).reshape(p.shape))
    return model


@pytest.mark.parametrize("name", NAMES)
def test_quantization_damage_is_measurable(name, windows):
    """int4 group-32 RTN hurts clearly more than int8 per-channel RTN (KL to the float model on held-out text)."""
    x = windows[:6, :-1]

    def kl(model):
        with torch.no_grad():
            lp, lq = F.log_softmax(ref, -1), F.log_softmax(model(x).float(), -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean().item()

    with torch.no_grad():
        ref = load(name)(x).float()
    kl8, kl4 = kl(rtn_(load(name), 8, None)), kl(rtn_(load(name), 4, 32))
    assert kl4 > 0.01 and kl4 > 5 * kl8, (kl8, kl4)


def test_tokenizer_round_trip(tokenizer, heldout):
    assert tokenizer.get_vocab_size() == 4096
    for doc in heldout:
        ids = tokenizer.encode(doc, add_special_tokens=False).ids
        assert UNK not in ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == doc
    assert DOC_SEPARATOR.strip() == "<eos>" and tokenizer.token_to_id("<eos>") == EOS


def test_tokenizer_non_latin(tokenizer, heldout):
    samples = ["Привет, мир! Съешь же ещё этих мягких французских булок.", "Καλημέρα κόσμε, τι κάνεις;",
               "你好，世界！我想在苹果工作。", "こんにちは世界、カタカナとひらがな。", "안녕하세요 세계",
               "مرحبا بالعالم، كيف حالك؟", "नमस्ते दुनिया, आप कैसे हैं?", "שלום עולם", "สวัสดีชาวโลก",
               "🦙🚀 emoji and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP", "tab\tseparated  double  spaced\n\n\nnewlines"]
    multilingual = [d for d in heldout if sum(ord(c) > 0x2FF for c in d) > len(d) // 2]
    assert len(multilingual) >= 10
    for text in samples + multilingual:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert UNK not in ids, text[:40]
        assert tokenizer.decode(ids) == text
    # scripts the corpus covers are mostly real tokens, not byte fallback (<0x00>..<0xFF> are ids 238..493)
    ids = tokenizer.encode(" ".join(multilingual), add_special_tokens=False).ids
    assert sum(238 <= i <= 493 for i in ids) < 0.25 * len(ids)


def test_tokenizer_gemma4_layout(tokenizer):
    ids = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|tool_response>": 50, '<|"|>': 52,
           "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106, "\n": 107, "\n\n": 108,
           "▁▁": 138, "<0x00>": 238, "<0xFF>": 493}
    for tok, i in ids.items():
        assert tokenizer.token_to_id(tok) == i, tok
    chat = "<|turn>user\nHi there<turn|>\n<|turn>model\n"
    enc = tokenizer.encode(chat).ids
    assert enc[:3] == [BOS, 105, tokenizer.token_to_id("user")] and enc.count(106) == 1
    assert tokenizer.encode("  x").tokens == ["<bos>", "▁▁", "x"]  # SentencePiece-style spaces, as in Gemma 4


def test_tokenizer_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(fixture_path("tiny-dense")))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (BOS, EOS, 0, UNK)
    assert {"<|turn>", "<turn|>", "<|channel>"} <= set(tok.all_special_tokens)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    doc = documents("heldout")[0]
    assert tok.decode(tok.encode(doc, add_special_tokens=False)) == doc


def test_moe_routes_to_every_expert(windows):
    model = load("tiny-moe")
    E = model.config.num_experts
    counts = [torch.zeros(E, dtype=torch.int64) for _ in model.layers]
    def count(i):
        def hook(module, args, out):  # out = (weights, expert ids) [N, k]; returns None: output unchanged
            counts[i].add_(torch.bincount(out[1].reshape(-1), minlength=E))
        return hook

    hooks = [layer.router.register_forward_hook(count(i)) for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(windows[:, :-1])
    for h in hooks:
        h.remove()
    for i, c in enumerate(counts):
        share = c.float() / c.sum()
        assert (c > 0).all(), f"layer {i}: experts with no tokens: {c.tolist()}"
        assert share.min() > 0.25 / E, f"layer {i}: routing collapsed: {c.tolist()}"


# ---- llama.cpp (runs when LLAMA_CPP_DIR points at a built llama.cpp source tree) ----
def _llama_cpp_dir():
    import os
    from pathlib import Path

    d = os.environ.get("LLAMA_CPP_DIR")
    if not d or not (Path(d) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("LLAMA_CPP_DIR is not set to a llama.cpp source tree")
    bins = next((b for b in (Path(d) / "build" / "bin", Path(d) / "bin") if (b / "llama-tokenize").is_file()), None)
    if bins is None:
        pytest.skip(f"{d}: no built llama-tokenize / llama-perplexity")
    return Path(d), bins


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", NAMES)
def test_llamacpp_tokenizer_and_perplexity_match(name, tokenizer, heldout, tmp_path):
    """The fixture converts with llama.cpp's own converter; llama.cpp's gemma4 tokenizer gives the same ids as
    tokenizer.json, and llama-perplexity (f32) matches the reference model's perplexity computed its way."""
    import os
    import re
    import subprocess
    import sys

    src, bins = _llama_cpp_dir()
    gguf = tmp_path / f"{name}-f32.gguf"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(fixture_path(name)), "--outfile",
                    str(gguf), "--outtype", "f32"], check=True, capture_output=True, env=env)
    # text without special-token strings (llama-perplexity tokenizes with parse_special off)
    text = "\n\n".join(d for d in heldout if "<|" not in d and "|>" not in d)[:60000]
    f = tmp_path / "heldout.txt"
    f.write_text(text, encoding="utf-8")
    out = subprocess.run([str(bins / "llama-tokenize"), "-m", str(gguf), "-f", str(f), "--ids", "--log-disable",
                          "--no-escape"], check=True, capture_output=True, text=True).stdout
    ll_ids = json.loads(out.strip().splitlines()[-1])
    ids = tokenizer.encode(text, add_special_tokens=True).ids
    assert ll_ids == ids
    n_ctx, chunks = 128, 24
    out = subprocess.run([str(bins / "llama-perplexity"), "-m", str(gguf), "-f", str(f), "-c", str(n_ctx), "-t", "1",
                          "--chunks", str(chunks), "-b", str(n_ctx)], check=True, capture_output=True, text=True)
    ll_ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr).group(1))
    # llama-perplexity: chunk k = ids[k*n_ctx:(k+1)*n_ctx] with its first token set to BOS; scores the second half
    x = torch.tensor([[BOS] + ids[k * n_ctx + 1:(k + 1) * n_ctx] for k in range(chunks)])
    with torch.no_grad():
        logits = load(name)(x).float()
    first = n_ctx // 2
    nll = F.cross_entropy(logits[:, first:-1].reshape(-1, logits.shape[-1]), x[:, first + 1:].reshape(-1))
    ref_ppl = math.exp(nll.item())
    assert abs(ll_ppl - ref_ppl) / ref_ppl < 0.01, (ll_ppl, ref_ppl)
