"""The Gemma 4 tokenizer in GGUF: tokenizer.json -> `tokenizer.ggml.*`, and a check that llama.cpp will encode
text to the same ids as the Hugging Face tokenizer.

What llama.cpp's converter writes (`conversion/gemma.py: Gemma4Model.set_vocab`, GEMMA4_SPEC.md §3.3):
`tokenizer.ggml.model = "gemma4"` (a BPE over raw UTF-8 with `<0xXX>` byte fallback; llama.cpp replaces spaces
by U+2581 and splits only on newlines before merging), the tokens in id order, scores (-1000, unused by BPE),
token types, the merges, the special ids, `add_space_prefix = false`, `add_bos_token = true`.

One deliberate difference from the converter (which types tokens through `gguf.LlamaHfVocab`): every HF *added*
token is typed CONTROL (special) or USER_DEFINED (not special), so llama.cpp splits it out of the text exactly as
the HF tokenizer does; the converter types non-special added tokens inside the base vocab NORMAL, which llama.cpp
then tries to reach by merges.

`check_tokenization` encodes sample text with the `tokenizers` library and with a re-implementation of
llama.cpp's gemma4 BPE (`llm_tokenizer_bpe_session::tokenize` with the GEMMA4 pre-tokenizer) over the arrays
about to be written, and raises if any id differs. tests/export/test_gguf_llamacpp.py checks that
re-implementation against `llama-tokenize` itself.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from gemmaquant.errors import GemmaquantError

VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>'}  # forced USER_DEFINED by the converter so they are rendered
SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog.  Two  spaces, tabs\tand\n\nnewlines\n"
               "   leading spaces; digits 0123456789 3.14159; accents: déjà vu, naïve café;\n"
               "CJK 日本語のテキスト, 中文; emoji 🙂🚀; symbols <>{}[]()#@$%^&*_+=|\\/~`'\"\n")
_BYTE_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class VocabError(GemmaquantError, ValueError):
    pass


@dataclass
class GGUFVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right"
    special: gguf.SpecialVocab
    n_padding: int  # placeholder tokens appended so the table matches the embedding rows


def read_vocab(tokenizer_dir: Path, n_embedding_rows: int) -> GGUFVocab:
    """Build the GGUF vocabulary from `tokenizer_dir/tokenizer.json`.

    The token table must have exactly as many entries as the embedding has rows (llama.cpp checks it); a
    tokenizer with fewer tokens is padded with unused placeholder tokens, one with more is an error.
    """
    f = Path(tokenizer_dir) / "tokenizer.json"
    if not f.is_file():
        raise VocabError(f"{f}: missing; a GGUF needs the checkpoint's tokenizer.json for its vocabulary")
    tj = json.loads(f.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback", False):
        raise VocabError(f"{f}: expected a BPE tokenizer with byte_fallback (Gemma 4's), got "
                         f"type={model.get('type')!r} byte_fallback={model.get('byte_fallback')!r}")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    n = max(by_id) + 1
    holes = [i for i in range(n) if i not in by_id]
    if holes:
        raise VocabError(f"{f}: token ids are not contiguous (first missing id {holes[0]})")
    if n > n_embedding_rows:
        raise VocabError(f"{f}: {n} tokens but the embedding has only {n_embedding_rows} rows")
    tokens, types = [], []
    for i in range(n):
        text = by_id[i]
        tokens.append(text)
        if i in added:
            special = added[i].get("special", False) and text not in VISIBLE_TOKENS
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif _BYTE_RE.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
        elif text in VISIBLE_TOKENS:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    pad = n_embedding_rows - n
    for k in range(pad):  # rows the tokenizer never produces: placeholders that cannot collide with real text
        tokens.append(f"<gemmaquant_unused_{k}>")
        types.append(gguf.TokenType.UNUSED)
    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # SpecialVocab warns about post-processor templates it does not need
    try:
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    finally:
        quiet.setLevel(level)
    special.add_special_token = {**special.add_special_token, "bos": True}  # the converter forces add_bos = true
    merges = list(special.merges)
    special.merges, special.load_merges = [], False  # written by add_vocab
    if not merges:
        raise VocabError(f"{f}: no BPE merges")
    return GGUFVocab(tokens, [-1000.0] * len(tokens), [int(t) for t in types], merges, special, pad)


def add_vocab(writer: gguf.GGUFWriter, v: GGUFVocab) -> None:
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(v.tokens)
    writer.add_token_scores(v.scores)
    writer.add_token_types(v.types)
    writer.add_token_merges(v.merges)
    v.special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's gemma4 tokenizer, re-implemented over the GGUF arrays (src/llama-vocab.cpp)


class LlamaGemma4Tokenizer:
    def __init__(self, tokens: list[str], types: list[int], merges: list[str]):
        self.ids = {}
        for i, t in enumerate(tokens):
            self.ids.setdefault(t, i)
        self.ranks = {}
        for r, m in enumerate(merges):
            pos = m.find(" ", 1)  # as llama.cpp: the first space after position 0 separates the pair
            if pos >= 0:
                self.ranks.setdefault((m[:pos], m[pos + 1:]), r)
        specials = [i for i, t in enumerate(types) if t in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
        # tokenizer_st_partition tries special tokens longest first
        self.specials = sorted(((tokens[i], i) for i in specials if tokens[i]), key=lambda x: -len(x[0]))

    def encode(self, text: str) -> list[int]:
        """= llama_tokenize(text, add_special=False, parse_special=True)."""
        out: list[int] = []
        for piece, tok in self._partition(text):
            if tok is not None:
                out.append(tok)
                continue
            for word in re.findall(r"[^\n]+|\n+", piece.replace(" ", "\u2581")):
                out.extend(self._bpe(word))
        return out

    def _partition(self, text: str):
        frags: list[tuple[str, int | None]] = [(text, None)]
        for s, i in self.specials:
            nxt = []
            for piece, tok in frags:
                if tok is not None or s not in piece:
                    nxt.append((piece, tok))
                    continue
                parts = piece.split(s)
                for k, p in enumerate(parts):
                    if p:
                        nxt.append((p, None))
                    if k < len(parts) - 1:
                        nxt.append((s, i))
            frags = nxt
        return frags

    def _bpe(self, word: str) -> list[int]:
        if word.strip("\n") == "" and word in self.ids:  # "fix for gemma 4": runs of newlines as one token
            return [self.ids[word]]
        syms = list(word)  # UTF-8 characters
        nxt = list(range(1, len(syms))) + [-1]
        prv = list(range(-1, len(syms) - 1))
        heap: list[tuple[int, int, int, str]] = []  # (rank, left, right, text): lowest rank, then leftmost

        def push(left: int, right: int):
            if left < 0 or right < 0:
                return
            r = self.ranks.get((syms[left], syms[right]))
            if r is not None:
                heapq.heappush(heap, (r, left, right, syms[left] + syms[right]))

        for k in range(len(syms) - 1):
            push(k, k + 1)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != text:
                continue  # outdated bigram
            syms[left], syms[right] = text, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        out = []
        for s in syms:
            if not s:
                continue
            if s in self.ids:
                out.append(self.ids[s])
                continue
            for b in s.encode("utf-8"):  # byte fallback: <0xXX> tokens (dropped when absent, as llama.cpp)
                t = self.ids.get(f"<0x{b:02X}>")
                if t is not None:
                    out.append(t)
        return out


def check_tokenization(tokenizer_dir: Path, v: GGUFVocab, text: str = SAMPLE_TEXT) -> None:
    """Raise VocabError if llama.cpp (as re-implemented above) would encode `text` differently from the HF
    tokenizer in `tokenizer_dir`."""
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    want = hf.encode(text, add_special_tokens=False).ids
    got = LlamaGemma4Tokenizer(v.tokens, v.types, v.merges).encode(text)
    if got != want:
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise VocabError(
            f"{tokenizer_dir / 'tokenizer.json'}: the GGUF vocabulary would tokenize differently in llama.cpp than "
            f"the Hugging Face tokenizer (first difference at position {k}: llama.cpp {got[k:k + 5]} vs HF "
            f"{want[k:k + 5]}); this tokenizer does not have Gemma 4's structure")
