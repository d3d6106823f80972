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

The stages live beside this file: fixture_corpus.py, fixture_tokenizer.py, fixture_models.py, fixture_eval.py
(shared paths and helpers in fixture_common.py); this file is the command line.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fixture_common import DATA_DIR, FIX_DIR, log
from fixture_corpus import build_corpus
from fixture_eval import report, update_report
from fixture_models import fixture_configs, train_fixture
from fixture_tokenizer import train_tokenizer


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
