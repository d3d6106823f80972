#!/usr/bin/env python
"""Build the bundled text corpus, the fixture tokenizer, and the three trained tiny Gemma 4 fixtures.

    python scripts/train_fixtures.py corpus      # gemmaquant/calibration/data/{train,heldout}.txt, calibration.jsonl
    python scripts/train_fixtures.py tokenizer   # gemmaquant/fixtures/tokenizer/ (BPE, vocab 4096, Gemma 4 layout)
    python scripts/train_fixtures.py train       # gemmaquant/fixtures/{tiny-dense,tiny-moe,tiny-edge}/
    python scripts/train_fixtures.py report      # held-out perplexity, int8 vs int4 RTN KL, tokens per expert
    python scripts/train_fixtures.py all --quick # smoke run of every stage into a scratch directory

Everything is seeded and runs on one CPU thread (`torch.set_num_threads(1)`), so a re-run reproduces the
committed files (the corpus exactly; the weights up to floating-point summation order of the torch build).
The corpus stage needs the sources listed in gemmaquant/calibration/data/SOURCES.md: the Debian packages
python3.11-doc, diatheke and sword-text-web, a CPython 3.11 stdlib (the interpreter running this script, or
--python-lib), and the Django wheel (downloaded with `pip download django==5.2.19 --no-deps` unless
--django-wheel is given).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_DIR = ROOT / "gemmaquant" / "calibration" / "data"
FIX_DIR = ROOT / "gemmaquant" / "fixtures"
DOC_SEP = "\n<eos>\n"  # documents in train.txt / heldout.txt are separated by a line holding only "<eos>"
KINDS = ("prose", "code", "multilingual", "chat")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def h(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


# =====================================================================================================
# 1. Corpus
# =====================================================================================================

PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
DJANGO_VERSION = "5.2.19"
WEB_MODULE = "engWEB2015eb"
WEB_BOOKS = ("Genesis", "Ruth", "Esther", "Jonah", "Luke", "Acts")

ROLE = re.compile(r":[A-Za-z][\w:+.-]*:`[~!]?([^`<]*?)\s*(?:<[^`>]*>)?`")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
COMMENT = re.compile(r"^\s*\.\.(\s|$)")
UNDERLINE = re.compile(r"^\s*([=\-~^*#\"'`+.])\1{3,}\s*$")
DROP_BLOCKS = {"index", "toctree", "only", "contents", "testsetup", "testcleanup", "highlight", "sectionauthor",
               "moduleauthor", "module", "currentmodule", "include", "literalinclude", "raw", "image", "figure",
               "tabularcolumns", "audit-event", "availability", "impl-detail", "xxx", "rubric", "program", "cmdoption",
               "opcode", "productionlist", "table", "csv-table", "list-table", "c:macro", "c:var", "c:type"}


def rst_to_text(src: str) -> str:
    """Plain-ish text from reStructuredText: drop index/toctree/option blocks, comments and heading underlines;
    turn roles and links into their text; keep code blocks and prose as written."""
    out: list[str] = []
    lines = src.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = DIRECTIVE.match(line)
        if m:
            indent, name, arg = len(m.group(1)), m.group(2), m.group(3).strip()
            i += 1
            while i < len(lines) and re.match(r"^\s+:[\w -]+:", lines[i]):  # directive options
                i += 1
            if name in DROP_BLOCKS:  # drop the directive's whole indented body
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    i += 1
            elif name in ("function", "method", "class", "attribute", "data", "exception", "decorator",
                          "classmethod", "staticmethod", "c:function", "c:member", "describe", "envvar",
                          "pdbcommand", "coroutinefunction", "coroutinemethod", "abstractmethod"):
                out.append(arg)
            elif name in ("note", "warning", "seealso", "versionadded", "versionchanged", "deprecated",
                          "important", "tip", "caution", "attention", "hint"):
                label = {"versionadded": "New in version", "versionchanged": "Changed in version",
                         "deprecated": "Deprecated since version", "seealso": "See also"}.get(name, name.capitalize())
                out.append(f"{label} {arg}".rstrip() + ":" if arg else f"{label}:")
            continue
        if COMMENT.match(line) and not line.strip().startswith(".. ::"):
            i += 1
            while i < len(lines) and lines[i].strip() and lines[i].startswith(" "):  # comment continuation
                i += 1
            continue
        if UNDERLINE.match(line):
            i += 1
            continue
        if line.strip() == "::":
            i += 1
            continue
        line = re.sub(r"(\S)::\s*$", r"\1:", line)
        line = ROLE.sub(lambda mm: mm.group(1), line)
        line = LINK.sub(lambda mm: mm.group(1), line)
        line = line.replace("``", "`").replace("|version|", "3.11").replace("|release|", "3.11")
        out.append(line.rstrip())
        i += 1
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text


def chunk_paragraphs(text: str, limit: int) -> list[str]:
    """Split at blank lines into pieces of at most ~limit characters (a longer paragraph stays whole)."""
    pieces, cur = [], []
    size = 0
    for para in text.split("\n\n"):
        if cur and size + len(para) > limit:
            pieces.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        pieces.append("\n\n".join(cur))
    return [p.strip("\n") for p in pieces if len(p.strip()) > 200]


def chunk_code(src: str, limit: int) -> list[str]:
    """Split Python source at top-level statements (def/class/decorator/assignment lines) into <= limit chars."""
    lines = src.split("\n")
    starts = [0] + [i for i, l in enumerate(lines) if i and l[:1] not in ("", " ", "\t", "#", ")", "]", "}")
                    and lines[i - 1].strip() == ""]
    blocks = ["\n".join(lines[a:b]).strip("\n") for a, b in zip(starts, starts[1:] + [len(lines)])]
    pieces, cur, size = [], [], 0
    for b in blocks:
        if cur and size + len(b) > limit:
            pieces.append("\n\n\n".join(cur))
            cur, size = [], 0
        cur.append(b)
        size += len(b) + 3
    if cur:
        pieces.append("\n\n\n".join(cur))
    return [p for p in pieces if len(p) > 200 and len(p) < 3 * limit]


def web_docs() -> list[dict]:
    """World English Bible (public domain), one document per chapter, verses joined into paragraphs."""
    docs = []
    for book in WEB_BOOKS:
        raw = subprocess.run(["diatheke", "-b", WEB_MODULE, "-f", "plain", "-k", book], check=True,
                             capture_output=True, text=True).stdout
        chapters: dict[int, list[str]] = {}
        for line in raw.split("\n"):
            m = re.match(rf"^{re.escape(book)} (\d+):(\d+): (.*)$", line)
            if m:
                verse = re.sub(r"\s+", " ", m.group(3)).strip()
                if verse:
                    chapters.setdefault(int(m.group(1)), []).append(verse)
        for ch, verses in chapters.items():
            paras = [" ".join(verses[k:k + 6]) for k in range(0, len(verses), 6)]
            docs.append({"kind": "prose", "group": f"web/{book}/{ch}", "text": f"{book} {ch}\n\n" + "\n\n".join(paras)})
    return docs


def pydoc_prose_docs() -> list[dict]:
    """Python 3.11 documentation (PSF License): tutorial, HOWTOs, language reference, library intro pages."""
    files = sorted(list((PYDOC / "tutorial").glob("*.rst.txt")) + list((PYDOC / "howto").glob("*.rst.txt"))
                   + list((PYDOC / "reference").glob("*.rst.txt"))
                   + [PYDOC / "library" / f"{n}.rst.txt" for n in (
                       "intro", "functions", "stdtypes", "exceptions", "functional", "itertools", "functools",
                       "collections", "dataclasses", "enum", "pathlib", "json", "csv", "re", "string", "textwrap",
                       "datetime", "math", "random", "statistics", "logging", "argparse", "unittest", "typing",
                       "asyncio-task", "threading", "subprocess", "os.path", "shutil", "sqlite3", "urllib.parse")])
    docs = []
    for f in files:
        if not f.is_file() or f.name in ("index.rst.txt", "clinic.rst.txt", "pyporting.rst.txt"):
            continue
        text = rst_to_text(f.read_text(encoding="utf-8"))
        rel = str(f.relative_to(PYDOC))
        for k, piece in enumerate(chunk_paragraphs(text, 3500)):
            docs.append({"kind": "prose", "group": f"pydoc/{rel}", "text": piece, "id": f"{rel}#{k}"})
    return docs


def stdlib_code_docs(libdir: Path) -> list[dict]:
    """CPython 3.11 standard library source (PSF License) and C headers, chunked at top-level statements."""
    skip = {"this.py", "antigravity.py", "__phello__.foo.py", "_pydecimal.py", "pydoc.py", "_aix_support.py"}
    files = [p for p in sorted(libdir.glob("*.py")) if p.name not in skip and 2000 < p.stat().st_size < 90000]
    for pkg in ("json", "email", "http", "urllib", "collections", "concurrent/futures", "importlib", "logging",
                "xml/dom", "sqlite3", "wsgiref", "unittest", "asyncio", "tomllib", "zoneinfo", "html"):
        files += [p for p in sorted((libdir / pkg).glob("*.py")) if 2000 < p.stat().st_size < 90000]
    docs = []
    for f in files:
        src = f.read_text(encoding="utf-8").replace("\r\n", "\n").expandtabs(8)
        rel = str(f.relative_to(libdir))
        for k, piece in enumerate(chunk_code(src, 4000)):
            docs.append({"kind": "code", "group": f"stdlib/{rel}", "text": piece})
    inc = libdir.parent.parent / "include" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    for f in sorted(inc.glob("*.h")):
        src = f.read_text(encoding="utf-8", errors="replace").expandtabs(4)
        if 1500 < len(src) < 40000:
            for k, piece in enumerate(chunk_paragraphs(src, 4000)):
                docs.append({"kind": "code", "group": f"include/{f.name}", "text": piece})
    return docs


def read_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a gettext .po file (first plural form), skipping the header and fuzzy entries."""
    pairs, entry, field, fuzzy = [], {}, None, False

    def unq(s: str) -> str:
        return json.loads(s) if s.startswith('"') else ""

    def flush():
        nonlocal entry, fuzzy
        mid, mstr = entry.get("msgid", ""), entry.get("msgstr", "")
        if mid and mstr and not fuzzy:
            pairs.append((mid, mstr))
        entry, fuzzy = {}, False

    for line in text.split("\n"):
        line = line.strip()
        if not line:
            flush()
            field = None
        elif line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        elif line.startswith("#"):
            continue
        elif line.startswith("msgid_plural") or line.startswith("msgctxt"):
            field = None
        elif line.startswith("msgid "):
            field = "msgid"
            entry[field] = unq(line[6:])
        elif line.startswith("msgstr[0] ") or line.startswith("msgstr "):
            field = "msgstr"
            entry[field] = unq(line.split(" ", 1)[1])
        elif line.startswith("msgstr["):
            field = None
        elif line.startswith('"') and field:
            entry[field] += unq(line)
    flush()
    return pairs


