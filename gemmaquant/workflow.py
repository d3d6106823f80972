"""What the CLI commands do, as library functions: resolve the recipe, quantize, export, evaluate, report.

Each `run_*` returns a dict (the `--json` output) whose "text" entry is the human-readable summary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from gemmaquant.config import HF_REPOS, VARIANTS, Gemma4Config, get_variant
from gemmaquant.recipe import Recipe, RecipeError, default_recipe


class UsageError(ValueError):
    """Conflicting or invalid options: the user's to fix."""


FORMATS = ("gguf", "safetensors")
LOSSLESS_GGUF = {"int4_g32_sym": "Q4_0", "int8": "Q8_0"}  # our grid -> the GGUF type that holds it exactly


# ---- recipe and config resolution ---------------------------------------------------------------------------
def resolve_recipe(model: str, bits: int, method: str, formats: tuple[str, ...], gguf_type: str | None,
                   group_size: int | None, recipe_file: Path | None) -> Recipe:
    if recipe_file is not None:
        recipe = Recipe.from_file(recipe_file)
    else:
        if bits not in (4, 8):
            raise UsageError(f"--bits {bits}: choose 4 or 8 (other widths: write a recipe file)")
        recipe = default_recipe(Path(model).name if Path(model).exists() else model, bits, method)
        if recipe.method != method:
            recipe = Recipe.from_dict({**recipe.to_dict(), "method": method})
    changes = {}
    if group_size is not None:
        if bits != 4:
            raise UsageError("--group-size applies to 4-bit quantization only")
        if group_size not in (32, 64, 128):
            raise UsageError(f"--group-size {group_size}: choose 32, 64 or 128")
        if group_size != 32 and "gguf" in formats:
            raise UsageError(f"--group-size {group_size} has no lossless GGUF block type (Q4_0 blocks are 32); "
                             f"use --format safetensors or --group-size 32")
        changes["weight_format"] = f"int4_g{group_size}_sym"
    if gguf_type is not None:
        if "safetensors" in formats:
            raise UsageError(f"--gguf-type {gguf_type} quantizes onto llama.cpp's block grids, which "
                             f"compressed-tensors cannot hold exactly; add --format gguf")
        if bits == 8 and not gguf_type.upper().startswith("Q8"):
            raise UsageError(f"--bits 8 conflicts with --gguf-type {gguf_type}")
        changes["gguf_type"] = gguf_type.upper()
    if changes:
        recipe = Recipe.from_dict({**recipe.to_dict(), **changes})
    if "gguf" in formats and recipe.gguf_type is None and recipe.weight_format not in LOSSLESS_GGUF:
        raise UsageError(f"weight format {recipe.weight_format} has no lossless GGUF type; "
                         f"use --format safetensors or a GGUF type")
    return recipe


def model_config(model: str | os.PathLike) -> Gemma4Config:
    """The config alone (no weights needed): a real alias, a fixture, or a directory's config.json."""
    if str(model) in VARIANTS:
        return VARIANTS[str(model)]
    from gemmaquant.hub import resolve

    path = resolve(model)
    raw = json.loads((path / "config.json").read_text())
    return Gemma4Config.from_hf_dict(raw, str(path / "config.json"))


def parse_formats(formats: str | tuple) -> tuple[str, ...]:
    fs = tuple(f.strip() for f in formats.split(",")) if isinstance(formats, str) else tuple(formats)
    bad = [f for f in fs if f not in FORMATS]
    if bad or not fs:
        raise UsageError(f"--format {','.join(fs)}: choose from {', '.join(FORMATS)}")
    return fs


