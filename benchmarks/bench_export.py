"""Hugging Face checkpoint directory -> Q4_K_M GGUF, end to end: gemmaquant's exporter beside llama.cpp's own pipeline
(convert_hf_to_gguf.py --outtype bf16, then llama-quantize Q4_K_M) on the same models and the same thread count.

    LLAMA_CPP_DIR=/path/to/llama.cpp python benchmarks/bench_export.py [--threads 1[,2]] [--quick]

Models: a bundled tiny fixture (tiny-moe), a larger synthetic dense model with real Gemma 4 head geometry
(head dims 256 / 512, rows that are multiples of 256, so Q4_K / Q6_K are used as on the released models) and a
synthetic with 26B-A4B's widths (rows of 2112 and 704 take llama-quantize's Q5_0 / Q8_0 fallbacks), written once
into --work. gemmaquant runs twice: the library's export_gguf(FloatSource(dir)), and the command line
`gemmaquant quantize DIR --method rtn --gguf-type TYPE --format gguf --no-eval` (the quantizer's work directory,
then the export). All run as fresh processes (interpreter start and imports included), OMP_NUM_THREADS and
torch's threads set to --threads (a list gives a row per count; llama-quantize gets the same count). Every timing
is the best of --repeat runs. Results:
benchmarks/results/bench_export.json and .md, with each side's file size and whether the files picked the same
type and hold the same bytes for every tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def synthetic_checkpoint(work: Path) -> Path:
    """A dense Gemma 4 (31B-like: k_eq_v, 5:1 sliding/full) with ~0.4 B parameters, random bf16 weights."""
    import torch

    from gemmaquant.checkpoint import save_checkpoint
    from gemmaquant.config import FULL, SLIDING, Gemma4Config
    from gemmaquant.fixtures import TOKENIZER_DIR
    from gemmaquant.model.testing import random_model

    out = work / "synthetic-dense"
    if (out / "config.json").is_file():
        return out
    cfg = Gemma4Config(vocab_size=4096, hidden_size=2048, intermediate_size=8192, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=4, num_global_key_value_heads=2, head_dim=256,
                       global_head_dim=512, attention_k_eq_v=True, layer_types=(SLIDING,) * 5 + (FULL,),
                       sliding_window=1024, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
                       max_position_embeddings=8192)
    save_checkpoint(random_model(cfg, dtype=torch.bfloat16), out, dtype=torch.bfloat16, tokenizer_dir=TOKENIZER_DIR)
    return out


def synthetic_moe_checkpoint(work: Path) -> Path:
    """~0.17 B parameters with 26B-A4B's widths (hidden 2816, dense MLP 2112, experts 704, 16 / 8 heads): 2 layers
    (sliding, full) and 4 experts instead of 30 and 128. Rows of 2112 and 704 are not multiples of 256, so
    llama-quantize's fallbacks (Q5_0 for Q4_K, Q8_0 for Q6_K) are exercised as on the released model."""
    import torch

    from gemmaquant.checkpoint import save_checkpoint
    from gemmaquant.config import FULL, SLIDING, VARIANTS
    from gemmaquant.fixtures import TOKENIZER_DIR
    from gemmaquant.model.testing import random_model

    out = work / "synthetic-26b-a4b-width"
    if (out / "config.json").is_file():
        return out
    cfg = dataclasses.replace(VARIANTS["26b-a4b"], vocab_size=4096, num_hidden_layers=2, layer_types=(SLIDING, FULL),
                              num_experts=4, top_k_experts=2, max_position_embeddings=8192)
    save_checkpoint(random_model(cfg, dtype=torch.bfloat16), out, dtype=torch.bfloat16, tokenizer_dir=TOKENIZER_DIR)
    return out


def run(cmd: list[str], env: dict) -> float:
    return run_timed(cmd, env)[0]


