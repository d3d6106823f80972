"""QAT checkpoints to Q4_0: the lattice read back vs rounding it again, measured by llama.cpp (issue 31).

For each trained fixture made QAT-like (gemmaquant.fixtures.lattice: every quantizable matrix projected onto a
bf16-step int4 group-32 lattice), the base is llama.cpp's own F32 conversion of that checkpoint; every row is a
GGUF of the same checkpoint compared with it by `llama-perplexity --kl-divergence` (F32 KV cache, flash attention
off, 40 windows of 128 tokens of the bundled held-out text):

    llama.cpp BF16             convert_hf_to_gguf --outtype bf16: the same weights, llama.cpp's bf16 compute path
    lattice Q4_0 (emb X)       gemmaquant quantize (QAT detected): the checkpoint's steps and codes, token
                               embedding table as X: default is llama.cpp's rule (Q6_K, or Q8_0 when a row does
                               not fit Q6_K's 256-blocks: so Q8_0 on every fixture), Q8_0, BF16
    llama.cpp Q4_0             convert_hf_to_gguf --outtype bf16, then llama-quantize Q4_0 (the usual conversion)
    gemmaquant RTN / GPTQ Q4_0 gemmaquant quantize --no-from-qat (int4 g32 absmax/7 grid, rounded again)

    LLAMA_CPP_DIR=/work/llama/src python benchmarks/bench_qat_lattice.py [--fixtures tiny-dense,...]
writes benchmarks/results/qat_lattice.json and .md; `--speed-only` measures the recovery's throughput instead
(benchmarks/results/qat_lattice_speed.json and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemmaquant.eval.llamacpp_kl import kl_to_base, llama_cpp_text, save_base_logits  # noqa: E402

# token-embedding types: None is llama.cpp's rule (Q6_K; Q8_0 where a row is not a multiple of Q6_K's 256-blocks,
# which is every fixture: hidden 192 / 160)
EMBEDDINGS = (None, "Q8_0", "BF16")


def convert(src: Path, out: Path, outtype: str, llama: Path) -> Path:
    subprocess.run([sys.executable, str(llama / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out),
                    "--outtype", outtype], check=True, capture_output=True)
    return out


def ours(qat: Path, work: Path, method: str, from_qat: bool, embeddings: tuple[str, ...]) -> dict[str, Path]:
    """gemmaquant's quantize of the QAT checkpoint, exported to Q4_0 with each token-embedding type."""
    from gemmaquant.export import export_gguf
    from gemmaquant.quantize import quantize
    from gemmaquant.quantized import QuantizedSource
    from gemmaquant.recipe import default_recipe

    res = quantize(str(qat), default_recipe(None, 4, method), out=work, progress=False, device="cpu",
                   from_qat=from_qat)
    assert (res.recipe.weight_format == "int4_g32_lattice") == from_qat
    files = {}
    for emb in embeddings:
        files[emb or "default"] = export_gguf(QuantizedSource(res.work_dir), work / f"q4_0-{emb}.gguf", type="Q4_0",
                                              token_embd_type=emb, overwrite=True)
    return files


