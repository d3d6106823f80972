"""Quality per size on the trained fixtures: bits per weight against mean KLD measured by llama.cpp's
`llama-perplexity --kl-divergence` (held-out text, F32 KV cache, flash attention off), for llama.cpp's own
Q3_K_M, Q4_K_M, Q5_K_M (and IQ4_XS) with and without an imatrix from the calibration text, against gemmaquant's
per-tensor mixes (`--target-bpw` set to each llama.cpp file's bits per weight, GPTQ on the chosen grids) and
GPTQ onto llama.cpp's Q4_K_M mix.
Writes benchmarks/results/mix_quality.{json,md,svg} and the table in docs/quality.md (between its mix markers).

    LLAMA_CPP_DIR=/work/llama/src python benchmarks/bench_mix.py [--fixtures tiny-dense,tiny-moe,tiny-edge]
    python benchmarks/bench_mix.py --table-only     # rewrite the tables and the plot from mix_quality.json
    LLAMA_CPP_DIR=/work/llama/src python benchmarks/bench_mix.py --padding   # zero-padding rows only (below)

The mixes are solved as `--target-bpw` solves them (mix_search.solve_padded: zero-padding of the MLP widths that
are not multiples of 256 is a candidate, gemmaquant.padding); bits per weight are over the model's own weights
(a padded file holds zeros that are not the model's). `--padding` measures, at llama.cpp Q4_K_M's size only, the
mix solved without the padding candidate, with it (the solver's choice), and with padding forced (the best padded
subset), into benchmarks/results/mix_padding.{json,md} and docs/quality.md (between its padding markers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- mix-table:start -->", "<!-- mix-table:end -->"
PAD_START, PAD_END = "<!-- mix-padding:start -->", "<!-- mix-padding:end -->"
FIXTURES = ("tiny-dense", "tiny-moe", "tiny-edge")
LLAMA_TYPES = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_XS")
TARGETS = ("Q3_K_M", "Q4_K_M", "Q5_K_M")  # gemmaquant mixes at these files' sizes
N_CTX = 128  # llama-perplexity context; it scores the second half of each chunk


def _bins() -> tuple[Path, Path]:
    src = Path(os.environ.get("LLAMA_CPP_DIR", "/work/llama/src"))
    return src, src / "build" / "bin"


def _run(args: list, **kw) -> str:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if p.returncode:
        raise RuntimeError(f"{args[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stdout + p.stderr


def _texts(tmp: Path) -> tuple[Path, Path]:
    """The calibration text (for llama-imatrix, as gemmaquant calibrates on it) and the held-out text, without
    special-token strings (llama.cpp's tools tokenize with parse_special off)."""
    from gemmaquant.calibration import read_texts
    from gemmaquant.workflow import default_heldout

    def clean(docs):
        return "\n\n".join(d for d in docs if "<|" not in d and "|>" not in d)

    calib, held = tmp / "calib.txt", tmp / "heldout.txt"
    calib.write_text(clean(read_texts("default")), encoding="utf-8")
    held.write_text(clean(read_texts(default_heldout()))[:120000], encoding="utf-8")
    return calib, held


def _kld(bins: Path, model: Path, base: Path, held: Path, chunks: int) -> float:
    out = _run([bins / "llama-perplexity", "-m", model, "-f", held, "-c", N_CTX, "-b", N_CTX, "-t", 1,
                "--chunks", chunks, "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--kl-divergence-base", base,
                "--kl-divergence"])
    m = re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)", out)
    if not m:  # llama.cpp's asynchronous log can lose the summary at exit: the last chunk's running mean is it
        rows = re.findall(r"^\s*\d+\s+[0-9.]+\s+±\s+[0-9.]+\s+[-0-9.]+\s+±\s+[0-9.]+\s+([0-9.]+)\s+±", out, re.M)
        m = re.match(r"(.*)", rows[-1]) if rows else None
    if not m:
        raise RuntimeError(f"no mean KLD in llama-perplexity's output for {model}:\n{out[-1500:]}")
    return float(m.group(1))


