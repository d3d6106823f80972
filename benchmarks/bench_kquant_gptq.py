"""Why GPTQ onto the K-quant grids gains less than onto Q4_0 (issue 30): held-out KL of GPTQ on one grid per
whole model (no mix), for Q4_0, Q4_K (with its block parameters fit three ways) and the IQ4 grids, RTN beside.

Every variant quantizes every matrix of the fixture onto one format (recipe weight_format), so the grids compare
at their own bits per weight; the embedding stays float (as in bench_quality), so the KL is the matrices' alone.
Writes benchmarks/results/kquant_gptq.{json,md}.

    python benchmarks/bench_kquant_gptq.py [--fixture tiny-dense] [--variants a,b,...]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import gemmaquant
from gemmaquant.eval.metrics import compare_logits, heldout_ids
from gemmaquant.hub import resolve
from gemmaquant.quantize import quantize
from gemmaquant.quantized import QuantizedSource
from gemmaquant.recipe import Recipe
from gemmaquant.workflow import default_heldout

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "gptq Q4_0 mix": {"method": "gptq", "gguf_type": "Q4_0"},
    "gptq Q4_K_M mix": {"method": "gptq", "gguf_type": "Q4_K_M"},
    "rtn Q4_K_M mix": {"method": "rtn", "gguf_type": "Q4_K_M"},
    "gptq Q5_0 mix": {"method": "gptq", "gguf_type": "Q5_0"},
    "rtn Q5_0 mix": {"method": "rtn", "gguf_type": "Q5_0"},
    "gptq Q8_0 mix": {"method": "gptq", "gguf_type": "Q8_0"},
    "rtn q4_0": {"method": "rtn", "weight_format": "q4_0"},
    "gptq q4_0": {"method": "gptq", "weight_format": "q4_0"},
    "rtn q4_k": {"method": "rtn", "weight_format": "q4_k"},
    "gptq q4_k": {"method": "gptq", "weight_format": "q4_k"},
    "gptq q4_k absmax-fit": {"method": "gptq", "weight_format": "q4_k", "importance_params": False},
    "rtn iq4_nl": {"method": "rtn", "weight_format": "iq4_nl"},
    "gptq iq4_nl": {"method": "gptq", "weight_format": "iq4_nl"},
    "rtn iq4_xs": {"method": "rtn", "weight_format": "iq4_xs"},
    "gptq iq4_xs": {"method": "gptq", "weight_format": "iq4_xs"},
}


def dequantized_model(work: Path, like):
    model = gemmaquant.load(like)
    model.load_state_dict({k: v.float() for k, v in QuantizedSource(work).dequantized_state().items()}, strict=True)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default="tiny-dense")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=32)
    ap.add_argument("--out", default="kquant_gptq")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = gemmaquant.load(args.fixture)
    ids = heldout_ids(resolve(args.fixture), default_heldout(), args.eval_seqs, 128)
    rows = []
    for label in args.variants.split(","):
        spec = VARIANTS[label]
        r = Recipe.from_dict({**spec, "n_samples": args.n_samples, "seq_len": args.seq_len})
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            res = quantize(args.fixture, r, out=tmp, progress=False)
            m = compare_logits(ref, dequantized_model(res.work_dir, args.fixture), ids)
            mats = [p for p in res.plan.values() if p.fmt is not None]
            n = [math.prod(p.shape) for p in mats]
            bits = sum(k * p.fmt.bits for k, p in zip(n, mats)) / sum(n)  # the quantized matrices' bits per weight
        rows.append({"fixture": args.fixture, "variant": label, "bits_per_weight": bits,
                     "kl_mean": m["kl_mean"], "kl_p99": m["kl_p99"], "top1": m["top1"],
                     "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "benchmarks" / "results"
    (out / f"{args.out}.json").write_text(json.dumps(rows, indent=2))
    lines = [f"`python benchmarks/bench_kquant_gptq.py --fixture {args.fixture}` ({args.n_samples} x {args.seq_len} "
             f"calibration tokens, {args.eval_seqs} x 128 held-out tokens; every matrix on one grid, embedding float)",
             "", "| variant | bits/weight (matrices) | KL mean | KL p99 | top-1 |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['bits_per_weight']:.3f} | {r['kl_mean']:.6f} | {r['kl_p99']:.5f} | "
              f"{100 * r['top1']:.2f}% |" for r in rows]
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
