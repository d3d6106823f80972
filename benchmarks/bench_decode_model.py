"""Decode tokens/s of Gemma 4 with packed int4 / int8 weights against bf16, projected from real-geometry layers.

    python benchmarks/bench_decode_model.py                       # on a GPU: 26b-a4b and 31b, batch 1 and 16
    python benchmarks/bench_decode_model.py --smoke               # anywhere: the bundled tiny models, torch refs

For each model, one sliding and one full decoder layer are built at the real widths with random weights (from the
model's config, no checkpoint needed) and one decode step of each is timed:
    q / k / v projections (v = k on Gemma 4's k_eq_v full layers), attention of the B new queries against a KV
    cache of --context tokens (a ring of W slots on sliding layers), o projection, the dense MLP, and on 26B-A4B the
    router (bf16) with its top-8 and the routed experts.
The whole model is then projected: n_sliding * t_sliding + n_full * t_full + the tied lm_head (bf16 in every row:
the quantizer keeps the embedding float in the compressed-tensors export), and tokens/s = B / that time. Left out,
the same in every row: norms, RoPE, residual adds, writing the new K/V into the cache, sampling (a few kernel
launches each, which a CUDA graph makes cheap). Formats: bf16 weights through cuBLAS (F.linear) and the Triton MoE
kernel with float experts; int4 = Int4Group (group 32, symmetric: the W4A16 export) and int8 = Int8Channel through
gemmaquant.ops, the kernels the runtime uses. Random codes give the same speed as trained ones.

Timing on CUDA: each step is captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph), so kernel
launch overhead is excluded as it is with `torch.compile(mode="reduce-overhead")`; where capture fails the row says
so and falls back to CUDA events. On the CPU (--smoke) the ops run their torch references: a check that the script
works, not a speed figure. Output: benchmarks/results/decode_model_<device>.{json,md}; ratios are measured side by
side in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemmaquant import ops  # noqa: E402
from gemmaquant.config import Gemma4Config  # noqa: E402
from gemmaquant.formats import Int4Group, Int8Channel  # noqa: E402
from gemmaquant.model.gemma4 import Gemma4  # noqa: E402
from gemmaquant.workflow import model_config  # noqa: E402

FORMATS = ("bf16", "int4", "int8")


def layer_shapes(cfg: Gemma4Config, kind: str) -> dict[str, tuple]:
    """Parameter shapes of the first layer of `kind` ("sliding_attention" / "full_attention"), read off the
    reference model built on the meta device (so k_eq_v, head dims and the MoE block follow the config)."""
    i = cfg.layer_types.index(kind)
    n = cfg.layer_types.index("full_attention") + 1  # a prefix ending in a full layer: the config forces that
    n = max(n, i + 1)
    small = replace(cfg, num_hidden_layers=n, layer_types=cfg.layer_types[:n], num_kv_shared_layers=0)
    with torch.device("meta"):
        model = Gemma4(small)
    prefix = f"layers.{i}."
    return {n[len(prefix):]: tuple(p.shape) for n, p in model.named_parameters() if n.startswith(prefix)}


def pack(w: torch.Tensor, fmt: str):
    """w [..., N, K] bf16 -> what the step multiplies by: the tensor itself (bf16) or the format's Packed data.
    Both formats are per row (group-wise along K / per channel), so an expert stack packs as one [E*N, K]."""
    if fmt == "bf16":
        return w
    q = (Int4Group(32, True) if fmt == "int4" else Int8Channel()).quantize(w.reshape(-1, w.shape[-1]).float())
    if w.dim() == 2:
        return q
    return {k: t.reshape(*w.shape[:-1], t.shape[-1]) if t.dim() == 2 else t.reshape(w.shape[:-1])
            for k, t in q.data.items()}


def linear(x: torch.Tensor, w) -> torch.Tensor:
    return F.linear(x, w) if isinstance(w, torch.Tensor) else ops.linear(x, w)


def build_step(cfg: Gemma4Config, kind: str, fmt: str, B: int, context: int, dev: torch.device):
    """(step, weight_bytes): a no-argument callable running one decode step of a `kind` layer for B sequences."""
    shapes = layer_shapes(cfg, kind)
    torch.manual_seed(0)

    def rand(shape, fan_in):
        return (torch.randn(shape, device=dev) / fan_in ** 0.5).to(torch.bfloat16)

    mats = {n: pack(rand(s, s[-1]), fmt) for n, s in shapes.items()
            if n.endswith("proj.weight") and not n.startswith("router")}
    nbytes = sum(_bytes(m) for m in mats.values())
    sliding = kind == "sliding_attention"
    D = cfg.head_dim if sliding else cfg.global_head_dim
    hq = shapes["self_attn.q_proj.weight"][0] // D
    hkv = shapes["self_attn.k_proj.weight"][0] // D
    C = min(cfg.sliding_window, context) if sliding else context
    kc = torch.randn(B, hkv, C, D, device=dev).to(torch.bfloat16) * 0.1
    vc = torch.randn(B, hkv, C, D, device=dev).to(torch.bfloat16)
    seqlens = torch.full((B,), context, dtype=torch.int32, device=dev)  # a sliding ring has wrapped
    x = torch.randn(B, cfg.hidden_size, device=dev).to(torch.bfloat16)
    moe = "experts.gate_up_proj" in shapes
    if moe:
        router = rand(shapes["router.proj.weight"], cfg.hidden_size)
        gu_w = rand(shapes["experts.gate_up_proj"], cfg.hidden_size)
        dn_w = rand(shapes["experts.down_proj"], shapes["experts.down_proj"][-1])
        gu, dn = pack(gu_w, fmt), pack(dn_w, fmt)
        del gu_w, dn_w
        nbytes += _bytes(gu) + _bytes(dn)  # all experts; a step reads only the ones its tokens chose

    def experts(h):
        probs = torch.softmax(F.linear(h, router).float(), -1)
        tw, ids = probs.topk(cfg.top_k_experts, dim=-1)
        tw = tw / tw.sum(-1, keepdim=True)
        if fmt == "bf16":
            return ops.moe_experts(h, ids, tw, gu, dn)
        return ops.moe_experts(h, ids, tw, gu["qdata"], dn["qdata"], gate_up_scale=gu["scale"],
                               down_scale=dn["scale"], gate_up_zero=gu.get("zero"), down_zero=dn.get("zero"),
                               group_size=32 if fmt == "int4" else 0)

    def step():
        q = linear(x, mats["self_attn.q_proj.weight"]).view(B, hq, 1, D)
        for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):  # the new K / V (not written back)
            if name in mats:
                linear(x, mats[name])
        o = ops.attention(q, kc, vc, window=cfg.sliding_window if sliding else None, cache_seqlens=seqlens)
        h = x + linear(o.reshape(B, hq * D), mats["self_attn.o_proj.weight"])
        mlp = linear(F.gelu(linear(h, mats["mlp.gate_proj.weight"]), approximate="tanh")
                     * linear(h, mats["mlp.up_proj.weight"]), mats["mlp.down_proj.weight"])
        return h + mlp + (experts(h) if moe else 0)

    return step, nbytes + kc.numel() * 4


def _bytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    data = w.data if hasattr(w, "data") and isinstance(w.data, dict) else w
    return sum(t.numel() * t.element_size() for t in data.values())


def time_ms(fn, dev: torch.device) -> tuple[float, str]:
    """Median ms of fn: a replayed CUDA graph on CUDA (events if capture fails), wall clock on the CPU."""
    if dev.type == "cuda":
        import triton.testing

        fn()  # compile the kernels before capture
        torch.cuda.synchronize()
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"), "cuda graph"
        except Exception as e:  # noqa: BLE001  (a capture failure is reported in the row, not raised)
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"), f"events ({type(e).__name__})"
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1], "wall clock (torch references)"


def run(models: list[str], batches: list[int], context: int, dev: torch.device) -> list[dict]:
    rows = []
    for name in models:
        cfg = model_config(name)
        counts = {k: cfg.layer_types.count(k) for k in ("sliding_attention", "full_attention")}
        head = torch.randn(cfg.vocab_size, cfg.hidden_size, device=dev).to(torch.bfloat16)
        for B in batches:
            x = torch.randn(B, cfg.hidden_size, device=dev).to(torch.bfloat16)
            t_head, _ = time_ms(lambda: F.linear(x, head), dev)
            for fmt in FORMATS:
                per_layer, how = {}, set()
                for kind in counts:
                    if not counts[kind]:
                        continue
                    step, _ = build_step(cfg, kind, fmt, B, context, dev)
                    per_layer[kind], h = time_ms(step, dev)
                    how.add(h)
                    del step
                total = sum(counts[k] * per_layer[k] for k in per_layer) + t_head
                rows.append(dict(model=name, format=fmt, batch=B, context=context,
                                 sliding_layer_ms=per_layer.get("sliding_attention"),
                                 full_layer_ms=per_layer.get("full_attention"), lm_head_ms=t_head,
                                 layers=counts, step_ms=total, tokens_per_s=B / total * 1e3,
                                 timer=", ".join(sorted(how))))
                print(f"{name:8s} {fmt:5s} batch {B:3d}: {rows[-1]['tokens_per_s']:10.1f} tok/s "
                      f"({total:.3f} ms per step; {rows[-1]['timer']})", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del head
    for r in rows:  # the ratio to bf16 at the same model and batch, measured in this run
        base = next(b for b in rows if b["model"] == r["model"] and b["batch"] == r["batch"] and b["format"] == "bf16")
        r["speedup_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    out = [f"# Decode tokens/s, packed against bf16 ({meta['device']})", "",
           f"{meta['date']}; torch {meta['torch']}; KV context {meta['context']}; projected from one sliding and one "
           "full layer at the real widths (benchmarks/bench_decode_model.py docstring: what a step holds). "
           + ("CPU: the torch references, a smoke run, not a speed figure." if meta["device_type"] == "cpu" else ""),
           "", "| model | format | batch | sliding layer ms | full layer ms | lm_head ms | step ms | tokens/s "
           "| vs bf16 | timer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        out.append(f"| {r['model']} | {r['format']} | {r['batch']} | {f(r['sliding_layer_ms'])} | "
                   f"{f(r['full_layer_ms'])} | {f(r['lm_head_ms'])} | {r['step_ms']:.3f} | {r['tokens_per_s']:.1f} | "
                   f"{r['speedup_vs_bf16']:.2f}x | {r['timer']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None,
                    help="comma-separated (default: 26b-a4b,31b; --smoke: tiny-moe,tiny-dense)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=None, help="KV cache length (default 4096; --smoke 64)")
    ap.add_argument("--smoke", action="store_true", help="the bundled tiny models: checks the script, on any device")
    ap.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = (args.models or ("tiny-moe,tiny-dense" if args.smoke else "26b-a4b,31b")).split(",")
    context = args.context or (64 if args.smoke else 4096)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    meta = dict(device=name, device_type=dev.type, torch=torch.__version__, context=context,
                date=time.strftime("%Y-%m-%d"), smoke=args.smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode_model_{'smoke_' if args.smoke else ''}{dev.type}"
    rows = []
    for model in models:  # results written after each model: a time limit keeps what was measured
        rows += run([model], [int(b) for b in args.batches.split(",")], context, dev)
        for suffix, text in ((".json", json.dumps(dict(meta=meta, rows=rows), indent=1)),
                             (".md", markdown(meta, rows))):
            tmp = out / (stem + suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(out / (stem + suffix))
        print(f"wrote {out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
