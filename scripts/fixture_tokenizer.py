"""Stage 2 of scripts/train_fixtures.py: the fixture BPE tokenizer in the Gemma 4 layout."""

from __future__ import annotations

import json
from pathlib import Path

from fixture_common import log
from fixture_corpus import read_documents


# =====================================================================================================
# 2. Tokenizer
# =====================================================================================================

VOCAB_SIZE = 4096
# ids 0..106: the real Gemma 4 layout (tokenizer.json of google/gemma-4-*; llama.cpp models/ggml-vocab-gemma-4.gguf)
SPECIAL_IDS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 5: "[multimodal]",
               46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
               51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
               105: "<|turn>", 106: "<turn|>"}
HTML_TAGS = ["table", "caption", "thead", "tbody", "tfoot", "tr", "th", "td"]
HTML = ([f"<{t}>" for t in HTML_TAGS] + [f"</{t}>" for t in HTML_TAGS]
        + [f"<h{i}>" for i in range(1, 7)] + ["<blockquote>"] + [f"</h{i}>" for i in range(1, 7)] + ["</blockquote>"]
        + [f"<{t}>" for t in ("strong", "em", "b", "i", "u", "s", "sub", "sup", "code")]
        + [f"</{t}>" for t in ("strong", "em", "b", "i", "u", "s", "sub", "sup", "code")]
        + [f"<{t}>" for t in ("a", "html", "body", "img", "span", "bbox", "ul", "li", "div", "iframe", "footer")]
        + [f"</{t}>" for t in ("a", "html", "body", "img", "span", "bbox", "ul", "li", "div", "iframe", "footer")])
MULTIMODAL = ["<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>"]
CONTROL = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|tool>", "<tool|>", "<|think|>", "<|turn>", "<turn|>"]
           + MULTIMODAL)
VISIBLE = ["<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|channel>", "<channel|>"]
RUN = 31  # longest pre-made whitespace run, as in Gemma 4
# Training-time split only (the shipped tokenizer, like Gemma 4's, runs BPE over the whole normalized text).
# Learned tokens never cross these boundaries, so no merge can join across them at inference either:
# whitespace runs, single digits, letters+marks with an optional leading "▁", other symbols with an optional "▁".
TRAIN_SPLIT = r"▁{2,}|\n+|\t+|[0-9]|▁?[\p{L}\p{M}]+|▁?[^\p{L}\p{M}0-9\s▁]+|▁|\s"


def base_layout() -> dict[str, int]:
    vocab: dict[str, int] = {}
    unused = 0
    for i in range(107):
        if i in SPECIAL_IDS:
            vocab[SPECIAL_IDS[i]] = i
        else:
            vocab[f"<unused{unused}>"] = i
            unused += 1
    for k in range(1, RUN + 1):
        vocab["\n" * k] = 106 + k  # 107..137
    for k in range(2, RUN + 1):
        vocab["▁" * k] = 136 + k  # 138..167
    for k, tag in enumerate(HTML):
        vocab[tag] = 168 + k  # 168..237
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 238 + b  # 238..493
    assert len(vocab) == 494 == max(vocab.values()) + 1
    return vocab


def whitespace_merges() -> list[tuple[str, str]]:
    """Merges that build the pre-made runs of newlines, spaces (▁) and tabs, in Gemma 4's order: longest left
    part first, then longest right part, cycling newline / space / tab; they rank before every learned merge."""
    out = []
    for left in range(RUN - 1, 0, -1):
        for right in range(RUN - left, 0, -1):
            for c in ("\n", "▁", "\t"):
                out.append((c * left, c * right))
    return out