LANGS = {"ru": "Russian", "uk": "Ukrainian", "bg": "Bulgarian", "sr": "Serbian", "el": "Greek",
         "zh_Hans": "Simplified Chinese", "zh_Hant": "Traditional Chinese", "ja": "Japanese", "ko": "Korean",
         "ar": "Arabic", "fa": "Persian", "ur": "Urdu", "he": "Hebrew", "hi": "Hindi", "mr": "Marathi",
         "ne": "Nepali", "bn": "Bengali", "ta": "Tamil", "th": "Thai", "ka": "Georgian", "hy": "Armenian",
         "de": "German", "fr": "French", "es": "Spanish", "vi": "Vietnamese", "tr": "Turkish", "pl": "Polish"}


def django_pairs(wheel: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(language, catalog) -> translated message pairs from the Django wheel's gettext catalogs (BSD-3-Clause)."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            m = re.match(r"django/(?:contrib/(\w+)/|conf/)locale/(\w+)/LC_MESSAGES/(django(?:js)?)\.po$", name)
            if m and m.group(2) in LANGS:
                app = (m.group(1) or "core") + ("-js" if m.group(3) == "djangojs" else "")
                pairs = read_po(z.read(name).decode("utf-8"))
                if pairs:
                    out[(m.group(2), app)] = pairs
    return out


def multilingual_docs(pairs: dict, libdir: Path) -> list[dict]:
    docs = []
    for (lang, app), pp in pairs.items():
        lines = [re.sub(r"\s+", " ", s).strip() for _, s in pp]
        text = "\n".join(l for l in lines if l)
        for k, piece in enumerate(chunk_lines(text, 2500)):
            docs.append({"kind": "multilingual", "group": f"django/{lang}/{app}", "lang": lang, "text": piece})
    seen = set()
    for f in sorted((libdir / "test" / "cjkencodings").glob("*-utf8.txt")):
        text = f.read_text(encoding="utf-8").strip()
        if text not in seen and len(text) > 300:
            seen.add(text)
            docs.append({"kind": "multilingual", "group": f"cjkencodings/{f.name}", "lang": "cjk", "text": text})
    return docs


def chunk_lines(text: str, limit: int) -> list[str]:
    pieces, cur, size = [], [], 0
    for line in text.split("\n"):
        if cur and size + len(line) > limit:
            pieces.append("\n".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line) + 1
    if cur:
        pieces.append("\n".join(cur))
    return [p for p in pieces if len(p) > 150]


# ---- chat (Gemma 4 chat format; see gemmaquant/fixtures/tokenizer/chat_template.jinja) ----
def render_chat(messages: list[dict], thought_channel: bool = False) -> str:
    """Gemma 4's chat template for plain text turns, without the leading <bos> (the tokenizer adds it):
    `<|turn>{role}\\n{content}<turn|>\\n` per message, role "assistant" rendered as "model". With
    thought_channel the last model turn starts with the empty thinking channel that the template's generation
    prompt emits when thinking is off (`<|channel>thought\\n<channel|>`)."""
    out = []
    for k, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else m["role"]
        body = m["content"].strip()
        if thought_channel and role == "model" and k == len(messages) - 1:
            body = "<|channel>thought\n<channel|>" + body
        out.append(f"<|turn>{role}\n{body}<turn|>\n")
    return "".join(out)


SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant that answers questions about Python.",
                  "Answer the user's question accurately and briefly.", "You are a careful translator.")


