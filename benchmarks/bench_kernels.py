"""Roofline benchmarks of the Triton kernels (gemmaquant.kernels) on Gemma 4 shapes, against torch baselines.

Cases (shapes read from gemmaquant.config, variants 26b-a4b and 31b), batch = tokens M / T / B in --batches:
  int4     y = x @ W^T, W int4 (asym g128, sym g32): 26b-a4b dense 2816 -> 2112 and 2112 -> 2816, 31b 5376 <-> 21504
  int8     the same shapes, W8A16 and W8A8 (dynamic per-token activation quantization fused in)
  moe      26b-a4b experts: E = 128, top-8, H = 2816, Ie = 704; bf16 / int8 / int4 (asym g64) experts, random routing
  attn     prefill at 4K / 32K / 128K tokens: sliding (head_dim 256, W = 1024) and full causal (head_dim 512),
           26b-a4b heads (16 q heads; 8 kv heads sliding, 2 full)
  decode   one new token per sequence: sliding ring cache of W = 1024, full cache of 4K / 32K / 128K positions
Each row: median time (triton.testing.do_bench), TFLOP/s, GB/s (the minimum bytes: every operand read once, the
output written once), fractions of the device's peak compute and bandwidth and of the roofline
min(peak, intensity x bandwidth), and the speedup over the torch baseline: bf16 F.linear (cuBLAS) for the matmuls,
the per-expert torch loop in bf16 (moe_experts_ref) for MoE, SDPA (dense mask for sliding) and FlexAttention
(block-sparse sliding mask, compiled) for attention. A baseline that fails or would not fit is reported as such.

    python benchmarks/bench_kernels.py                       # everything, on the CUDA device
    python benchmarks/bench_kernels.py --only int4,moe --batches 1,16,256
    python benchmarks/bench_kernels.py --smoke               # no GPU: tiny shapes in the Triton interpreter, to
                                                             # check this harness; its timings mean nothing
Writes benchmarks/results/kernels_<device>.json and .md (--out to change). Without a CUDA device (and without
--smoke) it prints why and exits 0 without writing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ALL = ("int4", "int8", "moe", "attn", "decode")

# dense peaks: bf16 tensor-core TFLOP/s, int8 tensor-core TOP/s, HBM GB/s (vendor datasheets, no sparsity)
PEAKS = [
    ("H100 PCIe", 756.0, 1513.0, 2000.0),
    ("H100 NVL", 835.0, 1671.0, 3900.0),
    ("H100", 989.4, 1978.9, 3350.0),  # SXM5
    ("H200", 989.4, 1978.9, 4800.0),
    ("A100", 312.0, 624.0, 2039.0),  # SXM4 80GB
    ("L40S", 362.1, 733.0, 864.0),
    ("L4", 121.0, 242.5, 300.0),
]


def device_peaks(name: str, args) -> dict:
    for key, bf16, int8, bw in PEAKS:
        if key in name:
            peaks = dict(bf16_tflops=bf16, int8_tops=int8, hbm_gbs=bw, source=f"datasheet ({key})")
            break
    else:
        peaks = dict(bf16_tflops=None, int8_tops=None, hbm_gbs=None, source="unknown device: pass --peak-*")
    for k in ("bf16_tflops", "int8_tops", "hbm_gbs"):
        if getattr(args, f"peak_{k}") is not None:
            peaks[k], peaks["source"] = getattr(args, f"peak_{k}"), "command line"
    return peaks


def graph_ms(fn, reps: int = 20, flush_bytes: int = 128 << 20) -> float:
    """Milliseconds per call of `fn` without the host's launch overhead, with a cold L2 (as a CUDA graph replays a
    decode step). Two graphs are captured: `reps` x (overwrite a flush_bytes buffer, well past the L2; fn) and
    `reps` x (the overwrite alone); the difference of their replay times (median of 5) / reps is fn's share."""
    import torch

    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    fn()  # compile and warm the allocator outside the capture
    torch.cuda.synchronize()
    times = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        graph.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end))
        times.append(sorted(ts)[2])
        del graph
    return (times[0] - times[1]) / reps


