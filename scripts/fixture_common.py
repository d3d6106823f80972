"""Shared paths and helpers of the fixture build (scripts/train_fixtures.py)."""

from __future__ import annotations

import hashlib
import sys
import time
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