def faq_pairs() -> list[tuple[str, str, str]]:
    """(faq file, question, answer) from the Python FAQ (PSF License): sections whose title is a question."""
    out = []
    for f in sorted((PYDOC / "faq").glob("*.rst.txt")):
        lines = f.read_text(encoding="utf-8").split("\n")
        heads = [i for i in range(len(lines) - 1) if lines[i].strip() and UNDERLINE.match(lines[i + 1])
                 and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 1]
        for a, b in zip(heads, heads[1:] + [len(lines) + 1]):
            title = lines[a].strip()
            if not title.endswith("?"):
                continue
            body = rst_to_text("\n".join(lines[a + 2:b - 1]))
            body = ROLE.sub(lambda mm: mm.group(1), body).strip()
            if 80 < len(body):
                paras, ans = body.split("\n\n"), ""
                for p in paras:
                    if ans and len(ans) + len(p) > 1800:
                        break
                    ans = f"{ans}\n\n{p}" if ans else p
                out.append((f.name, ROLE.sub(lambda mm: mm.group(1), title).replace("``", "`"), ans))
    return out


def glossary_pairs() -> list[tuple[str, str]]:
    text = (PYDOC / "glossary.rst.txt").read_text(encoding="utf-8")
    entries = re.findall(r"\n   (\S[^\n]*)\n((?:      [^\n]*\n|\n)+)", text)
    out = []
    for term, body in entries:
        body = "\n".join(l[6:] for l in body.split("\n"))
        body = rst_to_text(body).strip()
        term = term.replace("``", "").strip()
        if len(body) > 60 and not term.startswith(".."):
            out.append((term, body))
    return out