def measure_ceilings() -> dict:
    """The two ceilings measured on this device (METHOD: a large device-to-device copy, counting bytes read and
    written; a large bf16 matrix product through cuBLAS), on random data."""
    import torch
    import triton.testing

    n = 1 << 30  # 1 GiB each way, far past the L2
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)

    def time_ms(fn):  # events, whatever --timer says: a copy captured in a CUDA graph runs on the copy engines
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    copy_ms = time_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return dict(copy_gbs=2 * n / copy_ms / 1e6, bf16_matmul_tflops=2 * 8192 ** 3 / mm_ms / 1e9)


class Bench:
    """Timing, roofline arithmetic and the result rows (written out after every row, so a run cut short keeps
    what it measured)."""

    def __init__(self, args, device: str, peaks: dict):
        self.args, self.device, self.peaks, self.rows = args, device, peaks, []
        self.measured, self.save = {}, lambda: None

    def time_ms(self, fn) -> float:
        if self.args.smoke:  # the interpreter: one call, wall clock
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        if self.args.timer == "graph":
            return graph_ms(fn)
        import triton.testing

        return triton.testing.do_bench(fn, warmup=self.args.warmup, rep=self.args.rep, return_mode="median")

    def try_time(self, fn) -> tuple[float | None, str]:
        try:
            return self.time_ms(fn), ""
        except Exception as e:  # a baseline that does not support the shape, or runs out of memory
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

    def add(self, kernel: str, case: str, batch: int, flops: float, nbytes: float, fn, baselines: dict,
            int8_compute: bool = False, note: str = "", reference=None) -> None:
        """One row. `reference` (optional): the torch reference of the same call; the kernel's relative error
        against it, ||out - ref|| / ||ref||, is recorded, so that no timing is of a kernel computing the wrong thing."""
        ms, err = self.try_time(fn)
        row = dict(kernel=kernel, case=case, batch=batch, flops=flops, bytes=nbytes, ms=ms, note=note or err)
        if reference is not None and ms:
            out, ref = fn().float(), reference().float()
            row["rel_err"] = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            del out, ref
        peak_c = self.peaks["int8_tops" if int8_compute else "bf16_tflops"]
        peak_b = self.peaks["hbm_gbs"]
        if ms:
            row["tflops"] = flops / ms / 1e9
            row["gbs"] = nbytes / ms / 1e6
            if peak_c and peak_b:
                row["frac_peak_compute"] = row["tflops"] / peak_c
                row["frac_peak_bw"] = row["gbs"] / peak_b
                attainable = min(peak_c, flops / nbytes * peak_b / 1e3)  # TFLOP/s at this intensity
                row["frac_roofline"] = row["tflops"] / attainable
            if self.measured.get("copy_gbs"):
                row["frac_measured_bw"] = row["gbs"] / self.measured["copy_gbs"]
        for name, base in baselines.items():
            if isinstance(base, str):  # a reason it was not run
                row[f"{name}_note"] = base
                continue
            bms, berr = self.try_time(base)
            row[f"{name}_ms"] = bms
            if bms and ms:
                row[f"speedup_vs_{name}"] = bms / ms
            if berr:
                row[f"{name}_note"] = berr
        self.rows.append(row)
        self.save()
        print(f"  {kernel:7s} {case:42s} batch {batch:4d}: " + (f"{ms:9.4f} ms" if ms else f"failed {err}")
              + (f"  rel. err. {row['rel_err']:.1e}" if "rel_err" in row else ""), flush=True)


# ------------------------------------------------------------------------------------------------------ cases


def _shapes(args):
    """(name, N, K) dense matmul shapes and the MoE / attention dims, from gemmaquant.config (tiny in --smoke)."""
    if args.smoke:
        return dict(linear=[("smoke 64->96", 96, 64)], H=64, Ie=64, E=8, topk=2, hq=4, hkv_s=2, hkv_f=1,
                    d_s=32, d_f=64, window=16, lengths=[64], contexts=[64])
    from gemmaquant.config import get_variant

    a, b = get_variant("26b-a4b"), get_variant("31b")
    linear = [(f"26b-a4b mlp {a.hidden_size}->{a.intermediate_size}", a.intermediate_size, a.hidden_size),
              (f"26b-a4b mlp {a.intermediate_size}->{a.hidden_size}", a.hidden_size, a.intermediate_size),
              (f"31b mlp {b.hidden_size}->{b.intermediate_size}", b.intermediate_size, b.hidden_size),
              (f"31b mlp {b.intermediate_size}->{b.hidden_size}", b.hidden_size, b.intermediate_size)]
    return dict(linear=linear, H=a.hidden_size, Ie=a.moe_intermediate_size, E=a.num_experts, topk=a.top_k_experts,
                hq=a.num_attention_heads, hkv_s=a.num_key_value_heads, hkv_f=a.num_global_key_value_heads,
                d_s=a.head_dim, d_f=a.global_head_dim, window=a.sliding_window, lengths=[4096, 32768, 131072],
                contexts=[4096, 32768, 131072])


