"""Peak memory of qat_train on a model whose per-layer embedding table is as large as E2B's share of it.

E2B and E4B are half per-layer embedding table (262,144 rows). This model is tiny-edge's architecture with a table
of that many rows (vocab_size_per_layer_input 262,144, 64 columns per layer: 100 M parameters, 400 MB in fp32),
random weights, trained a few QAT steps on the bundled train.txt three ways, each in a fresh process:

    whole table   the table trained as one parameter, the student's own copy (qat_train before session 17)
    used rows     the default: only the rows of the training text's tokens train, the rest is the teacher's
                  tensor (gemmaquant.qat.sparse_rows.SparseRowsEmbedding; the same training, tests/qat/test_train.py)
    frozen        --per-layer-embed-lr 0: the table does not train and is the teacher's tensor

Reported: each process's peak resident memory (ru_maxrss) through the training steps (the run stopped after its
last step's checkpoint) and through the whole run (with the export), and the difference from "frozen", against what
training the table should cost on top of one shared copy: 20 bytes per trained value (the student's copy, its
gradient, AdamW's two moments, the moving average). The export writes the trained rows into one copy of the table,
after the optimizer state is freed. The bundled tokenizer has 4,096 tokens, so at most 4,096 rows are used here; with a
real vocabulary the used rows are the training text's distinct tokens (tens of thousands).

    python benchmarks/bench_qat_memory.py        # about two minutes; results/bench_qat_memory.json and .md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROWS, COLUMNS_PER_LAYER = 262_144, 64
MODES = ("whole table", "used rows", "frozen")
PHASES = ("training", "whole run")

CHILD = r"""
import json, resource, sys, torch
import gemmaquant.qat.train as train
from gemmaquant.qat import qat_train
ckpt, data, out, mode, steps, phase = sys.argv[1:7]
torch.set_num_threads(1)
kw = {}
if mode == "whole table":
    train.train_used_rows = lambda *a: None
    train.shared_tables = lambda teacher: []
elif mode == "frozen":
    kw["per_layer_embed_lr"] = 0.0
qat_train(ckpt, bits=4, data=data, steps=int(steps), out=out, eval_seqs=0, export=False, progress=False,
          batch_size=4, seq_len=64, calib_samples=4, calib_seq_len=64, save_every=1000,
          stop_after_step=int(steps) - 1 if phase == "training" else None, **kw)
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def big_table_checkpoint(work: Path) -> Path:
    import dataclasses

    import torch

    import gemmaquant
    from gemmaquant.checkpoint import save_checkpoint
    from gemmaquant.fixtures import TOKENIZER_DIR
    from gemmaquant.model.testing import random_model

    cfg = dataclasses.replace(gemmaquant.load("tiny-edge").config, vocab_size_per_layer_input=ROWS,
                              hidden_size_per_layer_input=COLUMNS_PER_LAYER)
    out = work / "big-per-layer-table"
    save_checkpoint(random_model(cfg, dtype=torch.float32), out, dtype=torch.bfloat16, tokenizer_dir=TOKENIZER_DIR)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    from gemmaquant.fixtures import fixture_path
    from gemmaquant.qat.train import token_stream

    data = Path(str(fixture_path("tiny-edge"))).parent.parent / "calibration" / "data" / "train.txt"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = big_table_checkpoint(Path(tmp))
        cfg = json.loads((ckpt / "config.json").read_text())
        layers = cfg["num_hidden_layers"]
        used = int(token_stream(ckpt, data).unique().numel())
        runs = {}
        for mode in MODES:
            for phase in PHASES:  # "training": stopped after the last step's checkpoint, before the export
                out = Path(tmp) / f"{mode}-{phase}".replace(" ", "-")
                res = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(data), str(out), mode,
                                      str(a.steps), phase], capture_output=True, text=True, check=True)
                runs[mode, phase] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
                print(f"{mode}, {phase}: peak RSS {runs[mode, phase] / 2**20:.0f} MiB", flush=True)
    values = ROWS * layers * COLUMNS_PER_LAYER
    mib = lambda b: round(b / 2**20)  # noqa: E731
    expect = {"whole table": 20 * values, "used rows": 20 * used * layers * COLUMNS_PER_LAYER, "frozen": 0}
    rows = [{"mode": m, **{f"{ph}_peak_rss_mib": mib(runs[m, ph]) for ph in PHASES},
             **{f"{ph}_over_frozen_mib": mib(runs[m, ph] - runs["frozen", ph]) for ph in PHASES},
             "expected_training_over_frozen_mib": mib(expect[m])} for m in MODES]
    result = {"table": {"rows": ROWS, "columns": layers * COLUMNS_PER_LAYER, "values": values,
                        "fp32_mib": mib(4 * values)}, "used_rows": used, "steps": a.steps, "runs": rows,
              "machine": f"{platform.machine()}, torch {__import__('torch').__version__}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_qat_memory.json").write_text(json.dumps(result, indent=2))
    md = [f"Per-layer table {ROWS} x {layers * COLUMNS_PER_LAYER} ({result['table']['fp32_mib']} MiB in fp32); "
          f"the training text uses {used} of its rows. Peak RSS of a fresh process: {a.steps} QAT steps "
          f"(training), or the whole run with its export ({result['machine']}).", "",
          "| per-layer table | training: peak RSS (MiB) | above frozen | expected (20 B per trained value) "
          "| whole run: peak RSS (MiB) | above frozen |", "|---|---|---|---|---|---|"]
    md += [f"| {r['mode']} | {r['training_peak_rss_mib']} | {r['training_over_frozen_mib']} | "
           f"{r['expected_training_over_frozen_mib']} | {r['whole run_peak_rss_mib']} | "
           f"{r['whole run_over_frozen_mib']} |" for r in rows]
    (RESULTS / "bench_qat_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