def chat_docs(pairs: dict, rng: random.Random) -> list[dict]:
    docs = []
    faqs = faq_pairs()
    rng.shuffle(faqs)
    k = 0
    while k < len(faqs):
        n = rng.choice((1, 1, 2, 3))
        group = faqs[k:k + n]
        k += n
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS[:3])}] if rng.random() < 0.4 else []
        for _, q, a in group:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        docs.append({"kind": "chat", "group": "faq/" + h(group[0][1])[:12], "text": render_chat(msgs, rng.random() < 0.5)})
    gl = glossary_pairs()
    rng.shuffle(gl)
    for k in range(0, len(gl), 3):
        msgs = []
        for term, body in gl[k:k + 3]:
            q = rng.choice(("What is {} in Python?", "Can you explain what \"{}\" means?", "Define {}.",
                            "What does the term {} refer to?")).format(term)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": body}]
        docs.append({"kind": "chat", "group": "glossary/" + h(gl[k][0])[:12], "text": render_chat(msgs, rng.random() < 0.5)})
    for lang in sorted({l for l, _ in pairs}):
        cand = [(a, b) for (l, _), pp in sorted(pairs.items()) if l == lang for a, b in pp
                if len(a) < 160 and "%" not in a and "{" not in a]
        rng.shuffle(cand)
        for k in range(0, min(len(cand), 40), 4):
            msgs = [{"role": "system", "content": SYSTEM_PROMPTS[3]}] if rng.random() < 0.3 else []
            for src, tgt in cand[k:k + 4]:
                q = rng.choice(("Translate into {}: {}", "How do you say \"{1}\" in {0}?",
                                "{0} translation, please: {1}")).format(LANGS[lang], src)
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": tgt}]
            docs.append({"kind": "chat", "group": f"translate/{lang}/{k}", "text": render_chat(msgs, rng.random() < 0.5)})
    return docs


BUDGET = {  # characters: (train, heldout) per kind
    "prose": (750_000, 60_000), "code": (650_000, 50_000), "multilingual": (430_000, 40_000),
    "chat": (330_000, 40_000)}