def bench_matmuls(bench: Bench, dev: str, which: set):
    import torch
    import torch.nn.functional as F

    from gemmaquant.formats import Int4Group, Int8Channel
    from gemmaquant.kernels.int4_matmul import int4_matmul, int4_matmul_ref
    from gemmaquant.kernels.int8_matmul import int8_matmul, int8_matmul_ref

    dims = _shapes(bench.args)
    for name, N, K in dims["linear"]:
        w = torch.randn(N, K, device=dev) / K ** 0.5
        w_bf16 = w.to(torch.bfloat16)
        packs = {}
        if "int4" in which:
            for label, fmt in (("int4 asym g128", Int4Group(128, False)), ("int4 sym g32", Int4Group(32, True))):
                if K % fmt.group_size == 0:
                    packs[label] = (fmt, fmt.quantize(w))
        if "int8" in which:
            packs["int8"] = (Int8Channel(), Int8Channel().quantize(w))
        for M in bench.args.batches:
            x = torch.randn(M, K, device=dev).to(torch.bfloat16)
            base = {"torch_bf16": lambda: F.linear(x, w_bf16)}
            for label, (fmt, p) in packs.items():
                d = p.data
                if label.startswith("int4"):
                    g, z = fmt.group_size, d.get("zero")
                    nbytes = 2 * M * K + N * K / 2 + N * K / g * (2 + (z is not None)) + 2 * M * N
                    bench.add("int4", f"{name} {label}", M, 2 * M * N * K, nbytes,
                              lambda: int4_matmul(x, d["qdata"], d["scale"], z, g), base,
                              reference=lambda: int4_matmul_ref(x, d["qdata"], d["scale"], z, g))
                else:
                    nbytes = 2 * M * K + N * K + 2 * N + 2 * M * N
                    for act_quant, tag in ((False, "W8A16"), (True, "W8A8")):
                        bench.add("int8", f"{name} {tag}", M, 2 * M * N * K, nbytes,
                                  lambda aq=act_quant: int8_matmul(x, d["qdata"], d["scale"], aq), base,
                                  int8_compute=act_quant,
                                  reference=lambda aq=act_quant: int8_matmul_ref(x, d["qdata"], d["scale"], aq))


