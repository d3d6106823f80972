"""Stage 1 of scripts/train_fixtures.py: the bundled text corpus (train.txt, heldout.txt, calibration.jsonl)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from fixture_common import DOC_SEP, KINDS, h, log


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


def pack(parts: list[str], sep: str, limit: int) -> list[str]:
    """Join consecutive parts with sep, starting a new piece before one would pass ~limit characters."""
    pieces, cur, size = [], [], 0
    for part in parts:
        if cur and size + len(part) > limit:
            pieces.append(sep.join(cur))
            cur, size = [], 0
        cur.append(part)
        size += len(part) + len(sep)
    if cur:
        pieces.append(sep.join(cur))
    return pieces


def chunk_paragraphs(text: str, limit: int) -> list[str]:
    """Split at blank lines into pieces of at most ~limit characters (a longer paragraph stays whole)."""
    return [p.strip("\n") for p in pack(text.split("\n\n"), "\n\n", limit) if len(p.strip()) > 200]


def chunk_code(src: str, limit: int) -> list[str]:
    """Split Python source at top-level statements (def/class/decorator/assignment lines) into <= limit chars."""
    lines = src.split("\n")
    starts = [0] + [i for i, l in enumerate(lines) if i and l[:1] not in ("", " ", "\t", "#", ")", "]", "}")
                    and lines[i - 1].strip() == ""]
    blocks = ["\n".join(lines[a:b]).strip("\n") for a, b in zip(starts, starts[1:] + [len(lines)])]
    return [p for p in pack(blocks, "\n\n\n", limit) if 200 < len(p) < 3 * limit]


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
    return [p for p in pack(text.split("\n"), "\n", limit) if len(p) > 150]


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
        docs.append({"kind": "chat", "group": "faq/" + h(group[0][1])[:12],
                     "text": render_chat(msgs, rng.random() < 0.5)})
    gl = glossary_pairs()
    rng.shuffle(gl)
    for k in range(0, len(gl), 3):
        msgs = []
        for term, body in gl[k:k + 3]:
            q = rng.choice(("What is {} in Python?", "Can you explain what \"{}\" means?", "Define {}.",
                            "What does the term {} refer to?")).format(term)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": body}]
        docs.append({"kind": "chat", "group": "glossary/" + h(gl[k][0])[:12],
                     "text": render_chat(msgs, rng.random() < 0.5)})
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
            docs.append({"kind": "chat", "group": f"translate/{lang}/{k}",
                         "text": render_chat(msgs, rng.random() < 0.5)})
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
