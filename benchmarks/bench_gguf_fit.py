"""The GGUF block fits alone, side by side with llama.cpp's C: gemmaquant's torch ports (gemmaquant.formats) and
ggml-quants.c's quantize_q*(..., imatrix=NULL) (built with plain gcc -O2, as tests/formats/test_llamacpp.py builds
it) on the same [512, 8192] bf16-valued matrix, in one process, one thread, CPU seconds (the best of --repeat).
Every row also checks that the two produce the same bytes.

    LLAMA_CPP_DIR=/path/to/llama.cpp python benchmarks/bench_gguf_fit.py [--types q4_k,q6_k,q5_0,q8_0]

Results: benchmarks/results/bench_gguf_fit.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def build(llama: Path) -> ctypes.CDLL:
    sys.path.insert(0, str(ROOT))
    os.environ["LLAMA_CPP_DIR"] = str(llama)
    from tests.formats import test_llamacpp as T

    out = Path(tempfile.mkdtemp(prefix="ggmlq-"))
    (out / "harness.c").write_text(T.HARNESS)
    src = llama / "ggml" / "src" / "ggml-quants.c"
    inc = llama / "ggml"
    subprocess.run(["gcc", "-O2", "-DNDEBUG", "-shared", "-fPIC", f"-I{inc / 'include'}", f"-I{inc / 'src'}",
                    str(out / "harness.c"), str(src), "-o", str(out / "libggmlq.so"), "-lm"], check=True)
    so = ctypes.CDLL(str(out / "libggmlq.so"))
    for t in T.TYPES.values():
        q = getattr(so, f"quantize_{T.cname(t)}")
        q.restype, q.argtypes = ctypes.c_size_t, [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    return so


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"))
    ap.add_argument("--types", default="q4_k,q5_k,q6_k,q5_0,q8_0")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if not args.llama_cpp:
        sys.exit("set LLAMA_CPP_DIR or pass --llama-cpp")
    import numpy as np
    import torch

    torch.set_num_threads(1)
    so = build(Path(args.llama_cpp))
    from gemmaquant.formats import get_format
    from tests.formats.test_llamacpp import c_quantize

    w = (torch.randn(512, 8192, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16().float()
    rows = []
    for name in args.types.split(","):
        fmt = get_format(name)

        def cpu_seconds(f):
            best = float("inf")
            for _ in range(args.repeat):
                t = time.process_time()
                r = f()
                best = min(best, time.process_time() - t)
            return best, r

        tc, c = cpu_seconds(lambda: c_quantize(so, name, w.numpy(), None))
        to, ours = cpu_seconds(lambda: fmt.to_gguf_bytes(fmt.quantize(w)))
        rows.append({"type": name, "llamacpp_ns_per_weight": round(tc / w.numel() * 1e9, 1),
                     "gemmaquant_ns_per_weight": round(to / w.numel() * 1e9, 1), "ratio": round(to / tc, 2),
                     "same_bytes": bool(np.array_equal(c, ours))})
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"shape": list(w.shape), "threads": 1, "repeat": args.repeat, "load_average_at_end": os.getloadavg()}
    (RESULTS / "bench_gguf_fit.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    cols = list(rows[0])
    md = ["# GGUF block fits: gemmaquant's torch ports against ggml-quants.c", "",
          "One [512, 8192] matrix of bf16 values, RTN (no imatrix), one thread, CPU seconds (best of "
          f"{args.repeat}), one process. ratio = gemmaquant / llama.cpp.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (RESULTS / "bench_gguf_fit.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
