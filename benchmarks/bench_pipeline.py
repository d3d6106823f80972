"""The whole quantize pipeline (calibration forward, statistics, GPTQ, packing, export) on a synthetic checkpoint
with the real layer geometry of 26B-A4B and of 31B: the first N layers, random bf16 weights, written on the
machine that runs this (benchmarks/bench_stream.write_synthetic) with the bundled fixtures' tokenizer.

Reported per geometry: seconds per layer by stage, peak device memory (torch.cuda.max_memory_allocated) and peak
host memory (VmHWM of the process that quantized: one subprocess per geometry), and the projected whole-model
time. Stages (timed with a device synchronize around each):
    build        checkpoint -> the layer on the device (fp32)
    forward      the layer forward on the calibration batches (the propagation pass, no hooks)
    statistics   the capture pass minus a plain forward: Hessians and per-expert statistics
    forced       forced routing of starved experts
    quantize     GPTQ (and packing) of every matrix of the layer
    save         the layer and the next layer's inputs written to the work directory
    export       GGUF (Q4_0) + compressed-tensors (W4A16) of the N-layer model, once
projected_seconds = (sum of the per-layer stages, mean over the N layers) x the real model's layer count, at the
calibration size of the run; projected_seconds_recipe scales forward and statistics to the bundled recipe's
calibration size (128 x 2048 tokens) and the expert work to 128 experts when --experts reduced it.

    python benchmarks/bench_pipeline.py                                  # GPU: 2 layers, 32 x 2048 tokens
    python benchmarks/bench_pipeline.py --device cpu --layers 1 --samples 2 --seq-len 128 --experts 8
Writes benchmarks/results/pipeline_<device>.json and .md (--out to choose the stem).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_stream import peak_rss  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = ("26b-a4b", "31b")


def make_checkpoint(model: str, layers: int, experts: int | None, out: Path) -> None:
    """The first `layers` layers of `model` (optionally with fewer experts), random bf16, plus a tokenizer."""
    from importlib import resources

    import bench_stream
    from gemmaquant.config import get_variant

    real = get_variant(model)
    if experts and real.enable_moe_block:
        reduced = dataclasses.replace(real, num_experts=experts, top_k_experts=min(real.top_k_experts, experts))
        bench_stream.get_variant = lambda name: reduced  # write_synthetic reads the variant through this name
    try:
        bench_stream.write_synthetic(model, layers, out)
    finally:
        bench_stream.get_variant = get_variant
    tok = Path(str(resources.files("gemmaquant.fixtures") / "tokenizer"))
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)


@contextmanager
def timed(times: dict, key: str, dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times[key] = times.get(key, 0.0) + time.perf_counter() - t0


def run_one(ckpt: Path, out: Path, device: str, samples: int, seq_len: int, method: str = "gptq") -> dict:
    """Subprocess body: quantize + export with every stage timed; peaks of this process."""
    import gemmaquant  # noqa: F401  (gemmaquant.quantize is the function; the module is in sys.modules)
    from gemmaquant.device import device_name, resolve_device
    from gemmaquant.recipe import Recipe
    from gemmaquant.workflow import export_outputs

    q = sys.modules["gemmaquant.quantize"]
    dev = resolve_device(device)
    times: dict[str, float] = {}
    in_capture = [False]
    real = {n: getattr(q, n) for n in ("build_layer", "run_layer", "force_route_rare_experts", "quantize_layer",
                                       "save_layer", "capture")}

    def wrap(name, key):
        def f(*a, **k):
            with timed(times, key() if callable(key) else key, dev):
                return real[name](*a, **k)
        return f

    @contextmanager
    def capture(*a, **k):
        in_capture[0] = True
        with real["capture"](*a, **k) as s:
            yield s
        in_capture[0] = False

    q.build_layer = wrap("build_layer", "build")
    q.run_layer = wrap("run_layer", lambda: "capture_pass" if in_capture[0] else "forward")
    q.force_route_rare_experts = wrap("force_route_rare_experts", "forced")
    q.quantize_layer = wrap("quantize_layer", "quantize")
    if method == "gptq-loop":  # the experts' GPTQ one expert at a time (the reference loop), for comparison
        batched = q.quantize_layer
        q.quantize_layer = lambda *a, **k: batched(*a, **{**k, "batched_gptq": False})
        method = "gptq"
    q.save_layer = wrap("save_layer", "save")
    q.capture = capture
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    recipe = Recipe.from_dict({"method": method, "weight_format": "int4_g32_sym", "n_samples": samples,
                               "seq_len": seq_len, "batch_size": 4 if dev.type == "cuda" else 1})
    t0 = time.perf_counter()
    res = q.quantize(str(ckpt), recipe, out=out, progress=False, device=dev)
    total_quantize = time.perf_counter() - t0
    with timed(times, "export", dev):
        export_outputs(res.work_dir, out, "synthetic", recipe, ("gguf", "safetensors"))
    layers = len(res.layers)
    times["statistics"] = max(times.pop("capture_pass", 0.0) - times.get("forward", 0.0), 0.0)
    per_layer = {k: v / layers for k, v in times.items() if k != "export"}
    return {"device": device_name(dev), "layers": layers, "tokens": samples * seq_len,
            "seconds_per_layer": per_layer, "export_seconds": times["export"],
            "quantize_seconds": total_quantize,
            "peak_device_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0,
            "peak_host_bytes": peak_rss()}


def project(model: str, r: dict, experts: int | None) -> dict:
    from gemmaquant.config import get_variant

    real = get_variant(model)
    L = real.num_hidden_layers
    per = r["seconds_per_layer"]
    layer_s = sum(per.values())
    recipe_tokens = 128 * 2048
    scale_tokens = recipe_tokens / r["tokens"]
    scale_experts = (real.num_experts / experts) if experts and real.enable_moe_block else 1.0
    # forward and statistics grow with the tokens (top-k routing: not with the experts); the rest of an MoE
    # layer's work is taken to grow with the experts (an upper bound: attention and the dense MLP do not)
    layer_recipe = (per.get("forward", 0) + per.get("statistics", 0)) * scale_tokens + \
        sum(per.get(k, 0) for k in ("build", "forced", "quantize", "save")) * scale_experts
    return {"projected_seconds": layer_s * L, "projected_seconds_recipe": layer_recipe * L, "model_layers": L}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences (the recipe's: 128)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=None, help="MoE: this many experts instead of 128 (CPU runs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rtn-models", default="", help="models quantized by RTN instead of GPTQ (a CPU run where one "
                    "layer's GPTQ takes too long; the row says so)")
    ap.add_argument("--method", default="gptq", help=argparse.SUPPRESS)
    ap.add_argument("--expert-loop-too", action="store_true", help="MoE models: a second row with the experts' "
                    "GPTQ one expert at a time (the loop before batched GPTQ), measured right after the batched one")
    ap.add_argument("--dir", default="/tmp/gq-pipeline")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/pipeline_<device>)")
    ap.add_argument("--run-one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        print(json.dumps(run_one(Path(args.run_one[0]), Path(args.run_one[1]), args.device, args.samples,
                                 args.seq_len, args.method)))
        return
    from gemmaquant.config import get_variant
    from gemmaquant.device import resolve_device

    dev = resolve_device(args.device)
    rows = []
    meta = {"device": None, "torch": torch.__version__, "machine": platform.machine(), "layers": args.layers,
            "samples": args.samples, "seq_len": args.seq_len, "experts": args.experts,
            "reduced": [x for x in (f"{args.layers} layers" if args.layers else None,
                                    f"{args.samples} x {args.seq_len} calibration tokens (recipe: 128 x 2048)",
                                    f"{args.experts} experts (real: 128)" if args.experts else None) if x]}
    for model in args.models.split(","):
        root = Path(args.dir) / model
        shutil.rmtree(root, ignore_errors=True)
        make_checkpoint(model, args.layers, args.experts, root / "ckpt")
        method = "rtn" if model in args.rtn_models.split(",") else "gptq"
        moe = get_variant(model).enable_moe_block
        for m in [method] + (["gptq-loop"] if args.expert_loop_too and method == "gptq" and moe else []):
            shutil.rmtree(root / "out", ignore_errors=True)
            p = subprocess.run([sys.executable, __file__, "--device", str(dev), "--samples", str(args.samples),
                                "--method", m,
                                "--seq-len", str(args.seq_len), "--run-one", str(root / "ckpt"), str(root / "out")],
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{model}: {p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            meta["device"] = r.pop("device")
            label = "gptq (expert loop)" if m == "gptq-loop" else m + (" (batched experts)" if m == "gptq" and moe
                                                                        else "")
            rows.append({"model": model, "method": label, **r, **project(model, r, args.experts)})
            print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    write(Path(args.out) if args.out else RESULTS / f"pipeline_{dev.type}", meta, rows)


def write(stem: Path, meta: dict, rows: list[dict]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    gib = 2**30
    stages = ("build", "forward", "statistics", "forced", "quantize", "save")
    md = [f"# Quantize pipeline on {meta['device']}", "",
          f"Synthetic checkpoints with the real layer geometry; reduced: {', '.join(meta['reduced'])}.", "",
          "| model | method | " + " | ".join(f"{s} s/layer" for s in stages) + " | export s | peak device | peak host "
          "| projected (this calibration) | projected (128 x 2048 tokens, 128 experts) |",
          "|---|---|" + "---|" * (len(stages) + 5)]
    for r in rows:
        per = r["seconds_per_layer"]
        md.append(f"| {r['model']} | {r['method']} | " + " | ".join(f"{per.get(s, 0):.2f}" for s in stages) +
                  f" | {r['export_seconds']:.1f} | {r['peak_device_bytes'] / gib:.2f} GiB | "
                  f"{r['peak_host_bytes'] / gib:.2f} GiB | {r['projected_seconds'] / 3600:.2f} h | "
                  f"{r['projected_seconds_recipe'] / 3600:.2f} h |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