def _experts(E, N, K, fmt, dev, gen_scale):
    """A random expert stack in the kernel's layout: (weight, scale, zero)."""
    import torch

    if fmt == "bf16":
        return (torch.randn(E, N, K, device=dev) * gen_scale).to(torch.bfloat16), None, None
    if fmt == "int8":
        return (torch.randint(-127, 128, (E, N, K), device=dev, dtype=torch.int8),
                torch.full((E, N), gen_scale / 64, device=dev, dtype=torch.bfloat16), None)
    g = 64
    return (torch.randint(0, 256, (E, N, K // 2), device=dev, dtype=torch.uint8),
            torch.full((E, N, K // g), gen_scale / 4, device=dev, dtype=torch.bfloat16),
            torch.randint(0, 16, (E, N, K // g), device=dev, dtype=torch.uint8))


def bench_moe(bench: Bench, dev: str):
    import torch

    from gemmaquant.kernels.moe_grouped_gemm import DECODE_MAX_TOKENS, moe_experts, moe_experts_ref

    dims = _shapes(bench.args)
    H, Ie, E, k = dims["H"], dims["Ie"], dims["E"], dims["topk"]
    ref_gu, _, _ = _experts(E, 2 * Ie, H, "bf16", dev, H ** -0.5)
    ref_dn, _, _ = _experts(E, H, Ie, "bf16", dev, Ie ** -0.5)
    bytes_per = {"bf16": 2.0, "int8": 1.0 + 2 / H, "int4 asym g64": 0.5 + 3 / 64}  # per weight, scales included
    for fmt in ("bf16", "int8", "int4 asym g64"):
        key = fmt.split()[0]
        gu, gs, gz = _experts(E, 2 * Ie, H, key, dev, H ** -0.5)
        dn, ds, dz = _experts(E, H, Ie, key, dev, Ie ** -0.5)
        group = 64 if key == "int4" else 0
        for T in bench.args.batches:
            g = torch.Generator(device=dev).manual_seed(T)
            logits = torch.randn(T, E, device=dev, generator=g)
            tw, ids = torch.softmax(logits, -1).topk(k, dim=-1)
            tw = tw / tw.sum(-1, keepdim=True)
            x = torch.randn(T, H, device=dev).to(torch.bfloat16)
            touched = torch.unique(ids).numel()
            flops = T * k * 6 * H * Ie  # gate_up 2*H*2Ie + down 2*Ie*H per assignment
            nbytes = touched * 3 * H * Ie * bytes_per[fmt] + 2 * T * H * 2
            base = {"torch_bf16_loop": lambda: moe_experts_ref(x, ids, tw, ref_gu, ref_dn)}
            if bench.args.timer == "graph":  # the reference loops over the experts present: host syncs
                base = {"torch_bf16_loop": "not capturable in a CUDA graph (host syncs)"}
            # the other kernel family at the same T: grouped GEMM at decode sizes, per-(token, expert) GEMV above
            other = not T <= DECODE_MAX_TOKENS
            base["grouped" if not other else "decode_gemv"] = (
                lambda other=other: moe_experts(x, ids, tw, gu, dn, gs, ds, gz, dz, group, config=dict(decode=other)))
            bench.add("moe", f"26b-a4b E={E} top-{k} Ie={Ie} {fmt}", T, flops, nbytes,
                      lambda: moe_experts(x, ids, tw, gu, dn, gs, ds, gz, dz, group), base,
                      note=f"{touched} experts touched",
                      reference=lambda: moe_experts_ref(x, ids, tw, gu, dn, gs, ds, gz, dz, group))


def _attn_pairs(L: int, window: int | None) -> int:
    """Visible (query, key) pairs of causal (sliding-window) attention over L tokens."""
    if window is None or window >= L:
        return L * (L + 1) // 2
    return window * (window + 1) // 2 + (L - window) * window


def bench_attention(bench: Bench, dev: str):
    import torch
    import torch.nn.functional as F

    from gemmaquant.kernels.swa_attention import swa_attention, swa_attention_ref

    dims = _shapes(bench.args)
    hq, W = dims["hq"], dims["window"]
    free = torch.cuda.get_device_properties(0).total_memory if dev == "cuda" else 1 << 34
    for kind, hkv, D, window in (("sliding", dims["hkv_s"], dims["d_s"], W), ("sliding", dims["hkv_s"], dims["d_f"], W),
                                 ("full", dims["hkv_f"], dims["d_f"], None)):
        for L in dims["lengths"]:
            q = torch.randn(1, hq, L, D, device=dev).to(torch.bfloat16) * 0.1
            k = torch.randn(1, hkv, L, D, device=dev).to(torch.bfloat16) * 0.1
            v = torch.randn(1, hkv, L, D, device=dev).to(torch.bfloat16)
            pairs = _attn_pairs(L, window)
            flops = 4 * hq * D * pairs  # q k^T and p v over the visible pairs
            nbytes = 2 * (2 * hq * L * D + 2 * hkv * L * D)
            base = {}
            if window is None:
                base["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0,
                                                                      enable_gqa=True)
            elif L * L * 6 < free // 4:  # a dense bool mask plus its additive copy must fit
                i = torch.arange(L, device=dev)
                mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
                base["sdpa"] = lambda m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=1.0,
                                                                             enable_gqa=True)
            else:
                base["sdpa"] = f"skipped: a dense {L}x{L} mask does not fit"
            if window is not None:  # the issue's yardstick: what full causal attention over L tokens costs
                base["sdpa_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0,
                                                                             enable_gqa=True)
            if bench.args.smoke:
                base["flex"] = "skipped in --smoke"
            elif L not in bench.args.flex_lengths:
                base["flex"] = "skipped: L not in --flex-lengths"
            else:
                base["flex"] = _flex(q, k, v, window, dev)
            tag = f"{kind} D={D} " + (f"W={window} " if window else "") + f"L={L}"
            check = (lambda: swa_attention_ref(q, k, v, window, 1.0)) if L <= 4096 else None  # L x L scores
            bench.add("attn", tag, 1, flops, nbytes, lambda: swa_attention(q, k, v, window, 1.0), base, reference=check,
                      note=f"{pairs / (L * (L + 1) / 2):.3f} of the causal pairs visible")
            del q, k, v, base


def _flex(q, k, v, window, dev):
    """A compiled FlexAttention call with the (sliding) causal block mask, or why there is none."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        L = q.shape[2]

        def mask_mod(b, h, qi, ki):
            vis = qi >= ki
            return vis & (qi - ki < window) if window is not None else vis

        bm = create_block_mask(mask_mod, None, None, L, L, device=dev)
        flex = torch.compile(flex_attention)
        return lambda: flex(q, k, v, block_mask=bm, scale=1.0, enable_gqa=True)
    except Exception as e:
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def bench_decode(bench: Bench, dev: str):
    import torch
    import torch.nn.functional as F

    from gemmaquant.kernels.swa_attention import swa_decode, swa_decode_ref

    dims = _shapes(bench.args)
    hq, W = dims["hq"], dims["window"]
    budget = (torch.cuda.get_device_properties(0).total_memory if dev == "cuda" else 1 << 34) // 3
    cases = [("sliding ring", dims["hkv_s"], dims["d_s"], W, W)]
    cases += [("full", dims["hkv_f"], dims["d_f"], None, n) for n in dims["contexts"]]
    for kind, hkv, D, window, C in cases:
        for B in bench.args.batches:
            cache_bytes = 2 * 2 * B * hkv * C * D
            tag = f"{kind} D={D} " + (f"W={window} " if window else "") + f"ctx={C if window is None else 'any'}"
            if cache_bytes > budget:
                print(f"  decode  {tag:42s} batch {B:4d}: skipped, a {cache_bytes / 2**30:.0f} GiB cache")
                continue
            q = torch.randn(B, hq, 1, D, device=dev).to(torch.bfloat16) * 0.1
            kc = torch.randn(B, hkv, C, D, device=dev).to(torch.bfloat16) * 0.1
            vc = torch.randn(B, hkv, C, D, device=dev).to(torch.bfloat16)
            n = torch.full((B,), C if window is None else 10 * C + 3, dtype=torch.int32, device=dev)  # ring wrapped
            flops = 4 * B * hq * D * C
            nbytes = cache_bytes + 2 * 2 * B * hq * D
            base = {"sdpa": lambda: F.scaled_dot_product_attention(q, kc, vc, scale=1.0, enable_gqa=True)}
            check = (lambda: swa_decode_ref(q, kc, vc, n, window, 1.0)) if cache_bytes < 1 << 32 else None
            bench.add("decode", tag, B, flops, nbytes, lambda: swa_decode(q, kc, vc, n, window, 1.0), base,
                      reference=check)
            del q, kc, vc


# ----------------------------------------------------------------------------------------------------- output


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    p = meta["peaks"]
    out = [f"# Triton kernel benchmarks, {meta['device']}", "",
           f"torch {meta['torch']}, triton {meta['triton']}; peaks: bf16 {p['bf16_tflops']} TFLOP/s, int8 "
           f"{p['int8_tops']} TOP/s, HBM {p['hbm_gbs']} GB/s ({p['source']}). "
           + ("Times: CUDA graph replays with a cold L2, launch overhead excluded (graph_ms). "
              if meta.get("timer") == "graph"
              else "Times: median of triton.testing.do_bench (launch overhead included). ")
           + "GB/s counts every operand once; roofline = min(peak, intensity x bandwidth). "
           + (f"Measured here: device copy {meta['measured']['copy_gbs']:.0f} GB/s (read + write), bf16 cuBLAS "
              f"8192^3 {meta['measured']['bf16_matmul_tflops']:.0f} TFLOP/s; '% meas. BW' is against that copy. "
              if meta.get("measured") else "")
           + ("**--smoke: the Triton interpreter on CPU, timings meaningless.**" if meta["smoke"] else ""), ""]
    for kernel in ALL:
        rs = [r for r in rows if r["kernel"] == kernel]
        if not rs:
            continue
        bases = sorted({k[: -len("_ms")] for r in rs for k in r if k.endswith("_ms") and k != "ms"} |
                       {k[: -len("_note")] for r in rs for k in r if k.endswith("_note")})
        out += [f"## {kernel}", "", "| case | batch | ms | TFLOP/s | GB/s | % peak compute | % peak BW | % roofline | "
                "% meas. BW | rel. err. | " + " | ".join(f"vs {b}" for b in bases) + " | note |",
                "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(bases) + "---|"]
        for r in rs:
            sp = [(_fmt(r.get(f"speedup_vs_{b}"), ".2f") + "x") if r.get(f"speedup_vs_{b}") else
                  (r.get(f"{b}_note") or "")[:60] for b in bases]
            pct = [_fmt(100 * r[k], ".1f") if r.get(k) is not None else "" for k in
                   ("frac_peak_compute", "frac_peak_bw", "frac_roofline", "frac_measured_bw")]
            out.append(f"| {r['case']} | {r['batch']} | {_fmt(r['ms'], '.4f')} | {_fmt(r.get('tflops'), '.2f')} | "
                       f"{_fmt(r.get('gbs'), '.0f')} | " + " | ".join(pct) + f" | {_fmt(r.get('rel_err'), '.1e')} | "
                       + " | ".join(sp) +
                       f" | {r.get('note', '')} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(ALL), help=f"comma list of {ALL}")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Triton interpreter (no GPU needed)")
    ap.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/kernels_<device>)")
    ap.add_argument("--timer", choices=("events", "graph"), default="events",
                    help="events: triton.testing.do_bench (host launch overhead included, L2 flushed); graph: CUDA "
                         "graph replays, cold L2, no launch overhead (graph_ms)")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--flex-lengths", default="32768",
                    help="lengths with the FlexAttention baseline (each compiles anew, tens of seconds)")
    for k in ("bf16_tflops", "int8_tops", "hbm_gbs"):
        ap.add_argument(f"--peak-{k.replace('_', '-')}", dest=f"peak_{k}", type=float, default=None)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.flex_lengths = [int(n) for n in args.flex_lengths.split(",") if n]
    which = set(args.only.split(","))
    if which - set(ALL):
        ap.error(f"unknown --only entries {sorted(which - set(ALL))}; valid: {ALL}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.batches = [b for b in args.batches if b <= 32] or [1]
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here (torch.cuda.is_available() is False), so the GPU kernel benchmarks are "
              "skipped and nothing is written. Run it on a GPU machine, or with --smoke to check the harness in the "
              "Triton interpreter.")
        return 0
    import triton

    dev = "cpu" if args.smoke else "cuda"
    name = "cpu (Triton interpreter, --smoke)" if args.smoke else torch.cuda.get_device_name(0)
    peaks = device_peaks(name, args)
    bench = Bench(args, dev, peaks)
    print(f"bench_kernels on {name}")
    meta = dict(device=name, smoke=args.smoke, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), peaks=peaks, batches=args.batches, only=sorted(which),
                timer=args.timer,
                command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])))
    slug = re.sub(r"[^A-Za-z0-9]+", "_", "smoke" if args.smoke else name).strip("_").lower()
    stem = args.out or RESULTS / f"kernels_{slug}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    def save():  # through a temporary name, so that a run killed mid-write leaves the previous file whole
        for ext, text in ((".json", json.dumps(dict(meta=meta, results=bench.rows), indent=1, default=float) + "\n"),
                          (".md", markdown(meta, bench.rows) + "\n")):
            tmp = Path(f"{stem}{ext}.tmp")
            tmp.write_text(text)
            tmp.replace(f"{stem}{ext}")

    bench.save = save
    if dev == "cuda":
        bench.measured = meta["measured"] = measure_ceilings()
        print(f"measured: {bench.measured}", flush=True)
    torch.manual_seed(0)
    if which & {"int4", "int8"}:
        bench_matmuls(bench, dev, which)
    if "moe" in which:
        bench_moe(bench, dev)
    if "decode" in which:
        bench_decode(bench, dev)
    if "attn" in which:
        bench_attention(bench, dev)
    save()
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
