"""KL divergence and same-top agreement of GGUF files against a base GGUF, computed by llama.cpp itself:
`llama-perplexity --kl-divergence-base` saves the base model's logits, `--kl-divergence` compares another file's.

Both runs use an F32 KV cache and flash attention off (the most exact path llama.cpp has), windows of `n_ctx`
tokens scored on their second half (llama-perplexity's own protocol), `chunks` windows of `text`.
Used by tests/export/test_qat_lattice_llamacpp.py and benchmarks/bench_qat_lattice.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from gemmaquant.errors import GemmaquantError


# this llama.cpp build's --kl-divergence run now and then ends (exit code 0) before its last window and its
# statistics, about every second run here, with or without threads: such a run is repeated
ATTEMPTS = 10


class LlamaCppError(GemmaquantError, RuntimeError):
    pass


def llama_cpp_text(path: Path, chars: int = 60000) -> Path:
    """The bundled held-out documents (without special-token strings, which llama-perplexity does not parse) in
    one text file."""
    from gemmaquant.fixtures import documents

    text = "\n\n".join(d for d in documents("heldout") if "<|" not in d and "|>" not in d)[:chars]
    path.write_text(text, encoding="utf-8")
    return path


def _run(bins: Path, model: Path, text: Path, n_ctx: int, chunks: int, threads: int, extra: list[str]) -> str:
    """llama-perplexity's output (stdout and its log together, through a file: its log is written by a thread)."""
    cmd = [str(bins / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx),
           "-t", str(threads), "--chunks", str(chunks), "-fa", "off", "-ctk", "f32", "-ctv", "f32", *extra]
    log = model.with_name(model.name + ".perplexity.log")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # -t says how many
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    out = log.read_text(errors="replace")
    if r.returncode != 0:
        raise LlamaCppError(f"llama-perplexity failed on {model}:\n{out[-2000:]}")
    return out


def save_base_logits(bins: Path, base: Path, text: Path, logits: Path, *, n_ctx: int = 128, chunks: int = 40,
                     threads: int = 2) -> None:
    _run(bins, base, text, n_ctx, chunks, threads, ["--kl-divergence-base", str(logits)])


def kl_to_base(bins: Path, model: Path, text: Path, logits: Path, *, n_ctx: int = 128, chunks: int = 40,
               threads: int = 2) -> dict:
    """{"kl_mean", "kl_p99", "kl_max", "same_top", "ppl_ratio"} of `model` against the saved base logits."""
    extra = ["--kl-divergence-base", str(logits), "--kl-divergence"]
    for _ in range(ATTEMPTS):
        out = _run(bins, model, text, n_ctx, chunks, threads, extra)
        if "Same top p:" in out:
            break

    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        if m is None:
            raise LlamaCppError(f"llama-perplexity output on {model} lacks {pattern!r}:\n{out[-2000:]}")
        return float(m.group(1))

    return {"kl_mean": num(r"Mean\s+KLD:\s+(-?[0-9.e+-]+)"), "kl_p99": num(r"99\.0%\s+KLD:\s+(-?[0-9.e+-]+)"),
            "kl_max": num(r"Maximum KLD:\s+(-?[0-9.e+-]+)"), "same_top": num(r"Same top p:\s+([0-9.]+)") / 100,
            "ppl_ratio": num(r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+([0-9.]+)")}
