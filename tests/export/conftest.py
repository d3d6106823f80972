"""Shared helpers for the exporter tests: tiny random Gemma 4 checkpoints with a Gemma-4-shaped tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pytest
import torch

from gemmaquant.checkpoint import save_checkpoint
from gemmaquant.config import TINY_VARIANTS
from gemmaquant.model.testing import random_model, save_multimodal_checkpoint

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<|channel>"]


def train_gemma_like_tokenizer(out: Path, vocab_size: int = 1000) -> Path:
    """A small BPE tokenizer.json with Gemma 4's structure: spaces normalised to U+2581, no pre-tokenizer, byte
    fallback through <0xXX> tokens in the base vocabulary, special tokens as added tokens (ids 0..3 = pad, eos,
    bos, unk as in Gemma)."""
    import csv
    import dataclasses
    import inspect

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = [m.__doc__ or "" for m in (json, os, csv, dataclasses, inspect, torch.nn.functional)] * 2
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), "isolated")  # training only: no merge across newlines
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + byte_tokens,
                                                        show_progress=False))
    d = json.loads(tok.to_str())
    d["added_tokens"] = [a for a in d["added_tokens"] if a["content"] in SPECIALS]  # byte tokens are base vocab
    d["pre_tokenizer"] = None  # as Gemma's: BPE over the whole normalised text
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(d, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
         "add_bos_token": True, "tokenizer_class": "GemmaTokenizerFast"}))
    return out


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The machine is shared: torch's default thread pool oversubscribes it and makes these tiny ops 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_gemma_like_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory) -> Path:
    """Fewer than 512 tokens, for synthetic configs with a 512-row embedding."""
    return train_gemma_like_tokenizer(tmp_path_factory.mktemp("tok512"), vocab_size=420)


@dataclass
class LlamaCpp:
    root: Path
    bin: Path
    logits_exe: Path

    def logits(self, gguf_path: Path, ids: torch.Tensor, work: Path) -> torch.Tensor:
        """llama.cpp's logits [S, T, V] for token ids [S, T] (each row decoded as its own sequence)."""
        ids_file, out_file = work / "ids.i32", work / "logits.f32"
        S, T = ids.shape
        np.concatenate([[S, T], ids.flatten().numpy()]).astype(np.int32).tofile(ids_file)
        r = subprocess.run([str(self.logits_exe), str(gguf_path), str(ids_file), str(out_file)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"llama.cpp failed on {gguf_path}:\n{r.stderr[-3000:]}"
        return torch.from_numpy(np.fromfile(out_file, dtype=np.float32).reshape(S, T, -1))


@pytest.fixture(scope="session")
def llama_cpp(tmp_path_factory) -> LlamaCpp:
    """The llama.cpp build named by LLAMA_CPP_DIR (a source tree built in `build/`), with our logits harness
    compiled against its static libraries; skips when absent."""
    root = os.environ.get("LLAMA_CPP_DIR")
    if not root:
        pytest.skip("LLAMA_CPP_DIR is not set")
    root = Path(root)
    build = root / "build"
    libs = [build / "src/libllama.a", build / "ggml/src/libggml.a", build / "ggml/src/libggml-cpu.a",
            build / "ggml/src/libggml-base.a"]
    if not (build / "bin/llama-quantize").is_file() or not all(p.is_file() for p in libs):
        pytest.skip(f"{build}: no llama.cpp build (needs bin/llama-quantize and the static libraries)")
    exe = tmp_path_factory.mktemp("llamacpp") / "llamacpp_logits"
    src = Path(__file__).with_name("llamacpp_logits.cpp")
    r = subprocess.run([os.environ.get("CXX", "c++"), "-O1", "-std=c++17", f"-I{root / 'include'}",
                        f"-I{root / 'ggml/include'}", str(src), "-o", str(exe), *map(str, libs), "-fopenmp",
                        "-lpthread", "-ldl"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"compiling the llama.cpp harness failed:\n{r.stderr[-3000:]}")
    return LlamaCpp(root, build / "bin", exe)


def make_checkpoint(variant: str, out: Path, tokenizer_dir: Path, dtype=torch.float32, multimodal=False,
                    seed: int = 0) -> tuple[torch.nn.Module, Path]:
    cfg = TINY_VARIANTS[variant]
    model = random_model(cfg, seed=seed)
    if multimodal:
        path = save_multimodal_checkpoint(model, out, dtype=dtype, tokenizer_dir=tokenizer_dir)
    else:
        path = save_checkpoint(model, out, dtype=dtype, tokenizer_dir=tokenizer_dir)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 1}))
    return model, path