def bench_fixture(name: str, tmp: Path, llama: Path, bins: Path, text: Path) -> list[dict]:
    from gemmaquant.fixtures.lattice import make_lattice_checkpoint

    qat = tmp / name / "qat"
    make_lattice_checkpoint(name, qat, seed=0)
    base = convert(qat, tmp / name / "f32.gguf", "f32", llama)
    logits = tmp / name / "base.kld"
    save_base_logits(bins, base, text, logits)
    bf16 = convert(qat, tmp / name / "bf16.gguf", "bf16", llama)
    llq = tmp / name / "llama-q4_0.gguf"
    subprocess.run([str(bins / "llama-quantize"), str(bf16), str(llq), "Q4_0", "2"], check=True, capture_output=True)
    rows = [("llama.cpp BF16 (same weights)", bf16)]
    t0 = time.time()
    lat = ours(qat, tmp / name / "lattice", "rtn", True, EMBEDDINGS)
    rows += [(f"lattice Q4_0 (emb {e})", p) for e, p in lat.items()]  # default: Q8_0 on these widths
    rows.append(("llama.cpp Q4_0 (llama-quantize)", llq))
    for method in ("rtn", "gptq"):
        p = ours(qat, tmp / name / method, method, False, (None,))["default"]
        rows.append((f"gemmaquant {method.upper()} Q4_0 (emb default, --no-from-qat)", p))
    print(f"{name}: quantized in {time.time() - t0:.0f} s", flush=True)
    out = []
    for label, path in rows:
        m = kl_to_base(bins, path, text, logits)
        out.append({"fixture": name, "row": label, **m})
        print(f"  {label:48s} KL {m['kl_mean']:.6f}  p99 {m['kl_p99']:.6f}  same top {100 * m['same_top']:.2f}%",
              flush=True)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["# QAT checkpoint to Q4_0: the lattice read back vs rounded again (llama.cpp KL to the QAT model)", "",
             "Produced by `LLAMA_CPP_DIR=/work/llama/src python benchmarks/bench_qat_lattice.py` "
             "(see its docstring for every row). Base: llama.cpp's F32 conversion of the QAT-like fixture; "
             "`llama-perplexity --kl-divergence`, F32 KV cache, flash attention off, 40 x 128 tokens.", "",
             "| fixture | GGUF | mean KL | p99 KL | max KL | same top |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fixture']} | {r['row']} | {r['kl_mean']:.6f} | {r['kl_p99']:.6f} | {r['kl_max']:.5f} | "
                     f"{100 * r['same_top']:.2f}% |")
    return "\n".join(lines) + "\n"


def recovery_speed(out: str, rows: int = 4096, cols: int = 4096) -> None:
    """Lattice recovery throughput (what `quantize --dry-run` and a QAT run spend per weight), this machine's
    torch threads: a [rows, cols] bf16 matrix on the lattice (half the groups with a negative extremum at -8,
    the rest at +-7) and the same matrix off it (float weights, rejected by the distinct-value bound)."""
    import torch

    from gemmaquant.algorithms.lattice import recover_lattice
    from gemmaquant.fixtures.lattice import project_to_lattice

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    on, _, _ = project_to_lattice(w, gen)
    res = {"shape": [rows, cols], "threads": torch.get_num_threads()}
    for label, m in (("on_lattice", on), ("float", w.to(torch.bfloat16))):
        recover_lattice(m[:64])  # warm-up
        t = time.perf_counter()
        share = recover_lattice(m).share
        dt = time.perf_counter() - t
        res[label] = {"seconds": round(dt, 3), "ns_per_weight": round(1e9 * dt / m.numel(), 2), "share": share}
    Path(out + "_speed.json").write_text(json.dumps(res, indent=2))
    Path(out + "_speed.md").write_text(
        "# Lattice recovery speed\n\n`python benchmarks/bench_qat_lattice.py --speed-only` "
        f"({res['threads']} torch threads, one [{rows}, {cols}] bf16 matrix):\n\n"
        "| weights | seconds | ns per weight | share recovered |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {res[k]['seconds']} | {res[k]['ns_per_weight']} | {res[k]['share']:.3f} |\n"
                  for k in ("on_lattice", "float")))
    print(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tiny-dense,tiny-moe,tiny-edge")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat_lattice"))
    ap.add_argument("--speed-only", action="store_true", help="only the recovery throughput (qat_lattice_speed.*)")
    a = ap.parse_args()
    if a.speed_only:
        return recovery_speed(a.out)
    llama = Path(os.environ.get("LLAMA_CPP_DIR", "/work/llama/src"))
    bins = llama / "build" / "bin"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        text = llama_cpp_text(tmp / "heldout.txt")
        for name in a.fixtures.split(","):
            rows += bench_fixture(name, tmp, llama, bins, text)
            Path(a.out + ".json").write_text(json.dumps({"rows": rows}, indent=2))  # after each fixture
            Path(a.out + ".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