def run_fixture(fx: str, args, tmp: Path) -> list[dict]:
    import torch

    from gemmaquant.export.inspect import file_bits
    from gemmaquant.fixtures import fixture_path
    from gemmaquant.mix_search import TargetError, solve, total, with_padding
    from gemmaquant.quantize import quantize
    from gemmaquant.recipe import Recipe
    from gemmaquant.sensitivity import measure
    from gemmaquant.target_mix import budget_bytes, families, file_type_for
    from gemmaquant.workflow import export_outputs

    torch.set_num_threads(1)
    src, bins = _bins()
    calib, held = _texts(tmp)
    f32 = tmp / f"{fx}-f32.gguf"
    _run([sys.executable, src / "convert_hf_to_gguf.py", fixture_path(fx), "--outfile", f32, "--outtype", "f32"],
         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    # llama-quantize reads the bf16 conversion (the fixtures' own dtype, lossless): the tensors it keeps as they are
    # (per_layer_model_proj) stay bf16, as in gemmaquant's files, not f32
    bf16 = tmp / f"{fx}-bf16.gguf"
    _run([sys.executable, src / "convert_hf_to_gguf.py", fixture_path(fx), "--outfile", bf16, "--outtype", "bf16"],
         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    base = tmp / "base.kld"
    _run([bins / "llama-perplexity", "-m", f32, "-f", held, "-c", N_CTX, "-b", N_CTX, "-t", 1, "--chunks",
          args.chunks, "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--kl-divergence-base", base])
    imatrix = tmp / "imatrix.gguf"
    _run([bins / "llama-imatrix", "-m", f32, "-f", calib, "-o", imatrix, "-c", args.seq_len, "--chunks",
          args.n_samples, "-t", 1, "-b", args.seq_len])
    rows = []

    weights = None  # the model's own weights (set once the sensitivity is measured): a padded file holds zeros too

    def add(row, path):
        fb = file_bits(path)
        row.update(fixture=fx, bits_per_weight=8 * fb["bytes"] / (weights or fb["weights"]), bytes=fb["bytes"],
                   kld=_kld(bins, path, base, held, args.chunks))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "families"}), flush=True)

    quantize_bin = bins / "llama-quantize"
    for t in ("Q4_K_M",) if args.padding else LLAMA_TYPES:
        for im in (False, True):
            out = tmp / f"llama-{t}{'-imatrix' if im else ''}.gguf"
            try:
                _run([quantize_bin, *(["--imatrix", imatrix] if im else []), bf16, out, t])
            except RuntimeError as e:
                print(f"{fx} {t}: llama-quantize refused ({str(e)[:200]})", flush=True)
                continue
            add({"source": "llama.cpp", "type": t, "imatrix": im}, out)
    recipe = Recipe(method="gptq", gguf_type="Q4_K_M", n_samples=args.n_samples, seq_len=args.seq_len)
    t0 = time.time()
    sens = measure(fx, recipe, progress=False)
    sens_s = time.time() - t0
    weights = sens.weights
    done: dict[tuple, dict] = {}  # (choice, padding) -> the row measured for it: an identical file is not redone

    def mix_row(t: str, label: str, ref: dict, subsets: list[tuple[str, ...]]) -> None:
        """The mix at `ref`'s size solved over the given subsets of the paddable kinds (mix_search.solve_padded over
        all of them is what --target-bpw does), quantized with GPTQ and measured."""
        budget = budget_bytes(sens, ref["bits_per_weight"], None)
        best = None
        for k in subsets:
            units = with_padding(sens.units, sens.padded, sens.pad_kind, k)
            try:
                choice = solve(units, budget, sens.fixed_bytes)
            except TargetError:  # a padded model whose cheapest mix is over the budget
                continue
            loss = total(units, choice)[1]
            if best is None or loss < best[0]:
                best = (loss, choice, k)
        if best is None:
            return
        predicted, choice, pad = best
        key = (tuple(sorted(choice.items())), pad)
        extra = {"pad_to_block": list(pad), "predicted_kl": predicted, "target_bpw": ref["bits_per_weight"]}
        if key in done:
            row = {**done[key], "type": f"mix at {t}'s size{label}", **extra, "same_file_as": done[key]["type"]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "families"}), flush=True)
            return
        from gemmaquant.padding import padded_config, padded_shape

        pcfg = padded_config(sens_cfg, pad)
        shapes = {u.name: padded_shape(u.name, u.shape, sens_cfg, pcfg) for u in sens.units}
        r = Recipe.from_dict({**recipe.to_dict(), "gguf_type": file_type_for(choice, shapes), "tensor_types": choice,
                              "pad_to_block": list(pad) or None})
        out = tmp / f"mix-{t}-{'-'.join(pad) or 'unpadded'}"
        t1 = time.time()
        res = quantize(fx, r, out=out, progress=False)
        files = export_outputs(res.work_dir, out, fx, r, ("gguf",))
        row = {"source": "gemmaquant", "type": f"mix at {t}'s size{label}", "imatrix": False, **extra,
               "families": families(choice, shapes), "sensitivity_seconds": round(sens_s, 1),
               "quantize_seconds": round(time.time() - t1, 1), "spearman_proxy_vs_kl": sens.spearman()}
        add(row, Path(files["gguf"]))
        done[key] = row

    from gemmaquant.mix_search import padding_subsets
    from gemmaquant.workflow import model_config

    sens_cfg = model_config(fx)
    subsets = padding_subsets(sens.pad_kind)
    for t in ("Q4_K_M",) if args.padding else TARGETS:
        ref = next((r for r in rows if r["type"] == t and r["source"] == "llama.cpp" and not r["imatrix"]), None)
        if ref is None:
            continue
        mix_row(t, "", ref, subsets)  # what --target-bpw does
        if args.padding:
            mix_row(t, ", no padding candidate", ref, [()])
            if len(subsets) > 1:
                mix_row(t, ", padded (forced)", ref, subsets[1:])
    if args.padding:
        return rows
    out = tmp / "gptq-Q4_K_M"
    res = quantize(fx, recipe, out=out, progress=False)
    files = export_outputs(res.work_dir, out, fx, recipe, ("gguf",))
    add({"source": "gemmaquant", "type": "GPTQ onto Q4_K_M's mix", "imatrix": False}, Path(files["gguf"]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=",".join(FIXTURES))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=100, help="llama-perplexity chunks of 128 held-out tokens")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--padding", action="store_true", help="only the zero-padding rows at Q4_K_M's size "
                    "(benchmarks/results/mix_padding.*)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved_file = RESULTS / ("mix_padding.json" if args.padding else "mix_quality.json")
    rows = []
    for fx in [] if args.table_only else args.fixtures.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows += run_fixture(fx, args, Path(tmp))
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {"rows": []}  # read last: runs of
    # other fixtures may have finished meanwhile
    ran = {r["fixture"] for r in rows}
    rows = [r for r in saved["rows"] if r["fixture"] not in ran] + rows
    rows.sort(key=lambda r: (FIXTURES.index(r["fixture"]) if r["fixture"] in FIXTURES else 99, r["bits_per_weight"]))
    data = {"settings": saved.get("settings") if args.table_only else
            {"n_samples": args.n_samples, "seq_len": args.seq_len, "chunks": args.chunks, "n_ctx": N_CTX},
            "rows": rows}
    saved_file.write_text(json.dumps(data, indent=1) + "\n")
    if args.padding:
        write_padding_outputs(data)
    else:
        write_outputs(data)


