"""Calibration data: the default set shipped with the package (prose, code, non-Latin scripts, chat turns; see
data/SOURCES.md for sources and licenses) or a user's file, tokenized with the model's own tokenizer into
fixed-length sequences. The sha256 of the token ids goes into every output's metadata."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import torch

from gemmaquant.errors import GemmaquantError


class CalibrationError(GemmaquantError, ValueError):
    pass


def default_calibration_file() -> Path:
    return Path(str(resources.files("gemmaquant.calibration") / "data" / "calibration.jsonl"))


def read_texts(source: str | Path | None = None) -> list[str]:
    """Documents from `source`: None/"default" (the bundled set), a .jsonl with a "text" field per line, or a
    plain text file whose documents are separated by blank lines (or by lines holding only `<eos>`)."""
    path = default_calibration_file() if source in (None, "default") else Path(source)
    if not path.is_file():
        raise CalibrationError(f"{path}: {'a directory, not a text file' if path.is_dir() else 'file not found'}")
    from gemmaquant.validate import read_utf8

    raw = read_utf8(path, CalibrationError, "calibration text")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CalibrationError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise CalibrationError(f"{path}:{n}: the 'text' field is {type(text).__name__}, not a string")
                texts.append(text)
    else:
        sep = "\n<eos>\n" if "\n<eos>\n" in raw else "\n\n"  # the bundled .txt files mark documents with <eos>
        texts = [t.strip() for t in raw.split(sep) if t.strip()]
    if not texts:
        raise CalibrationError(f"{path}: calibration file is empty")
    return texts


def load_tokenizer(tokenizer_dir: str | Path):
    from tokenizers import Tokenizer

    f = Path(tokenizer_dir) / "tokenizer.json"
    if not f.is_file():
        raise CalibrationError(f"{f}: no tokenizer.json beside the checkpoint; calibration needs the model's tokenizer")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the tokenizers library raises its own untyped Exception for any unreadable file
        raise CalibrationError(f"{f}: not a readable tokenizer.json ({str(e)[:200]})") from None


def calibration_tokens(tokenizer_dir: str | Path, source: str | Path | None, n_samples: int, seq_len: int,
                       bos_token_id: int = 2) -> tuple[torch.Tensor, str]:
    """[n_samples, seq_len] token ids and their sha256. Each document is prefixed with BOS, all are concatenated,
    and n_samples windows are taken at evenly spaced offsets, so every part of the set (prose, code, scripts,
    chat) is represented."""
    tok = load_tokenizer(tokenizer_dir)
    stream: list[int] = []
    for text in read_texts(source):
        stream.append(bos_token_id)
        stream.extend(tok.encode(text, add_special_tokens=False).ids)
    need = n_samples * seq_len
    if len(stream) < need:
        where = "the default calibration set" if source in (None, "default") else str(source)
        raise CalibrationError(f"{where}: {len(stream)} tokens, too short for {n_samples} samples of {seq_len} "
                               f"tokens ({need} needed); give more text or lower n_samples / seq_len")
    stride = len(stream) // n_samples
    ids = torch.tensor([stream[k * stride:k * stride + seq_len] for k in range(n_samples)], dtype=torch.int64)
    digest = hashlib.sha256(ids.to(torch.int32).numpy().tobytes()).hexdigest()
    return ids, digest