def train_tokenizer(args) -> None:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    docs = read_documents(Path(args.data_dir) / "train.txt")
    base = base_layout()
    n_tail = RUN + len(MULTIMODAL)  # tab runs and the multimodal markers sit at the end, as in Gemma 4
    n_learn = VOCAB_SIZE - len(base) - n_tail
    specials = list(SPECIAL_IDS.values()) + MULTIMODAL
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(TRAIN_SPLIT), behavior="isolated")
    # The alphabet is chosen here, not by the trainer's limit_alphabet (which breaks count ties in hash order and
    # so differs from run to run): the most frequent characters, ties broken by code point.
    counts: dict[str, int] = {}
    for d in docs:
        for t in specials:
            d = d.replace(t, "")
        for c in d.replace(" ", "▁"):
            counts[c] = counts.get(c, 0) + 1
    chars = sorted((c for c in counts if c not in ("\n", "\t")), key=lambda c: (-counts[c], c))
    chars = chars[:args.limit_alphabet]
    trainer = trainers.BpeTrainer(vocab_size=n_learn + len(specials) + 400, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=chars, limit_alphabet=len(chars), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    model = json.loads(tok.to_str())["model"]
    trained = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    def premade(t: str) -> bool:
        return t in base or (set(t) <= {"\n", "▁", "\t"} and t != "▁") or t in specials

    alphabet = [t for t, _ in trained if len(t) == 1 and not premade(t)]
    learned_merges = [m for m in merges if not premade(m[0] + m[1])]
    keep = n_learn - len(alphabet)
    assert keep > 0 and len(learned_merges) >= keep, (len(alphabet), len(learned_merges), n_learn)
    learned_merges = learned_merges[:keep]
    vocab = dict(base)
    for t in alphabet + [a + b for a, b in learned_merges]:
        assert t not in vocab, t
        vocab[t] = len(vocab)
    for k in range(1, RUN + 1):
        vocab["\t" * k] = len(vocab)
    for t in MULTIMODAL:
        vocab[t] = len(vocab)
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert not any("\n" in t and set(t) != {"\n"} for t in vocab), "a token mixes newlines with other text"
    all_merges = whitespace_merges() + learned_merges
    for a, b in all_merges:
        assert a in vocab and b in vocab and a + b in vocab, (a, b)
    save_tokenizer(vocab, all_merges, Path(args.tokenizer_dir))
    log(f"tokenizer: {len(vocab)} tokens ({len(alphabet)} single characters learned, {len(learned_merges)} "
        f"learned merges + {len(all_merges) - len(learned_merges)} whitespace-run merges) -> {args.tokenizer_dir}")


CHAT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
    {%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
    {{- '<|turn>' + role + '\\n' -}}
    {%- if m['content'] is string -%}
        {%- set text = m['content'] -%}
    {%- else -%}
        {%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
    {%- endif -%}
    {%- if role == 'model' and '<channel|>' in text -%}{%- set text = text.split('<channel|>')[-1] -%}{%- endif -%}
    {{- text | trim -}}
    {{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
    {%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""


def save_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], out: Path) -> None:
    """tokenizer.json with Gemma 4's pipeline (transformers' GemmaTokenizer: normalizer Replace(' ' -> '▁'),
    pre-tokenizer Split(' ', merged_with_previous) -- a no-op after the normalizer --, BPE with byte_fallback and
    fuse_unk, decoder Replace('▁' -> ' ') + ByteFallback + Fuse), special tokens as added tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in sorted(CONTROL + VISIBLE, key=vocab.get)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos>:1 $B:1",
                                                       special_tokens=[("<bos>", 2)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                             "special": True} for t in sorted(CONTROL + VISIBLE, key=vocab.get)}
    cfg = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        "padding_side": "left", "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "model_max_length": 1000000000000000019884624838656,
        # named multimodal markers (read by transformers' Gemma4Processor) and every other control / chat token
        # as an extra special token, so that all 24 are in `all_special_tokens`: llama.cpp's converter
        # (LlamaHfVocab) types exactly those CONTROL, then forces the 7 chat-parser tokens to USER_DEFINED.
        "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
        "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
        "extra_special_tokens": [t for t in sorted(CONTROL + VISIBLE, key=vocab.get)
                                 if t not in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
                                 and t not in MULTIMODAL[:6]],
        "added_tokens_decoder": added,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    gen = {"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