def split_groups(docs: list[dict], train_budget: int, held_budget: int, key=lambda d: d["group"]):
    """Whole groups (a source file, chapter, catalog, conversation) go to train or heldout, never both, in
    a fixed hash order until each side's character budget is reached."""
    groups: dict[str, list[dict]] = {}
    for d in docs:
        groups.setdefault(key(d), []).append(d)
    order = sorted(groups, key=lambda g: h("split:" + g))
    train, held, nt, nh = [], [], 0, 0
    for g in order:
        size = sum(len(d["text"]) for d in groups[g])
        if nh < held_budget and size <= max(held_budget // 4, 4000):
            held += groups[g]
            nh += size
        elif nt < train_budget:
            train += groups[g]
            nt += size
    return train, held


def build_corpus(args) -> None:
    rng = random.Random(1234)
    libdir = Path(args.python_lib or sysconfig.get_paths()["stdlib"])
    wheel = Path(args.django_wheel) if args.django_wheel else None
    if wheel is None:
        tmp = Path(tempfile.mkdtemp())
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp),
                        f"django=={DJANGO_VERSION}"], check=True)
        wheel = next(tmp.glob("*.whl"))
    for need in (PYDOC, libdir / "test" / "cjkencodings"):
        if not need.exists():
            sys.exit(f"missing corpus source {need} (see SOURCES.md)")
    pairs = django_pairs(wheel)
    by_kind = {
        "prose": web_docs() + pydoc_prose_docs(),
        "code": stdlib_code_docs(libdir),
        "multilingual": multilingual_docs(pairs, libdir),
        "chat": chat_docs(pairs, rng),
    }
    train, held = [], []
    for kind, docs in by_kind.items():
        tb, hb = BUDGET[kind]
        if kind == "multilingual":  # per language, so that every script is in both splits
            langs = sorted({d["lang"] for d in docs})
            for lang in langs:
                t, hh = split_groups([d for d in docs if d["lang"] == lang], tb // len(langs), hb // len(langs))
                train += t
                held += hh
        elif kind == "prose":  # the Bible and the Python docs separately
            for src in ("web/", "pydoc/"):
                t, hh = split_groups([d for d in docs if d["group"].startswith(src)], tb // 2, hb // 2)
                train += t
                held += hh
        else:
            t, hh = split_groups(docs, tb, hb)
            train += t
            held += hh
        log(f"{kind}: {len(docs)} candidate documents")
    for d in train + held:
        assert "\n<eos>\n" not in d["text"] and not d["text"].startswith("\n")
    # interleave kinds deterministically so that any prefix of train.txt has all of them
    train.sort(key=lambda d: h("order:" + d["group"] + d["text"][:64]))
    held.sort(key=lambda d: (KINDS.index(d["kind"]), h("order:" + d["group"] + d["text"][:64])))
    train_set = {d["text"] for d in train}
    assert not train_set & {d["text"] for d in held}
    # calibration: documents of train (disjoint from heldout), 64 per kind, at most ~2 KB each
    calib = []
    for kind in KINDS:
        pool = [d for d in train if d["kind"] == kind]
        for d in random.Random(f"calib-{kind}").sample(pool, min(64, len(pool))):
            text = d["text"]
            if len(text) > 2400 and kind != "chat":
                cut = text.rfind("\n", 0, 2000)
                text = text[:cut if cut > 500 else 2000]
            calib.append({"kind": kind, "text": text})
    out = Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(DOC_SEP.join(d["text"] for d in train) + "\n", encoding="utf-8")
    (out / "heldout.txt").write_text(DOC_SEP.join(d["text"] for d in held) + "\n", encoding="utf-8")
    with open(out / "calibration.jsonl", "w", encoding="utf-8") as f:
        for r in calib:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for name, docs in (("train", train), ("heldout", held)):
        sizes = {k: sum(len(d["text"].encode()) for d in docs if d["kind"] == k) for k in KINDS}
        log(f"{name}: {len(docs)} documents, bytes per kind {sizes}")
    log(f"calibration: {len(calib)} records")


def read_documents(path: Path) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    return [d for d in text.split(DOC_SEP) if d]


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
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|tool>", "<tool|>", "<|think|>", "<|turn>", "<turn|>"] + MULTIMODAL
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
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(CONTROL + VISIBLE, key=vocab.get)])
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
                                 if t not in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>") and t not in MULTIMODAL[:6]],
        "added_tokens_decoder": added,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    gen = {"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# =====================================================================================================
# 3. Models
# =====================================================================================================


def fixture_configs():
    from gemmaquant.config import FULL, SLIDING, Gemma4Config

    S, F = SLIDING, FULL
    common = dict(vocab_size=VOCAB_SIZE, head_dim=32, global_head_dim=64, sliding_window=32,
                  final_logit_softcapping=30.0, tie_word_embeddings=True, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, eos_token_id=1, bos_token_id=2, pad_token_id=0)
    return {
        # 31B-like: dense, k_eq_v full layers with their own (fewer) KV heads, sliding + full with different head dims
        "tiny-dense": Gemma4Config(**common, hidden_size=192, intermediate_size=576, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                                   attention_k_eq_v=True, layer_types=(S, S, F, S, S, F),
                                   hidden_size_per_layer_input=0),
        # 26B-A4B-like: routed experts beside the dense MLP in every layer, k_eq_v
        "tiny-moe": Gemma4Config(**common, hidden_size=160, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                                 attention_k_eq_v=True, layer_types=(S, S, S, F), hidden_size_per_layer_input=0,
                                 enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=128),
        # E2B-like: per-layer embeddings, the last two layers reuse the K/V of layers 2 (sliding) and 3 (full),
        # double-wide MLP on those shared layers
        "tiny-edge": Gemma4Config(**common, hidden_size=160, intermediate_size=320, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=1, layer_types=(S, S, S, F, S, F),
                                  hidden_size_per_layer_input=32, vocab_size_per_layer_input=VOCAB_SIZE,
                                  num_kv_shared_layers=2, use_double_wide_mlp=True),
    }


def check_llamacpp_constraints(cfg) -> None:
    """What llama.cpp's gemma4 loader needs (GEMMA4_SPEC.md §3)."""
    from gemmaquant.config import FULL, SLIDING

    t = cfg.layer_types
    assert SLIDING in t, "at least one sliding layer"
    assert cfg.global_head_dim != cfg.head_dim, "global_head_dim must differ from head_dim"
    assert t[-1] == FULL, "last layer full"
    if cfg.num_kv_shared_layers:
        first = cfg.first_kv_shared_layer
        assert t[first - 2:first] == (SLIDING, FULL), "last two unshared layers must be (sliding, full)"


def token_stream(tok, docs: list[str]) -> list[int]:
    """<bos> document <eos> for every document, concatenated."""
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids += [2] + enc.ids + [1]
    return ids


def init_weights(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p.shape[-1]
                std = 0.02 if "embed" in name else fan_in ** -0.5
                if name.endswith(("o_proj.weight", "down_proj.weight", "per_layer_projection.weight")) or \
                        name.endswith("experts.down_proj"):
                    std = std / math.sqrt(2 * model.config.num_hidden_layers)
                p.copy_(torch.randn(p.shape, generator=g) * std)
            # 1-D: norms, router scale, per-expert scale stay at their init of 1


def moe_aux_loss(model, captured: dict) -> "torch.Tensor":
    """Switch Transformer load-balancing loss per MoE layer: E * sum_e f_e * P_e, with f_e the fraction of
    (token, slot) assignments routed to expert e and P_e the mean router probability of e; 1.0 when uniform.
    The router is re-run on the residual its layer saw (captured by a forward pre-hook)."""
    import torch

    losses = []
    for i, x in captured.items():
        r = model.layers[i].router
        flat = x.reshape(-1, x.shape[-1])
        logits = r.proj(r.norm(flat) * r.scale * flat.shape[-1] ** -0.5)
        probs = torch.softmax(logits.float(), dim=-1)
        E = probs.shape[-1]
        top = probs.topk(r.top_k, dim=-1).indices
        frac = torch.zeros(E).index_add_(0, top.reshape(-1), torch.ones(top.numel())) / top.numel()
        losses.append(E * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train_fixture(name: str, cfg, tok_dir: Path, out_dir: Path, data_dir: Path, quick: bool, budget_s: float,
                  seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    from gemmaquant.model.gemma4 import Gemma4, param_counts

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    check_llamacpp_constraints(cfg)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    train_docs = read_documents(data_dir / "train.txt")
    stream = torch.tensor(token_stream(tok, train_docs), dtype=torch.int64)
    seq, batch = (128, 4) if quick else (128, 16)
    n_windows = (len(stream) - 1) // seq
    log(f"{name}: {len(stream)} training tokens, {n_windows} windows of {seq}, params {param_counts(cfg)}")
    model = Gemma4(cfg)
    init_weights(model, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    lr = 3e-3
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if cfg.enable_moe_block:
        for i, layer in enumerate(model.layers):
            hooks.append(layer.router.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0])))
    # estimate steps from the time budget with a short timing run, then a fixed cosine schedule
    steps = 30 if quick else None
    g = torch.Generator().manual_seed(seed + 1)
    warmup = 5 if quick else 100
    t0, step, total_steps, losses = time.time(), 0, steps or 10**9, []
    while step < total_steps:
        if steps is None and step == 20:
            per = (time.time() - t0) / 20
            total_steps = max(200, int(budget_s / per))
            log(f"{name}: {per:.3f}s/step -> {total_steps} steps ({total_steps * batch * seq / 1e6:.2f}M tokens)")
        frac = step / max(1, total_steps) if steps or step >= 20 else 0.0
        cur = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for grp in opt.param_groups:
            grp["lr"] = cur
        starts = torch.randint(0, n_windows, (batch,), generator=g) * seq
        x = torch.stack([stream[s:s + seq + 1] for s in starts])
        captured.clear()
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        total = loss
        aux = None
        if cfg.enable_moe_block:
            aux = moe_aux_loss(model, captured)
            total = loss + 0.02 * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % (10 if quick else 100) == 0 or step == total_steps:
            msg = f"{name}: step {step}/{total_steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} lr {cur:.2e}"
            if aux is not None:
                msg += f" aux {aux.item():.3f}"
            log(msg + f" ({time.time() - t0:.0f}s)")
    for hk in hooks:
        hk.remove()
    model.eval()
    save_fixture(model, tok_dir, out_dir)
    return {"steps": total_steps, "seconds": round(time.time() - t0), "tokens_seen": total_steps * batch * seq,
            "final_train_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4)}


def save_fixture(model, tok_dir: Path, out_dir: Path) -> None:
    import torch

    try:
        from gemmaquant.checkpoint import save_checkpoint
    except ImportError:
        save_checkpoint = None
    if save_checkpoint is not None:
        save_checkpoint(model, out_dir, dtype=torch.bfloat16, tokenizer_dir=tok_dir, overwrite=True)
        return
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tensors = {"model." + n: t.detach().to(torch.bfloat16).contiguous() for n, t in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**model.config.to_hf_dict(), "architectures": ["Gemma4ForCausalLM"], "torch_dtype": "bfloat16"}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tok_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# =====================================================================================================
# 4. Evaluation (used by `report`; the tests re-check the bounds quickly)
# =====================================================================================================


def load_fixture(path: Path, dtype=None):
    import torch
    from safetensors.torch import load_file

    from gemmaquant.config import Gemma4Config
    from gemmaquant.model.gemma4 import Gemma4

    cfg = Gemma4Config.from_hf_dict(json.loads((path / "config.json").read_text()))
    model = Gemma4(cfg)
    sd = {k.removeprefix("model."): v for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(sd, strict=True)
    return model.to(dtype or torch.float32).eval()


def heldout_windows(tok_dir: Path, data_dir: Path, seq: int = 128, max_windows: int | None = None):
    """Held-out documents as <bos> doc <eos> windows of `seq` tokens; returns (windows [N, seq+1], kinds)."""
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    docs = read_documents(data_dir / "heldout.txt")
    stream = token_stream(tok, docs)
    n = (len(stream) - 1) // seq
    if max_windows:
        n = min(n, max_windows)
    return torch.tensor([stream[k * seq:k * seq + seq + 1] for k in range(n)], dtype=torch.int64)


def perplexity(model, windows, batch: int = 16) -> float:
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(windows), batch):
            x = windows[k:k + batch]
            logits = model(x[:, :-1]).float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def unigram_perplexity(tok_dir: Path, data_dir: Path, windows) -> float:
    """Perplexity of the add-one unigram model fitted on train.txt, on the same held-out targets."""
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    counts = torch.bincount(torch.tensor(token_stream(tok, read_documents(data_dir / "train.txt"))),
                            minlength=VOCAB_SIZE).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[windows[:, 1:].reshape(-1)].mean().item())


def rtn_quantize_(model, bits: int, group: int | None) -> None:
    """Round-to-nearest, symmetric, in place, on every 2-D weight (linear layers, experts, embeddings):
    per output row (group None) or per row in groups of `group` input columns. int8: max-abs/127, int4: /7."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2:
                continue
            w = p.float()
            shape = w.shape
            wg = w.reshape(-1, group) if group else w.reshape(-1, shape[-1])
            scale = wg.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
            q = (wg / scale).round().clamp(-qmax - 1, qmax) * scale
            p.copy_(q.reshape(shape).to(p.dtype))


def kl_to(ref_logits, logits) -> float:
    import torch.nn.functional as F

    lp, lq = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def expert_load(model, windows) -> list[list[int]]:
    """Tokens routed to each expert (top-k slots counted) per MoE layer on the given windows."""
    import torch

    loads = [torch.zeros(model.config.num_experts, dtype=torch.int64) for _ in model.layers]
    def count(i):
        def hook(module, args, out):  # out = (weights, expert ids); returns None so the output is unchanged
            loads[i].add_(torch.bincount(out[1].reshape(-1), minlength=len(loads[i])))
        return hook

    hooks = [layer.router.register_forward_hook(count(i)) for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(windows[:, :-1])
    for hk in hooks:
        hk.remove()
    return [l.tolist() for l in loads]


def evaluate(name: str, path: Path, data_dir: Path, max_windows: int | None = None) -> dict:
    import copy

    import torch

    from gemmaquant.model.gemma4 import param_counts

    torch.set_num_threads(1)
    model = load_fixture(path)
    windows = heldout_windows(path, data_dir, 128, max_windows)
    res = {"params": param_counts(model.config), "heldout_windows": len(windows),
           "heldout_tokens": int(windows[:, 1:].numel()),
           "safetensors_bytes": (path / "model.safetensors").stat().st_size}
    res["ppl_heldout"] = round(perplexity(model, windows), 3)
    res["ppl_unigram"] = round(unigram_perplexity(path, data_dir, windows), 1)
    untrained = type(model)(model.config)
    init_weights(untrained, 0)
    res["ppl_untrained"] = round(perplexity(untrained.eval(), windows[:32]), 1)
    sub = windows[torch.linspace(0, len(windows) - 1, min(len(windows), 64)).long()]  # spread over all kinds
    with torch.no_grad():
        ref = model(sub[:, :-1])
        for label, bits, group in (("int8_per_channel", 8, None), ("int4_g32", 4, 32)):
            q = copy.deepcopy(model)
            rtn_quantize_(q, bits, group)
            res[f"kl_{label}"] = round(kl_to(ref, q(sub[:, :-1])), 5)
            res[f"ppl_{label}"] = round(perplexity(q, windows), 3)
    if model.config.enable_moe_block:
        res["tokens_per_expert"] = expert_load(model, sub)
    return res


def update_report(fixtures_dir: Path, section: str, name: str, values: dict) -> None:
    """fixtures/report.json: {"training": {name: ...}, "eval": {name: ...}}, the numbers README.md quotes."""
    f = Path(fixtures_dir) / "report.json"
    data = json.loads(f.read_text()) if f.is_file() else {}
    data.setdefault(section, {})[name] = values
    f.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def report(args) -> dict:
    out = {}
    for name in args.only or list(fixture_configs()):
        path = Path(args.fixtures_dir) / name
        out[name] = evaluate(name, path, Path(args.data_dir), max_windows=16 if args.quick else None)
        log(f"{name}: {json.dumps(out[name])}")
        update_report(getattr(args, "fixtures_report", Path(args.fixtures_dir)), "eval", name, out[name])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("corpus", "tokenizer", "train", "report", "all"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny step counts, output in a scratch directory")
    p.add_argument("--only", nargs="*", help="fixture names to train / report (default: all three)")
    p.add_argument("--budget-s", type=float, default=660.0, help="training wall-clock budget per fixture")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--fixtures-dir", default=None)
    p.add_argument("--python-lib", default=None, help="CPython 3.11 stdlib directory (default: this interpreter's)")
    p.add_argument("--django-wheel", default=None)
    p.add_argument("--limit-alphabet", type=int, default=700)
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="gq-fixtures-")) if args.quick else None
    # --quick never writes the committed files: what its stage(s) produce goes to a scratch directory, what they
    # read comes from there (all) or from the committed corpus / tokenizer / fixtures (a single stage)
    own = (lambda stage: scratch is not None and args.stage in ("all", stage))
    args.data_dir = args.data_dir or str(scratch / "data" if own("corpus") else DATA_DIR)
    args.tokenizer_dir = args.tokenizer_dir or str((scratch if own("tokenizer") else FIX_DIR) / "tokenizer")
    args.fixtures_dir = args.fixtures_dir or str(scratch if own("train") else FIX_DIR)
    if args.quick and args.stage == "report":
        args.fixtures_report = Path(scratch)
    if scratch:
        log(f"--quick: writing into {scratch}")
    stages = ("corpus", "tokenizer", "train", "report") if args.stage == "all" else (args.stage,)
    if "corpus" in stages:
        build_corpus(args)
    if "tokenizer" in stages:
        train_tokenizer(args)
    if "train" in stages:
        summary = {}
        for name, cfg in fixture_configs().items():
            if args.only and name not in args.only:
                continue
            summary[name] = train_fixture(name, cfg, Path(args.tokenizer_dir), Path(args.fixtures_dir) / name,
                                          Path(args.data_dir), args.quick, args.budget_s)
            log(f"{name}: {summary[name]}")
            update_report(Path(args.fixtures_dir), "training", name, summary[name])
    if "report" in stages:
        report(args)


if __name__ == "__main__":
    main()