def scheme_name(recipe: Recipe) -> str:
    return recipe.gguf_type or LOSSLESS_GGUF.get(recipe.weight_format, recipe.weight_format)


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless --overwrite, except one holding only an unfinished run
    (which the same command resumes)."""
    from gemmaquant.quantize import WORK_DIR

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir():
        entries = [p.name for p in out.iterdir()]
        if entries and set(entries) != {WORK_DIR}:
            if not overwrite:
                raise UsageError(f"{out}: not empty; pass --overwrite to replace it")
            shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gemmaquant-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{out}: not writable ({e.strerror})") from None


# ---- quantize -----------------------------------------------------------------------------------------------
def run_quantize(model: str, *, bits: int = 4, method: str = "gptq", formats="gguf,safetensors",
                 gguf_type: str | None = None, group_size: int | None = None, recipe_file: Path | None = None,
                 calib: Path | None = None, out: Path | None = None, dry_run: bool = False,
                 overwrite: bool = False, evaluate: bool = True, progress: bool | None = None,
                 device: str = "auto") -> dict:
    from gemmaquant.device import device_name, resolve_device
    from gemmaquant.plan import make_plan, plan_summary

    fmts = parse_formats(formats)
    dev = resolve_device(device)  # a device that is not there fails here, before any work
    recipe = resolve_recipe(model, bits, method, fmts, gguf_type, group_size, recipe_file)
    cfg = model_config(model)
    plan = make_plan(cfg, recipe)
    if dry_run:
        from gemmaquant.estimate import estimate

        est = estimate(cfg, plan, recipe, fmts, device=dev)
        return {"dry_run": True, "model": str(model), "recipe": recipe.to_dict(), **est, "text": est["text"]}
    name = Path(str(model)).name
    out = Path(out) if out is not None else Path(f"{name}-{scheme_name(recipe).lower()}")
    prepare_out(out, overwrite)
    from gemmaquant.quantize import quantize

    t0 = time.time()
    if progress is not False:
        print(f"quantizing on {device_name(dev)}", flush=True)
    result = quantize(model, recipe, out=out, calib=calib, progress=progress, device=dev)
    files = export_outputs(result.work_dir, out, name, recipe, fmts)
    summary = {"model": str(model), "out": str(out), "recipe": recipe.to_dict(), "files": files,
               "calibration_sha256": result.calibration_sha256, "quantize_seconds": round(result.seconds, 2),
               "device": device_name(dev),
               "plan": plan_summary(plan)}
    if evaluate:
        from gemmaquant.evaluate_run import evaluate_and_report

        summary["report"] = evaluate_and_report(model, result, recipe, files, out, progress=progress)
    shutil.rmtree(result.work_dir, ignore_errors=True)  # only needed to resume an interrupted run
    summary["total_seconds"] = round(time.time() - t0, 2)
    summary["text"] = _quantize_text(summary)
    return summary


def export_outputs(work: Path, out: Path, name: str, recipe: Recipe, fmts: tuple[str, ...]) -> dict[str, str]:
    from gemmaquant.quantized import QuantizedSource

    files = {}
    if "gguf" in fmts:
        from gemmaquant.export import export_gguf

        gguf_type = scheme_name(recipe)
        path = out / f"{name}-{gguf_type}.gguf"
        export_gguf(QuantizedSource(work), path, type=gguf_type, overwrite=True)
        files["gguf"] = str(path)
    if "safetensors" in fmts:
        from gemmaquant.export import export_compressed_tensors

        scheme = "W8A16" if recipe.weight_format == "int8" else "W4A16"
        path = out / "safetensors"
        group = int(recipe.weight_format.split("_g")[1].split("_")[0]) if "_g" in recipe.weight_format else None
        export_compressed_tensors(QuantizedSource(work), path, scheme=scheme,
                                  group_size=group or 32, overwrite=True)
        files["safetensors"] = str(path)
    return files


def _quantize_text(s: dict) -> str:
    lines = [f"quantized {s['model']} with {s['recipe']['method']} onto "
             f"{s['recipe']['gguf_type'] or s['recipe']['weight_format']} "
             f"in {s['quantize_seconds']:.1f} s on {s.get('device', 'cpu')}"]
    for kind, path in s["files"].items():
        size = _size(Path(path))
        lines.append(f"  {kind:12s} {path}  ({size / 2**20:.2f} MiB)")
    rep = s.get("report")
    if rep:
        m = rep["metrics"]
        lines.append(f"  KL divergence to the float model: mean {m['kl_mean']:.4f}, p99 {m['kl_p99']:.4f}, "
                     f"max {m['kl_max']:.4f}; top-1 agreement {100 * m['top1']:.1f}%; "
                     f"perplexity {m['ppl_test']:.2f} (float {m['ppl_ref']:.2f})")
        lines.append(f"  report: {rep['files']['md']}  {rep['files']['html']}")
    return "\n".join(lines)


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---- other commands -----------------------------------------------------------------------------------------
def run_eval(model: str, quantized: Path, *, heldout: Path | None = None, n_seq: int = 16, seq_len: int = 128,
             device: str = "cpu") -> dict:
    import gemmaquant
    from gemmaquant.device import device_name, resolve_device
    from gemmaquant.eval.metrics import compare_logits, heldout_ids
    from gemmaquant.eval.routing import routing_text
    from gemmaquant.hub import resolve
    from gemmaquant.runtime import load_for_inference

    dev = resolve_device(device)
    ref = gemmaquant.load(model).to(dev)
    test = load_for_inference(quantized, device=dev)  # a quantizer output runs packed, through gemmaquant.ops
    ids = heldout_ids(resolve(model), heldout or default_heldout(), n_seq, seq_len)
    m = compare_logits(ref, test, ids, routing=True)
    text = (f"KL divergence mean {m['kl_mean']:.5f}, p99 {m['kl_p99']:.5f}, max {m['kl_max']:.5f}; "
            f"top-1 agreement {100 * m['top1']:.2f}%; perplexity {m['ppl_test']:.3f} (float {m['ppl_ref']:.3f}) "
            f"on {n_seq}x{seq_len} held-out tokens")
    if "routing" in m:
        text += "\n" + routing_text(m)
    return {**m, "device": device_name(dev), "text": text}


def default_heldout() -> Path:
    from importlib import resources

    return Path(str(resources.files("gemmaquant.calibration") / "data" / "heldout.txt"))


def run_bench(model: str, *, prompt_len: int = 128, new_tokens: int = 32, device: str = "auto") -> dict:
    from gemmaquant.device import resolve_device
    from gemmaquant.eval.latency import measure_latency
    from gemmaquant.runtime import load_for_inference

    m = load_for_inference(model, device=resolve_device(device))
    res = measure_latency(m, prompt_len=prompt_len, new_tokens=new_tokens)
    res["text"] = (f"{model}: prefill {res['prefill_tokens_per_s']:.1f} tok/s, decode {res['decode_tokens_per_s']:.1f} "
                   f"tok/s on {res['device']} ({res.get('threads', '?')} threads)")
    return res


def list_variants() -> dict:
    from gemmaquant.config import TINY_VARIANTS
    from gemmaquant.hub import fixture_names
    from gemmaquant.model.gemma4 import param_counts

    rows = []
    for name, cfg in {**VARIANTS, **TINY_VARIANTS}.items():
        c = param_counts(cfg)
        rows.append({"name": name, "hf_repo": HF_REPOS.get(name), "layers": cfg.num_hidden_layers,
                     "hidden": cfg.hidden_size, "moe": cfg.enable_moe_block, "ple": cfg.has_ple,
                     "params_total": c["total"], "params_active": c["active"]})
    text = "\n".join(f"{r['name']:14s} {r['params_total'] / 1e9:8.3f}B total {r['params_active'] / 1e9:8.3f}B active  "
                     f"{r['layers']:3d} layers  hidden {r['hidden']:5d}  {r['hf_repo'] or ''}" for r in rows)
    fixtures = fixture_names()
    text += "\nbundled trained fixtures: " + ", ".join(fixtures)
    return {"variants": rows, "fixtures": fixtures, "text": text}


def run_qat(model: str, *, bits: int | None, data: Path, steps: int, out: Path, overwrite: bool = False,
            device: str = "auto", **recipe_overrides) -> dict:
    try:
        from gemmaquant.qat import qat_train
    except ImportError:
        raise UsageError("quantization-aware training is not available in this version of gemmaquant") from None

    overrides = {k: v for k, v in recipe_overrides.items() if v is not None}
    for flag, key in (("--gguf-type", "gguf_type"), ("--format", "weight_format")):
        grid = overrides.get(key)
        nominal = re.search(r"\d", grid or "")
        if bits is not None and nominal and int(nominal.group()) != bits:  # Q4_K_M, q5_0, int3_g32_sym: 4, 5, 3
            raise UsageError(f"--bits {bits} conflicts with {flag} {grid}, a {nominal.group()}-bit grid")
    from gemmaquant.device import resolve_device

    dev = torch.device("cpu") if device == "auto" else resolve_device(device)  # (a missing GPU: exit 2)
    if dev.type != "cpu":  # qat_train follows its model's device; the CLI's model is loaded on the CPU
        raise UsageError(f"--device {device}: QAT runs on the CPU in this version (qat_train follows the device of "
                         f"a model object it is given); use --device cpu")
    prepare_out(Path(out), overwrite)
    bits = 4 if bits is None else bits
    res = qat_train(model, bits=bits, data=data, steps=steps, out=out, **overrides)
    res = dict(res) if isinstance(res, dict) else {"result": str(res)}
    res.setdefault("text", f"QAT finished: {out}")
    return res
