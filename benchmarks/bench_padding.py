"""Zero-padding as a `--target-bpw` candidate where it can pay: a random-weight model with Gemma 4 26B-A4B's odd
widths (dense MLP 2112, experts 704; hidden 256, 4 layers, 4 experts), where padding costs +9% as on the real
model (the trained fixtures' widths, 576 / 320 / 128, cost +33% to +100%: benchmarks/results/mix_padding.md).

For each budget (llama.cpp Q4_K_M's bits per weight on this model, and lower ones where the 256-block types of a
padded ffn_down, Q3_K and Q2_K, are the cheap end), the mix is solved with the padding candidate (what
`--target-bpw` does) and without it, each quantized with GPTQ, and both measured by llama-perplexity
--kl-divergence against the F32 file on held-out text. Random weights: this measures the mechanism (does the
solver's prediction hold, does the padded file deliver it), not the quality of a trained model.
Writes benchmarks/results/padding_synthetic.{json,md}.

    LLAMA_CPP_DIR=/work/llama/src python benchmarks/bench_padding.py [--bpw 3.25,3.5,3.75]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mix  # noqa: E402  (the llama.cpp helpers: conversions, llama-perplexity's KLD)

RESULTS = bench_mix.RESULTS


def synthetic():
    from gemmaquant.config import FULL, SLIDING, Gemma4Config

    return Gemma4Config(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
                        global_head_dim=128, sliding_window=32, final_logit_softcapping=30.0,
                        layer_types=(SLIDING, SLIDING, SLIDING, FULL), max_position_embeddings=4096,
                        intermediate_size=2112, num_key_value_heads=2, num_global_key_value_heads=1,
                        attention_k_eq_v=True, hidden_size_per_layer_input=0, enable_moe_block=True,
                        num_experts=4, top_k_experts=2, moe_intermediate_size=704)


def run(args, tmp: Path) -> dict:
    import torch

    from gemmaquant.checkpoint import save_checkpoint
    from gemmaquant.export import FloatSource, export_gguf
    from gemmaquant.export.inspect import file_bits
    from gemmaquant.fixtures import TOKENIZER_DIR
    from gemmaquant.mix_search import solve, solve_padded, total, with_padding
    from gemmaquant.model.testing import random_model
    from gemmaquant.padding import padded_config, padded_shape
    from gemmaquant.quantize import quantize
    from gemmaquant.recipe import Recipe
    from gemmaquant.sensitivity import measure
    from gemmaquant.target_mix import budget_bytes, families, file_type_for
    from gemmaquant.workflow import export_outputs

    torch.set_num_threads(1)
    _, bins = bench_mix._bins()
    _, held = bench_mix._texts(tmp)
    cfg = synthetic()
    ckpt = save_checkpoint(random_model(cfg, seed=0), tmp / "odd", dtype=torch.bfloat16, tokenizer_dir=TOKENIZER_DIR)
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 1}))
    f32 = export_gguf(FloatSource(ckpt), tmp / "f32.gguf", type="F32")
    base = tmp / "base.kld"
    bench_mix._run([bins / "llama-perplexity", "-m", f32, "-f", held, "-c", bench_mix.N_CTX, "-b", bench_mix.N_CTX,
                    "-t", 1, "--chunks", args.chunks, "-ctk", "f32", "-ctv", "f32", "-fa", "off",
                    "--kl-divergence-base", base])
    q4 = export_gguf(FloatSource(ckpt), tmp / "q4_k_m.gguf", type="Q4_K_M")  # llama-quantize's bytes (tested)
    recipe = Recipe(method="gptq", gguf_type="Q4_K_M", n_samples=args.n_samples, seq_len=args.seq_len)
    t0 = time.time()
    sens = measure(ckpt, recipe, progress=False)
    sens_s = time.time() - t0
    rows = []

    def kld(path: Path) -> float:
        return bench_mix._kld(bins, path, base, held, args.chunks)

    fb = file_bits(q4)
    rows.append({"file": "RTN onto llama.cpp's Q4_K_M mix (llama-quantize's bytes)", "pad_to_block": [],
                 "bits_per_weight": 8 * fb["bytes"] / sens.weights, "bytes": fb["bytes"], "kld": kld(q4)})
    print(json.dumps(rows[-1]), flush=True)
    targets = [rows[0]["bits_per_weight"]] + [float(b) for b in args.bpw.split(",") if b]
    for bpw in targets:
        budget = budget_bytes(sens, bpw, None)
        solved = {"with the padding candidate": solve_padded(sens.units, sens.padded, sens.pad_kind, budget,
                                                             sens.fixed_bytes)}
        try:
            solved["without it"] = (solve(sens.units, budget, sens.fixed_bytes), ())
        except Exception as e:  # noqa: BLE001 - below the unpadded model's smallest mix
            print(f"{bpw:.3f} bpw without padding: {e}", flush=True)
        done = {}
        for label, (choice, pad) in solved.items():
            units = with_padding(sens.units, sens.padded, sens.pad_kind, pad)
            nbytes, predicted = total(units, choice)
            key = (tuple(sorted(choice.items())), pad)
            row = {"target_bpw": bpw, "file": f"--target-bpw {bpw:.3f}, {label}", "pad_to_block": list(pad),
                   "predicted_kl": predicted}
            if key in done:
                rows.append({**done[key], **row, "same_file_as": done[key]["file"]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            pcfg = padded_config(cfg, pad)
            shapes = {u.name: padded_shape(u.name, u.shape, cfg, pcfg) for u in sens.units}
            r = Recipe.from_dict({**recipe.to_dict(), "gguf_type": file_type_for(choice, shapes),
                                  "tensor_types": choice, "pad_to_block": list(pad) or None})
            out = tmp / f"mix-{bpw:.3f}-{'-'.join(pad) or 'unpadded'}"
            res = quantize(ckpt, r, out=out, progress=False)
            path = Path(export_outputs(res.work_dir, out, "odd", r, ("gguf",))["gguf"])
            fb = file_bits(path)
            assert fb["bytes"] == nbytes + sens.fixed_bytes, (fb["bytes"], nbytes + sens.fixed_bytes)
            row.update(bits_per_weight=8 * fb["bytes"] / sens.weights, bytes=fb["bytes"], kld=kld(path),
                       families=families(choice, shapes))
            rows.append(row)
            done[key] = row
            print(json.dumps({k: v for k, v in row.items() if k != "families"}), flush=True)
    return {"settings": {"n_samples": args.n_samples, "seq_len": args.seq_len, "chunks": args.chunks,
                         "n_ctx": bench_mix.N_CTX, "sensitivity_seconds": round(sens_s, 1)}, "rows": rows}


def write(data: dict) -> None:
    s = data["settings"]
    lines = [f"Regenerated by `python benchmarks/bench_padding.py`: a random-weight model with 26B-A4B's MLP widths "
             f"(dense 2112, experts 704; hidden 256, 4 layers, 4 experts), llama-perplexity --kl-divergence against "
             f"its F32 file on {s['chunks']} chunks of {s['n_ctx']} held-out tokens; GPTQ, {s['n_samples']} x "
             f"{s['seq_len']} calibration tokens. Bits per weight over the model's own weights (a padded file's zeros "
             f"not counted). Random weights: the mechanism, not a trained model's quality.", "",
             "| file | padded | bits/weight | mean KLD | predicted KL |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        same = f" (the same file as \"{r['same_file_as']}\")" if r.get("same_file_as") else ""
        pred = f"{r['predicted_kl']:.2e}" if r.get("predicted_kl") is not None else ""
        lines.append(f"| {r['file']}{same} | {', '.join(r['pad_to_block']) or 'no'} | {r['bits_per_weight']:.3f} | "
                     f"{r['kld']:.5f} | {pred} |")
    (RESULTS / "padding_synthetic.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpw", default="3.25,3.5,3.75", help="budgets besides llama.cpp Q4_K_M's bits per weight")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=50)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = run(args, Path(tmp))
    (RESULTS / "padding_synthetic.json").write_text(json.dumps(data, indent=1) + "\n")
    write(data)


if __name__ == "__main__":
    main()