def write_padding_outputs(data: dict) -> None:
    """benchmarks/results/mix_padding.md and its section of docs/quality.md."""
    rows, s = data["rows"], data["settings"] or {}
    body = ["| fixture | file | padded | bits/weight | mean KLD | vs Q4_K_M + imatrix | predicted KL |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        q4 = next((x for x in rows if x["fixture"] == r["fixture"] and x["type"] == "Q4_K_M" and x["imatrix"]), None)
        name = (f"llama.cpp {r['type']}{' + imatrix' if r['imatrix'] else ''}" if r["source"] == "llama.cpp"
                else f"gemmaquant {r['type']}" + (f" (the same file as \"{r['same_file_as']}\")"
                                                  if r.get("same_file_as") else ""))
        pad = ", ".join(r.get("pad_to_block") or []) or ("" if r["source"] == "llama.cpp" else "no")
        pred = f"{r['predicted_kl']:.2e}" if r.get("predicted_kl") is not None else ""
        body.append(f"| {r['fixture']} | {name} | {pad} | {r['bits_per_weight']:.3f} | {r['kld']:.5f} | "
                    f"{r['kld'] / q4['kld']:.2f}x | {pred} |" if q4 else "")
    intro = (f"Regenerated by `python benchmarks/bench_mix.py --padding` (llama-perplexity --kl-divergence on "
             f"{s.get('chunks')} chunks of {s.get('n_ctx')} held-out tokens; gemmaquant: `--target-bpw` at llama.cpp "
             f"Q4_K_M's bits per weight, GPTQ; bits per weight over the model's own weights, the padded files' zeros "
             f"not counted). \"mix\": the solver's choice with zero-padding as a candidate (what `--target-bpw` "
             f"does); \"no padding candidate\": the solver without it; \"padded (forced)\": the best mix with the "
             f"MLP widths padded.\n\n")
    text = intro + "\n".join(b for b in body if b) + "\n"
    (RESULTS / "mix_padding.md").write_text(text)
    doc = ROOT / "docs" / "quality.md"
    d = doc.read_text()
    if PAD_START not in d:
        d += f"\n## Zero-padding odd MLP widths: measured\n\n{PAD_START}\n{PAD_END}\n"
    a, b = d.index(PAD_START) + len(PAD_START), d.index(PAD_END)
    doc.write_text(d[:a] + "\n" + text + d[b:])


def goal_lines(rows: list[dict]) -> list[str]:
    """The issue's goal: at no more than llama.cpp Q4_K_M's bpw, mean KLD <= 0.5x Q4_K_M + imatrix's."""
    lines = []
    for fx in dict.fromkeys(r["fixture"] for r in rows):
        fr = [r for r in rows if r["fixture"] == fx]
        q4 = next((r for r in fr if r["type"] == "Q4_K_M" and r["imatrix"]), None)
        plain = next((r for r in fr if r["type"] == "Q4_K_M" and not r["imatrix"] and r["source"] == "llama.cpp"), None)
        ours = [r for r in fr if r["source"] == "gemmaquant" and plain and
                r["bits_per_weight"] <= plain["bits_per_weight"] + 1e-9]
        if not q4 or not ours:
            continue
        best = min(ours, key=lambda r: r["kld"])
        ratio = best["kld"] / q4["kld"]
        lines.append(f"- {fx}: best gemmaquant file at <= {plain['bits_per_weight']:.3f} bpw ({best['type']}, "
                     f"{best['bits_per_weight']:.3f} bpw): mean KLD {best['kld']:.5f} = **{ratio:.2f}x** llama.cpp "
                     f"Q4_K_M + imatrix ({q4['kld']:.5f}); goal 0.5x {'met' if ratio <= 0.5 else 'NOT met'}")
        same = []
        for t in TARGETS:  # the stretch: the same ratio at each llama.cpp mix's own size
            ref = next((r for r in fr if r["type"] == t and r["imatrix"]), None)
            mix = next((r for r in fr if r["type"] == f"mix at {t}'s size"), None)
            if ref and mix:
                same.append(f"{t} {mix['kld'] / ref['kld']:.2f}x")
        if same:
            lines.append(f"  - mix against llama.cpp + imatrix at each mix's own size: {', '.join(same)}")
    return lines


def write_outputs(data: dict) -> None:
    rows, s = data["rows"], data["settings"] or {}
    head = ["| fixture | file | imatrix | bits/weight | mean KLD | vs Q4_K_M + imatrix |", "|---|---|---|---|---|---|"]
    body = []
    for r in rows:
        q4 = next((x for x in rows if x["fixture"] == r["fixture"] and x["type"] == "Q4_K_M" and x["imatrix"]), None)
        rel = f"{r['kld'] / q4['kld']:.2f}x" if q4 else ""
        name = f"llama.cpp {r['type']}" if r["source"] == "llama.cpp" else f"gemmaquant {r['type']}"
        body.append(f"| {r['fixture']} | {name} | {'yes' if r['imatrix'] else ''} | {r['bits_per_weight']:.3f} | "
                    f"{r['kld']:.5f} | {rel} |")
    intro = (f"Regenerated by `python benchmarks/bench_mix.py` (llama-perplexity --kl-divergence on {s.get('chunks')} "
             f"chunks of {s.get('n_ctx')} held-out tokens, F32 KV cache, flash attention off; the imatrix from "
             f"llama-imatrix on the bundled calibration text, {s.get('n_samples')} chunks of {s.get('seq_len')} "
             f"tokens; gemmaquant calibrates on the same set; llama-quantize reads the bf16 conversion, the reference "
             f"logits come from the f32 one). gemmaquant's mixes: `--target-bpw` set to the "
             f"llama.cpp file's bits per weight (no imatrix), GPTQ on the chosen grids. Plot: "
             f"benchmarks/results/mix_quality.svg.\n\n")
    table = "\n".join(head + body) + "\n\n" + "\n".join(goal_lines(rows)) + "\n"
    (RESULTS / "mix_quality.md").write_text(intro + table)
    (RESULTS / "mix_quality.svg").write_text(_svg(rows))
    doc = ROOT / "docs" / "quality.md"
    text = doc.read_text()
    if START not in text:
        text += f"\n## Quality per size: per-tensor mixes against llama.cpp's\n\n{START}\n{END}\n"
    a, b = text.index(START) + len(START), text.index(END)
    doc.write_text(text[:a] + "\n" + intro + table + text[b:])


def _svg(rows: list[dict]) -> str:
    """bits per weight against mean KLD (log), one panel per fixture, as plain SVG (no plotting dependency)."""
    import math

    fixtures = list(dict.fromkeys(r["fixture"] for r in rows))
    W, H, pad, right = 380, 260, 45, 95
    colors = {"llama.cpp": "#888", "llama.cpp + imatrix": "#1f77b4", "gemmaquant mix": "#d62728",
              "gemmaquant GPTQ onto Q4_K_M's mix": "#ff7f0e"}

    def kind(r):
        if r["source"] == "llama.cpp":
            return "llama.cpp + imatrix" if r["imatrix"] else "llama.cpp"
        return "gemmaquant mix" if r["type"].startswith("mix") else "gemmaquant GPTQ onto Q4_K_M's mix"

    def label(r):
        return r["type"].split(" ")[0] if r["source"] == "llama.cpp" else (
            "mix@" + r["type"].split(" ")[2].split("'")[0] if r["type"].startswith("mix") else "GPTQ Q4_K_M")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(fixtures)}" height="{H + 50}" '
           f'font-family="sans-serif" font-size="10">']
    for k, fx in enumerate(fixtures):
        fr = [r for r in rows if r["fixture"] == fx]
        x0 = k * W
        bx = [r["bits_per_weight"] for r in fr]
        ly = [math.log10(max(r["kld"], 1e-8)) for r in fr]
        xlo, xhi = min(bx) - 0.15, max(bx) + 0.15
        ylo, yhi = min(ly) - 0.15, max(ly) + 0.15

        def px(b):
            return x0 + pad + (b - xlo) / (xhi - xlo) * (W - pad - right)

        def py(v):
            return 10 + (yhi - v) / (yhi - ylo) * (H - pad)

        out.append(f'<rect x="{x0 + pad}" y="10" width="{W - pad - right}" height="{H - pad}" fill="none" '
                   f'stroke="#000"/>')
        out.append(f'<text x="{x0 + pad + (W - pad - right) / 2}" y="{H + 5}" text-anchor="middle">{fx}: bits per '
                   f'weight</text>')
        for e in range(math.floor(ylo), math.ceil(yhi) + 1):
            for m in (1, 2, 5):
                v = e + math.log10(m)
                if ylo <= v <= yhi:
                    out.append(f'<text x="{x0 + pad - 4}" y="{py(v) + 3:.1f}" text-anchor="end">{m}e{e}</text>')
                    out.append(f'<line x1="{x0 + pad}" x2="{x0 + W - right}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                               f'stroke="#ddd"/>')
        b = math.ceil(xlo * 4) / 4
        while b <= xhi:
            out.append(f'<text x="{px(b):.1f}" y="{H - pad + 24}" text-anchor="middle">{b:g}</text>')
            b += 0.25
        for r, b, v in zip(fr, bx, ly):
            c = colors[kind(r)]
            out.append(f'<circle cx="{px(b):.1f}" cy="{py(v):.1f}" r="3.5" fill="{c}"/>')
            out.append(f'<text x="{px(b) + 5:.1f}" y="{py(v) + 3:.1f}" fill="{c}" font-size="8">{label(r)}</text>')
    for i, (name, c) in enumerate(colors.items()):
        out.append(f'<text x="{pad + 190 * (i % 2)}" y="{H + 22 + 14 * (i // 2)}" fill="{c}">&#9679; {name}</text>')
    out.append(f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">mean KLD '
               f'(llama-perplexity)</text></svg>')
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
