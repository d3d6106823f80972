"""Streaming-load benchmark: peak RSS and time to read every layer of a multi-GB synthetic checkpoint.

The checkpoint has a real variant's layer shapes (default: 31b, 3 layers, ~1 GB of bf16 per layer), written one
shard per layer with an index, Gemma4ForConditionalGeneration naming. Reading happens in a fresh subprocess so
its peak RSS is the reader's alone. The claim checked: peak memory stays near one layer's size, not the model's.

    python benchmarks/bench_stream.py [--variant 31b] [--layers 3] [--dir /tmp/gq-stream]
Writes benchmarks/results/stream_<variant>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemmaquant.checkpoint import expected_shapes, hf_config_dict
from gemmaquant.config import get_variant

RESULTS = Path(__file__).parent / "results"


def write_synthetic(variant: str, layers: int, out: Path) -> dict:
    cfg = dataclasses.replace(get_variant(variant), num_hidden_layers=layers, vocab_size=4096,
                              vocab_size_per_layer_input=4096, num_kv_shared_layers=0,
                              layer_types=get_variant(variant).layer_types[-layers:])
    shapes = expected_shapes(cfg)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, layer_bytes = {}, []
    groups = [[n for n in shapes if not n.startswith("layers.")]] + \
             [[n for n in shapes if n.startswith(f"layers.{i}.")] for i in range(layers)]
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {f"model.language_model.{n}": torch.randn(shapes[n], dtype=torch.bfloat16) * 0.02 for n in names}
        save_file(tensors, str(out / fname))
        weight_map.update({t: fname for t in tensors})
        if k:
            layer_bytes.append(sum(t.numel() * 2 for t in tensors.values()))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, multimodal=True)))
    return {"layer_bytes_max": max(layer_bytes),
            "total_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


def read_all(path: str) -> None:
    """Subprocess body: stream every layer, print peak RSS and seconds as JSON."""
    from gemmaquant.checkpoint import Checkpoint

    t0 = time.perf_counter()
    ckpt = Checkpoint(path)
    checksum = 0.0
    for i in range(ckpt.config.num_hidden_layers):
        layer = ckpt.layer_state(i)
        checksum += sum(float(t.sum(dtype=torch.float32)) for t in layer.values())  # touch every byte
        del layer
    print(json.dumps({"seconds": time.perf_counter() - t0, "checksum": checksum, "peak_rss_bytes": peak_rss()}))


def peak_rss() -> int:
    """VmHWM of this process (ru_maxrss would include the parent's RSS at fork time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="31b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/gq-stream")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--read", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read:
        return read_all(args.read)
    out = Path(args.dir) / args.variant
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    sizes = write_synthetic(args.variant, args.layers, out)
    write_s = time.perf_counter() - t0
    base = subprocess.run([sys.executable, "-c", "import gemmaquant.checkpoint, sys; sys.path.insert(0, %r); "
                           "from bench_stream import peak_rss; print(peak_rss())" % str(Path(__file__).parent)],
                          capture_output=True, text=True, check=True)
    r = subprocess.run([sys.executable, __file__, "--read", str(out)], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    baseline = int(base.stdout.strip())
    result = {"variant": args.variant, "layers": args.layers, **sizes, "write_seconds": write_s,
              "read_seconds": res["seconds"], "peak_rss_bytes": res["peak_rss_bytes"],
              "import_baseline_rss_bytes": baseline,
              "peak_over_baseline_per_layer": (res["peak_rss_bytes"] - baseline) / sizes["layer_bytes_max"],
              "peak_over_baseline_per_model": (res["peak_rss_bytes"] - baseline) / sizes["total_bytes"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"stream_{args.variant}.json").write_text(json.dumps(result, indent=2))
    gb = 1 / 2**30
    (RESULTS / f"stream_{args.variant}.md").write_text(
        f"# Streaming load, {args.variant} shapes, {args.layers} layers\n\n"
        f"| checkpoint | largest layer | peak RSS (reader) | import baseline | (peak - baseline) / layer "
        f"| read time |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {sizes['total_bytes'] * gb:.2f} GiB | {sizes['layer_bytes_max'] * gb:.2f} GiB | "
        f"{res['peak_rss_bytes'] * gb:.2f} GiB | {baseline * gb:.2f} GiB | "
        f"{result['peak_over_baseline_per_layer']:.2f} | {res['seconds']:.1f} s |\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
