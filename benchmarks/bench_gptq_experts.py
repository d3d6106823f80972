"""GPTQ of one MoE tensor's experts: the per-expert loop (`gptq` per expert) against the batched sweep
(`gptq_experts`), side by side in one run on one device, on 26B-A4B expert shapes.

Random weights and per-expert Hessians from random activations (tests/algorithms/problems.py's generator:
correlated, lognormal channel magnitudes). Both paths get the same inputs; the run also checks they give the
same bytes (on the CPU they must; on a GPU the row says how many codes differ).

    python benchmarks/bench_gptq_experts.py                                   # 32 experts of down_proj [2816, 704]
    python benchmarks/bench_gptq_experts.py --experts 8 --shape 1408x2816     # gate_up_proj
    python benchmarks/bench_gptq_experts.py --device cuda --experts 128
Writes benchmarks/results/gptq_experts_<device>.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from gemmaquant.algorithms.gptq import gptq
from gemmaquant.algorithms.gptq_batched import gptq_experts
from gemmaquant.device import resolve_device
from gemmaquant.formats import get_format

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.algorithms.problems import activations, weights  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(E: int, N: int, K: int, fmt_name: str, dev: torch.device) -> dict:
    w = torch.stack([weights(N, K, seed=1 + e) for e in range(E)]).to(dev)
    H = []
    for e in range(E):
        x = activations(2 * K, K, seed=e).to(dev)
        H.append(x.T @ x / x.shape[0])
    H = torch.stack(H)
    f = get_format(fmt_name)
    kw = dict(importance_params=True)  # the pipeline's default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sync(dev)
        t = time.perf_counter()
        loop = [gptq(w[e], H[e], f, **kw) for e in range(E)]
        _sync(dev)
        t_loop = time.perf_counter() - t
        t = time.perf_counter()
        batched = gptq_experts(w, H, f, **kw)
        _sync(dev)
        t_batched = time.perf_counter() - t
    differ = sum(int((f.codes(a) != f.codes(b)).sum()) for a, b in zip(loop, batched))
    return {"experts": E, "N": N, "K": K, "format": fmt_name, "loop_s": round(t_loop, 3),
            "batched_s": round(t_batched, 3), "speedup": round(t_loop / t_batched, 2), "codes_differ": differ}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shape", default="2816x704", help="N x K of one expert (default: 26B-A4B down_proj)")
    ap.add_argument("--formats", default="int4_g32_sym,q5_0", help="q5_0: what Q4_K_M stores K = 704 experts on")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = resolve_device(a.device)
    N, K = (int(v) for v in a.shape.lower().split("x"))
    rows = []
    for name in a.formats.split(","):
        rows.append(run(a.experts, N, K, name, dev))
        print(json.dumps(rows[-1]), flush=True)
    prefix = Path(a.out) if a.out else RESULTS / f"gptq_experts_{dev.type}"
    meta = {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "command": "python benchmarks/bench_gptq_experts.py " + " ".join(argv if argv is not None
                                                                            else sys.argv[1:])}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = [f"# GPTQ of MoE experts: per-expert loop vs batched ({meta['device']}, {meta['threads']} threads)", "",
          f"`{meta['command']}`", "",
          "| experts | N x K | format | loop s | batched s | speedup | codes that differ |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['experts']} | {r['N']}x{r['K']} | {r['format']} | {r['loop_s']} | {r['batched_s']} | "
           f"{r['speedup']}x | {r['codes_differ']} |" for r in rows]
    prefix.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