def run_timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its children). On a machine shared with
    other work the CPU time is the steadier of the two: it does not count the time the process waited."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{r.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def tensor_types(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf
    import numpy as np

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def bench(name: str, ckpt: Path, llama: Path, work: Path, threads: int, repeat: int, qtype: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    ours_out, conv_out, quant_out = work / f"{name}-ours.gguf", work / f"{name}-bf16.gguf", work / f"{name}-llama.gguf"
    cli_dir = work / f"{name}-cli"
    ours_cmd = [sys.executable, "-c", (
        "import torch, sys; torch.set_num_threads(%d); sys.path.insert(0, %r)\n"
        "from gemmaquant.export import FloatSource, export_gguf\n"
        "export_gguf(FloatSource(%r), %r, type=%r, overwrite=True)" % (threads, str(ROOT), str(ckpt),
                                                                       str(ours_out), qtype))]
    conv_cmd = [sys.executable, str(llama / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(conv_out),
                "--outtype", "bf16"]
    quant_cmd = [str(llama / "build/bin/llama-quantize"), str(conv_out), str(quant_out), qtype, str(threads)]
    cli_cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'gemmaquant'; from gemmaquant.cli import app; app()",
               "quantize", str(ckpt), "--method", "rtn", "--gguf-type", qtype, "--format", "gguf", "--no-eval",
               "--device", "cpu", "--out", str(cli_dir), "--overwrite"]
    # interleaved, so that a change in the machine's load falls on every side alike
    runs: dict[str, list] = {"ours": [], "cli": [], "conv": [], "quant": []}
    cli_env = {**env, "PYTHONPATH": str(ROOT)}
    for _ in range(repeat):
        for key, cmd, e in (("ours", ours_cmd, env), ("cli", cli_cmd, cli_env), ("conv", conv_cmd, env),
                            ("quant", quant_cmd, env)):
            runs[key].append(run_timed(cmd, e))
    (ours, ours_cpu), (cli, cli_cpu), (conv, conv_cpu), (quant, quant_cpu) = (
        (min(w for w, _ in runs[k]), min(c for _, c in runs[k])) for k in ("ours", "cli", "conv", "quant"))
    a, b = tensor_types(ours_out), tensor_types(quant_out)
    c = tensor_types(next(cli_dir.glob("*.gguf")))
    same = sorted(n for n in a if n in b and a[n][0] == b[n][0])
    identical = sorted(n for n in a if n in b and a[n] == b[n])
    cli_identical = sorted(n for n in c if n in b and c[n] == b[n])
    return {"model": name, "threads": threads,
            "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
            "gemmaquant_s": round(ours, 3), "llamacpp_convert_s": round(conv, 3),
            "llamacpp_quantize_s": round(quant, 3), "llamacpp_total_s": round(conv + quant, 3),
            "ratio_gemmaquant_over_llamacpp": round(ours / (conv + quant), 3),
            "gemmaquant_cli_s": round(cli, 3), "ratio_cli_over_llamacpp": round(cli / (conv + quant), 3),
            "gemmaquant_cpu_s": round(ours_cpu, 3), "gemmaquant_cli_cpu_s": round(cli_cpu, 3),
            "llamacpp_cpu_s": round(conv_cpu + quant_cpu, 3),
            "ratio_cpu_gemmaquant_over_llamacpp": round(ours_cpu / (conv_cpu + quant_cpu), 3),
            "ratio_cpu_cli_over_llamacpp": round(cli_cpu / (conv_cpu + quant_cpu), 3),
            "gemmaquant_bytes": ours_out.stat().st_size, "llamacpp_bytes": quant_out.stat().st_size,
            "tensor_types_equal": f"{len(same)}/{len(b)}", "tensors_byte_identical": f"{len(identical)}/{len(b)}",
            "cli_tensors_byte_identical": f"{len(cli_identical)}/{len(b)}"}


def device_check(work: Path, threads: int) -> None:
    """The 26B-A4B-width synthetic exported by export_gguf on cuda and on the CPU (fresh processes): seconds each
    and whether the two files are identical. Results: benchmarks/results/bench_export_cuda.{json,md}."""
    import hashlib

    ckpt = synthetic_moe_checkpoint(work)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    row = {"model": "synthetic-26b-a4b-width-0.17B", "type": "Q4_K_M"}
    for dev in ("cuda", "cpu"):
        out = work / f"device-{dev}.gguf"
        cmd = [sys.executable, "-c", (
            "import torch, sys; torch.set_num_threads(%d); sys.path.insert(0, %r)\n"
            "from gemmaquant.export import FloatSource, export_gguf\n"
            "export_gguf(FloatSource(%r), %r, type='Q4_K_M', overwrite=True, device=%r)"
            % (threads, str(ROOT), str(ckpt), str(out), dev))]
        row[f"{dev}_s"] = round(run(cmd, env), 3)
        row[f"{dev}_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    row["identical"] = row["cuda_sha256"] == row["cpu_sha256"]
    import torch

    row["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_export_cuda.json").write_text(json.dumps(row, indent=2))
    md = ["# export_gguf on cuda against the CPU", "", "| " + " | ".join(row) + " |", "|" + "---|" * len(row),
          "| " + " | ".join(str(v) for v in row.values()) + " |"]
    (RESULTS / "bench_export_cuda.md").write_text("\n".join(md) + "\n")
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"), help="llama.cpp tree with build/bin")
    ap.add_argument("--work", default="/tmp/gemmaquant-bench-export")
    ap.add_argument("--threads", default="1", help="thread count, or a comma-separated list (a row for each)")
    ap.add_argument("--models", default="", help="comma-separated subset of: tiny-moe, dense, 26b (default all)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny fixture only")
    ap.add_argument("--type", default="Q4_K_M", help="GGUF file type / mix (default Q4_K_M)")
    ap.add_argument("--note", default="", help="a line for the results (e.g. how loaded the machine was)")
    ap.add_argument("--device-check", action="store_true",
                    help="instead: the 26B-width synthetic exported on cuda and on the CPU (no llama.cpp needed)")
    args = ap.parse_args()
    if args.device_check:
        sys.path.insert(0, str(ROOT))
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        return device_check(work, int(args.threads.split(",")[0]))
    if not args.llama_cpp:
        sys.exit("set LLAMA_CPP_DIR or pass --llama-cpp")
    sys.path.insert(0, str(ROOT))
    from gemmaquant.fixtures import FIXTURES

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    wanted = set(args.models.split(",")) if args.models else {"tiny-moe", "dense", "26b"}
    models = {"tiny-moe": FIXTURES["tiny-moe"]} if "tiny-moe" in wanted else {}
    if not args.quick:
        if "dense" in wanted:
            models["synthetic-dense-0.4B"] = synthetic_checkpoint(work)
        if "26b" in wanted:
            models["synthetic-26b-a4b-width-0.17B"] = synthetic_moe_checkpoint(work)
    threads = [int(t) for t in args.threads.split(",")]
    rows = [bench(n, p, Path(args.llama_cpp), work, t, args.repeat, args.type) for t in threads
            for n, p in models.items()]
    meta = {"type": args.type, "threads": threads, "repeat": args.repeat, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
            "note": args.note}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_export.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    cols = ["model", "threads", "checkpoint_bytes", "gemmaquant_s", "gemmaquant_cli_s", "llamacpp_convert_s",
            "llamacpp_quantize_s", "llamacpp_total_s", "ratio_gemmaquant_over_llamacpp", "ratio_cli_over_llamacpp",
            "gemmaquant_cpu_s", "gemmaquant_cli_cpu_s", "llamacpp_cpu_s", "ratio_cpu_gemmaquant_over_llamacpp",
            "ratio_cpu_cli_over_llamacpp", "gemmaquant_bytes", "llamacpp_bytes", "tensor_types_equal",
            "tensors_byte_identical", "cli_tensors_byte_identical"]
    md = [f"# HF checkpoint -> {args.type} GGUF, end to end", "",
          f"gemmaquant `export_gguf(FloatSource(dir), out, type=\"{args.type}\")` vs llama.cpp `convert_hf_to_gguf.py "
          f"--outtype bf16` + `llama-quantize {args.type}`; {args.threads} thread(s) on both sides, best of "
          f"{args.repeat}, fresh processes; the command line: `gemmaquant quantize DIR --method rtn --gguf-type "
          f"{args.type} --format gguf --no-eval`. ratio < 1 means gemmaquant is faster. `_s`: wall seconds; "
          f"`_cpu_s`: CPU seconds (user + "
          f"system) of the process, which do not count time spent waiting for a shared machine's cores. The four "
          f"commands run interleaved, each the best of the runs.", "",
          *([f"Note: {args.note}", ""] if args.note else []),
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (RESULTS / "bench_export.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
