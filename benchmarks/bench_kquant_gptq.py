"""Why GPTQ onto the K-quant grids gains less than onto Q4_0 (issue 30): held-out KL of GPTQ on one grid per
whole model (no mix), for Q4_0, Q4_K (with its block parameters fit three ways) and the IQ4 grids, RTN beside.

Every variant quantizes every matrix of the fixture onto one format (recipe weight_format) or a llama.cpp mix
(gguf_type); the embedding stays float (as in bench_quality), so the KL is the matrices' alone.
Writes benchmarks/results/kquant_gptq.{json,md}.

`--matrix` instead measures, on one synthetic [256, 1024] matrix with correlated outlier inputs
(tests/algorithms/problems.py), the held-out output error ||(W - W_hat) X^T|| of RTN and GPTQ on each grid, and
how much of GPTQ's error a refit of the block parameters after the sweep could remove at best: the codes held,
every block's scale (and offset) re-solved in float by H-weighted least squares over the whole row (no rounding to
the stored precision, so an upper bound). Writes benchmarks/results/kquant_refit.{json,md}.

    python benchmarks/bench_kquant_gptq.py [--fixture tiny-dense] [--variants a,b,...]
    python benchmarks/bench_kquant_gptq.py --matrix
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


ASYMMETRIC = ("q4_1", "q5_1", "q2_k", "q4_k", "q5_k")  # grids with a free offset (a min) per block


def refit_bound(w, p, fmt, H):
    """W_hat with the codes of `p` and every block's (scale, offset) re-solved in float64 to minimise
    (w - w_hat) H (w - w_hat)^T row by row: w_hat = sum_g s_g v_g (+ o_g 1_g), v = the codes' values on the grid
    (asymmetric grids: q with a free offset; symmetric ones: the centred value w_hat / scale, no offset)."""
    N, K = p.shape
    s = fmt.grid(fmt.params(p))[0]
    G = s.shape[1]
    se = fmt.expand(s, K).double()
    affine = fmt.name in ASYMMETRIC
    centred = torch.where(se != 0, fmt.dequantize(p).double() / torch.where(se != 0, se, 1), 0)
    v = fmt.values(fmt.codes(p)).double() if affine else centred
    Hd, out = H.double(), torch.empty(N, K, dtype=torch.float64)
    member = torch.nn.functional.one_hot(torch.arange(K) // (K // G), G).double()  # [K, G]
    for r in range(N):
        A = member * v[r][:, None]  # [K, G] the scale columns
        if affine:
            A = torch.cat([A, member], 1)
        M = A.T @ Hd @ A + 1e-9 * torch.eye(A.shape[1], dtype=torch.float64)
        out[r] = A @ torch.linalg.solve(M, A.T @ Hd @ w[r].double())
    return out.float()


def matrix_study(out: Path) -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    from gemmaquant.algorithms import gptq, rtn
    from gemmaquant.formats import get_format
    from tests.algorithms.problems import activations, output_error, problem

    w, _, H = problem(256, 1024, n=4096, seed=0)
    xt = activations(2048, 1024, 0, sample_seed=7)  # held-out inputs of the same distribution
    rows = []
    for name in ("q4_0", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"):
        f = get_format(name)
        p = gptq(w, H, f, importance_params=True)
        rows.append({"format": name, "bits": f.bits, "rtn": output_error(w, f.dequantize(rtn(w, f)), xt),
                     "gptq": output_error(w, f.dequantize(p), xt),
                     "gptq_refit_bound": output_error(w, refit_bound(w, p, f, H), xt)})
        print(json.dumps(rows[-1]), flush=True)
    (out / "kquant_refit.json").write_text(json.dumps(rows, indent=2))
    lines = ["`python benchmarks/bench_kquant_gptq.py --matrix`: one [256, 1024] matrix, correlated inputs with outlier "
             "channels, held-out output error ||(W - W_hat) X^T||; GPTQ with imatrix-style block parameters (the "
             "pipeline's default). Refit bound: the codes kept, every block's scale (and offset) re-solved in float.",
             "", "| grid | bits/weight | RTN | GPTQ | GPTQ / RTN | refit bound | refit / GPTQ |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['bits']:.3f} | {r['rtn']:.2f} | {r['gptq']:.2f} | {r['gptq'] / r['rtn']:.3f} | "
              f"{r['gptq_refit_bound']:.2f} | {r['gptq_refit_bound'] / r['gptq']:.3f} |" for r in rows]
    (out / "kquant_refit.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", action="store_true", help="the matrix-level refit study instead")
    ap.add_argument("--fixture", default="tiny-dense")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=32)
    ap.add_argument("--out", default="kquant_gptq")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.matrix:
        return matrix_study(ROOT / "benchmarks" / "results")
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
