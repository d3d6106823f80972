"""Time a few launch configs of each Triton kernel on Gemma 4 shapes, to set the heuristics in kernels/*.py.

Each case runs the kernel's wrapper with `config=` overrides; the first candidate of each case is today's heuristic.
Times come from bench_kernels.graph_ms (CUDA graph replays, cold L2, no launch overhead), so they compare the
kernels themselves. A config that does not compile or fit (OutOfResources) is reported as such.

    python benchmarks/tune_kernels.py --out tune.json                       # every case
    python benchmarks/tune_kernels.py --warm-only --shard 3/8               # compile a share of the configs only
                                                                            # (run 8 at once to fill Triton's cache)
Results: JSON (every case, every candidate, the best) and a short table on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

DECODE = [dict(), dict(unpack="split"), dict(unpack="split", block_n=32), dict(unpack="split", num_warps=8),
          dict(block_n=32), dict(block_n=128), dict(block_k=64),
          dict(num_stages=2), dict(num_stages=6), dict(num_warps=2), dict(num_warps=8),
          dict(kernel="gemv"), dict(kernel="gemv", block_n=32), dict(kernel="gemv", block_n=128, num_warps=8),
          dict(kernel="gemv", block_k=64), dict(kernel="gemv", num_stages=2)]
PREFILL = [dict(), dict(unpack="split"), dict(unpack="split", block_k=128), dict(block_n=256), dict(block_k=128),
           dict(block_m=64, num_warps=4, num_stages=4), dict(num_warps=4, num_stages=4), dict(block_m=64, block_n=256),
           dict(num_stages=4), dict(block_n=64, block_k=128, num_warps=4, num_stages=4)]
MOE = [dict(), dict(block_n=128), dict(block_k=128), dict(num_warps=8),
       dict(block_n=128, num_warps=8), dict(num_stages=4), dict(block_m=16), dict(block_m=64)]
ATTN_256 = [dict(), dict(block_m=64, block_n=64, num_warps=4), dict(block_m=64, block_n=64, num_warps=8),
            dict(block_m=128, block_n=64, num_warps=8), dict(block_m=128, block_n=32, num_warps=8),
            dict(block_m=64, block_n=64, num_warps=4, num_stages=3), dict(block_m=128, block_n=64, num_warps=8,
            num_stages=3), dict(block_m=64, block_n=32, num_warps=4)]
ATTN_512 = [dict(), dict(block_m=64, block_n=32, num_warps=8), dict(block_m=32, block_n=64, num_warps=8),
            dict(block_m=64, block_n=32, num_warps=4), dict(block_m=32, block_n=32, num_warps=4),
            dict(block_m=64, block_n=64, num_warps=8, num_stages=1), dict(block_m=128, block_n=32, num_warps=8),
            dict(block_m=32, block_n=32, num_warps=8, num_stages=3)]


def cases():
    """(name, candidates, make) with make(config) -> a no-argument callable running the kernel with that config."""
    import torch

    from gemmaquant.config import get_variant
    from gemmaquant.formats import Int4Group, Int8Channel
    from gemmaquant.kernels import int4_matmul as i4, int8_matmul as i8
    from gemmaquant.kernels.moe_grouped_gemm import _config as moe_config, moe_experts
    from gemmaquant.kernels.swa_attention import prefill_config, swa_attention

    a, b = get_variant("26b-a4b"), get_variant("31b")
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    for (N, K) in ((a.intermediate_size, a.hidden_size), (b.intermediate_size, b.hidden_size),
                   (b.hidden_size, b.intermediate_size)):
        w = torch.randn(N, K, device=dev) / K ** 0.5
        p4 = Int4Group(128, False).quantize(w).data
        p8 = Int8Channel().quantize(w).data
        for M, cands in ((1, DECODE), (16, DECODE), (256, PREFILL)):
            if M == 256 and N != b.intermediate_size:
                continue
            x = torch.randn(M, K, device=dev).to(bf16)
            base = i4._config(M, N, K, 128, dev)

            def make4(c, x=x, p=p4, base=base, M=M, K=K):
                cfg = {**base, **c}
                if "block_n" in c and M <= 16:  # as many programs as the heuristic's, for another N tile
                    split = base["split_k"] * base["block_n"] // c["block_n"]
                    cfg["split_k"] = max(1, min(split, 16, K // cfg["block_k"]))
                return lambda: i4.int4_matmul(x, p["qdata"], p["scale"], p["zero"], 128, cfg)

            yield f"int4 g128 asym M={M} {N}x{K}", cands, make4
            if M <= 16:
                base8 = i8._config(M, N, K, dev)
                yield (f"int8 W8A16 M={M} {N}x{K}", [c for c in cands if "unpack" not in c and "kernel" not in c],
                       lambda c, x=x, base8=base8: (lambda: i8.int8_matmul(x, p8["qdata"], p8["scale"], False,
                                                                           {**base8, **c})))
        del w, p4, p8
    H, Ie, E, k = a.hidden_size, a.moe_intermediate_size, a.num_experts, a.top_k_experts
    gu4 = (torch.randint(0, 256, (E, 2 * Ie, H // 2), device=dev, dtype=torch.uint8),
           torch.rand(E, 2 * Ie, H // 64, device=dev).to(bf16) / 100,
           torch.randint(0, 16, (E, 2 * Ie, H // 64), device=dev, dtype=torch.uint8))
    dn4 = (torch.randint(0, 256, (E, H, Ie // 2), device=dev, dtype=torch.uint8),
           torch.rand(E, H, Ie // 64, device=dev).to(bf16) / 100,
           torch.randint(0, 16, (E, H, Ie // 64), device=dev, dtype=torch.uint8))
    gub = torch.randn(E, 2 * Ie, H, device=dev).to(bf16) / H ** 0.5
    dnb = torch.randn(E, H, Ie, device=dev).to(bf16) / Ie ** 0.5
    for T in (1, 16, 256):
        x = torch.randn(T, H, device=dev).to(bf16)
        tw, ids = torch.softmax(torch.randn(T, E, device=dev), -1).topk(k, dim=-1)
        for fmt in ("int4", "bf16"):
            base = moe_config(T * k, E, 64 if fmt == "int4" else 0, (2, 2) if fmt == "int4" else (0, 0))
            cands = [c for c in MOE if fmt != "int4" or c.get("block_k", 64) <= 64]  # int4: block_k | group 64
            if fmt == "int4":
                mk = (lambda c, x=x, ids=ids, tw=tw, base=base: (
                    lambda: moe_experts(x, ids, tw, gu4[0], dn4[0], gu4[1], dn4[1], gu4[2], dn4[2], 64,
                                        config={**base, **c})))
            else:
                mk = (lambda c, x=x, ids=ids, tw=tw, base=base: (
                    lambda: moe_experts(x, ids, tw, gub, dnb, config={**base, **c})))
            yield f"moe {fmt} T={T}", cands, mk
    for D, hkv, window, L, cands in ((a.head_dim, a.num_key_value_heads, a.sliding_window, 32768, ATTN_256),
                                     (a.global_head_dim, a.num_global_key_value_heads, None, 4096, ATTN_512)):
        q = torch.randn(1, a.num_attention_heads, L, D, device=dev).to(bf16) * 0.1
        kk = torch.randn(1, hkv, L, D, device=dev).to(bf16) * 0.1
        v = torch.randn(1, hkv, L, D, device=dev).to(bf16)
        base = prefill_config(D, cuda=True)
        yield (f"attn D={D} window={window} L={L}", cands,
               lambda c, q=q, kk=kk, v=v, window=window, base=base: (
                   lambda: swa_attention(q, kk, v, window, 1.0, config={**base, **c})))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tune.json"))
    ap.add_argument("--only", default="", help="substring of the case names")
    ap.add_argument("--warm-only", action="store_true", help="run each config once (fills Triton's cache), no timing")
    ap.add_argument("--shard", default="0/1", help="i/n: this process takes every n-th config from the i-th")
    args = ap.parse_args(argv)
    import torch

    from bench_kernels import graph_ms

    from gemmaquant.quantized import write_json_atomic

    shard, nshards = (int(v) for v in args.shard.split("/"))
    results, index = [], 0
    for name, cands, make in cases():
        if args.only not in name:
            continue
        rows = []
        for c in cands:
            index += 1
            if args.warm_only and index % nshards != shard:
                continue
            try:
                fn = make(c)
                if args.warm_only:
                    fn()
                    torch.cuda.synchronize()
                    continue
                ms = graph_ms(fn, reps=5 if name.startswith("attn") else 20)
                rows.append(dict(config=c, ms=ms))
            except Exception as e:
                torch.cuda.synchronize()
                rows.append(dict(config=c, ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
        if args.warm_only:
            continue
        ok = [r for r in rows if r["ms"]]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        results.append(dict(case=name, heuristic_ms=rows[0]["ms"], best=best, candidates=rows))
        best_ms, best_cfg = (best["ms"], best["config"]) if best else (float("nan"), "")
        print(f"{name:36s} heuristic {rows[0]['ms'] or float('nan'):8.4f} ms  best {best_ms:8.4f} ms {best_cfg}",
              flush=True)
        write_json_atomic(dict(device=torch.cuda.get_device_name(0), results=results), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
