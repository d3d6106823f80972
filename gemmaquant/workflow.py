"""What the CLI commands do, as library functions: resolve the recipe, quantize, export, evaluate, report.

Each `run_*` returns a dict (the `--json` output) whose "text" entry is the human-readable summary.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from gemmaquant.config import HF_REPOS, VARIANTS, Gemma4Config
from gemmaquant.errors import UsageError
from gemmaquant.progress import stage
from gemmaquant.recipe import Recipe, default_recipe
from gemmaquant.validate import check_count


FORMATS = ("gguf", "safetensors")
# our grid -> the GGUF type that holds it exactly (int4_g32_lattice: a QAT checkpoint's lattice, qat_checkpoint.py)
LOSSLESS_GGUF = {"int4_g32_sym": "Q4_0", "int8": "Q8_0", "int4_g32_lattice": "Q4_0"}


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

    from gemmaquant.checkpoint import CheckpointError, read_config_json
    from gemmaquant.config import ConfigError

    path = resolve(model)
    try:
        return Gemma4Config.from_hf_dict(read_config_json(path), str(path / "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def parse_formats(formats: str | tuple) -> tuple[str, ...]:
    fs = tuple(f.strip() for f in formats.split(",")) if isinstance(formats, str) else tuple(formats)
    bad = [f for f in fs if f not in FORMATS]
    if bad or not fs:
        raise UsageError(f"--format {','.join(fs)}: choose from {', '.join(FORMATS)}")
    return fs


def scheme_name(recipe: Recipe) -> str:
    if recipe.tensor_types or recipe.ct_schemes:  # a per-tensor mix (--target-bpw, --gguf-mix, --ct-mix)
        return "mix"
    name = recipe.gguf_type or LOSSLESS_GGUF.get(recipe.weight_format, recipe.weight_format)
    return f"{name}-padded" if recipe.pad_to_block else name  # --pad-to-block: not llama.cpp's file of that name


def prepare_out(out: Path, overwrite: bool, planned: tuple[str, ...] = ()) -> None:
    """Refuse a non-empty output directory unless --overwrite (which empties it: the run starts over), except one
    holding only this command's own work: a run's work directory, the outputs `planned` (names in out) or recorded
    by its steps, and the temporary files of an interrupted step (removed here). The same command resumes it."""
    from gemmaquant.lock import LOCK_NAME
    from gemmaquant.quantize import WORK_DIR
    from gemmaquant.resume import Steps, is_leftover, remove

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()} - {LOCK_NAME}  # the lock is the caller's, held while this runs
        ours = {WORK_DIR} | set(planned) | Steps(out).roots() if WORK_DIR in entries else set()
        leftovers = {e for e in entries if is_leftover(e, ours)}
        foreign = entries - ours - leftovers
        if foreign and not overwrite:
            raise UsageError(f"{out}: not empty ({sorted(foreign)[0]} is not this command's output); "
                             f"pass --overwrite to replace it")
        for e in sorted(entries if overwrite else leftovers):
            remove(out / e)
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
                 device: str = "auto", activation_budget_gib: float | None = None,
                 target_bpw: float | None = None, target_size: float | None = None,
                 gguf_mix: Path | None = None, from_qat: bool | None = None, pad_to_block: str | None = None,
                 ct_mix: Path | None = None, per_layer_experts: bool = False) -> dict:
    """from_qat: read a QAT checkpoint's int4 lattice back (gemmaquant.qat_checkpoint): None detects it, True
    forces it, False never. A compressed-tensors W4A16 checkpoint is repacked to Q4_0 GGUF (no rounding).
    pad_to_block: "all" or a comma-separated list of MLP kinds ("mlp", "experts") to zero-pad to the 256-block
    (gemmaquant.padding) with a fixed mix; --target-bpw decides it itself, a mix file says it."""
    from gemmaquant.device import device_name, resolve_device
    from gemmaquant.plan import make_plan, plan_summary

    fmts = parse_formats(formats)
    dev = resolve_device(device)  # a device that is not there fails here, before any work
    if activation_budget_gib is not None and not activation_budget_gib >= 0:
        raise UsageError(f"--activation-budget {activation_budget_gib}: GiB of device memory, 0 or more")
    budget = None if activation_budget_gib is None else int(activation_budget_gib * 2**30)
    if _is_compressed_tensors(model):
        from gemmaquant.qat_checkpoint import run_repack

        return run_repack(model, out=out, overwrite=overwrite, dry_run=dry_run, progress=progress)
    recipe = resolve_recipe(model, bits, method, fmts, gguf_type, group_size, recipe_file)
    cfg = model_config(model)
    name = Path(str(model)).name
    mix = None
    if per_layer_experts and ("gguf" in fmts or (target_bpw, target_size, ct_mix) == (None, None, None)):
        raise UsageError("--per-layer-experts applies to a compressed-tensors mix (--format safetensors with "
                         "--target-bpw, --target-size or --ct-mix)")
    if pad_to_block is not None:
        recipe = _with_padding(recipe, cfg, fmts, pad_to_block, target_bpw, target_size, gguf_mix)
    if target_bpw is not None or target_size is not None or gguf_mix is not None or ct_mix is not None:
        recipe, mix = resolve_mix(model, cfg, recipe, fmts, gguf_type, target_bpw, target_size, gguf_mix, calib,
                                  out if out is not None else Path(f"{name}-mix"), progress, ct_mix,
                                  per_layer_experts)
        lattice = None
    else:
        recipe, lattice = _qat_choice(model, recipe, from_qat)
    from gemmaquant.padding import comparison_text, padded_config, size_comparison

    plan = make_plan(padded_config(cfg, recipe.pad_to_block), recipe)  # the shapes the files hold
    if dry_run:
        from gemmaquant.estimate import estimate

        est = estimate(cfg, plan, recipe, fmts, device=dev)
        res = {"dry_run": True, "model": str(model), "recipe": recipe.to_dict(), **est,
               **({"mix": mix} if mix else {}), "text": est["text"] + (f"\n{mix_summary(mix)}" if mix else "")}
        padding = size_comparison(cfg, recipe) if "gguf" in fmts else None
        if padding:
            res["padding"] = padding
            res["text"] += "\n" + "\n".join(comparison_text(padding, recipe.pad_to_block))
        if lattice is not None and lattice.get("detected"):
            from gemmaquant.qat_checkpoint import scan_lattice, scan_text

            stage("reading the weights' lattice, layer by layer", progress)
            rows = scan_lattice(lattice.pop("source"), make_plan(cfg, lattice_grid(recipe)), progress)
            lattice["scan"] = rows
            res["text"] += "\n" + lattice_line(lattice) + "\n" + scan_text(rows)
        elif lattice is not None:
            lattice.pop("source", None)
            res["text"] += "\n" + lattice_line(lattice)
        if lattice is not None:
            res["lattice"] = {k: v for k, v in lattice.items() if k != "source"}
        return res
    out = Path(out) if out is not None else Path(f"{name}-{scheme_name(recipe).lower()}")
    from gemmaquant.evaluate_run import REPORT_FILES
    from gemmaquant.lock import hold
    from gemmaquant.outputs import removed_if_left_empty
    from gemmaquant.quantize import quantize
    from gemmaquant.resume import Steps, prune_layers

    exports = export_steps(name, recipe, fmts)
    with removed_if_left_empty(out), hold(out):  # one run per output directory; a failure before any write
        mix_file = f"{name}-mix.json"
        prepare_out(out, overwrite, tuple(e[1] for e in exports.values()) + (REPORT_FILES if evaluate else ())
                    + ((mix_file,) if mix else ()))
        if mix:
            from gemmaquant.target_mix import write_mix

            write_mix(mix, out / mix_file)
        t0 = time.time()
        steps = Steps(out)
        done = all(steps.complete(step, key) for step, (key, _, _) in exports.items())
        stage(f"{out} already holds this run's exports: checking that recipe, calibration and weights are the same"
              if done else f"quantizing on {device_name(dev)}", progress)
        # a resumed run re-checks the recipe, calibration and source weights even when only the report is left
        result = quantize(model, recipe, out=out, calib=calib, progress=progress, layers_needed=not done,
                          device=dev, activation_budget=budget, from_qat=from_qat if mix is None else False)
        if not done:
            stage(f"exporting {' and '.join(fmts)} into {out}", progress)
        files = export_outputs(result.work_dir, out, name, recipe, fmts, steps=steps, device=dev)
        summary = {"model": str(model), "out": str(out), "recipe": recipe.to_dict(), "files": files,
                   "calibration_sha256": result.calibration_sha256, "quantize_seconds": round(result.seconds, 2),
                   "device": device_name(dev), "plan": plan_summary(plan), "finished_earlier": done}
        if mix:
            summary["mix"] = {k: v for k, v in mix.items() if k != "sensitivity"}
            summary["mix_file"] = str(out / mix_file)
        if result.lattice is not None:
            summary["lattice"] = result.lattice
        if evaluate:
            from gemmaquant.evaluate_run import evaluate_and_report

            summary["report"] = evaluate_and_report(model, result, recipe, files, out, progress=progress,
                                                    steps=steps)
        prune_layers(result.work_dir)  # the records stay: a rerun of this command finds its finished outputs
    summary["total_seconds"] = round(time.time() - t0, 2)
    flag = "--ct-mix" if recipe.ct_schemes else "--gguf-mix"
    summary["text"] = _quantize_text(summary) + (f"\n{mix_summary(mix)}\n  mix file ({flag}): "
                                                 f"{summary['mix_file']}" if mix else "")
    return summary


def _with_padding(recipe: Recipe, cfg, fmts, pad_to_block: str, target_bpw, target_size, gguf_mix) -> Recipe:
    """The recipe with `--pad-to-block` ("all": every kind whose width is not a multiple of 256)."""
    from gemmaquant.padding import PaddingError, check_kinds, paddable

    if target_bpw is not None or target_size is not None or gguf_mix is not None:
        raise UsageError("--pad-to-block is for the fixed mixes: --target-bpw / --target-size weigh padding "
                         "themselves, and a --gguf-mix file says whether it pads")
    if "safetensors" in fmts:
        raise UsageError("--pad-to-block pads for the GGUF block types; add --format gguf")
    kinds = [k.strip() for k in pad_to_block.split(",") if k.strip()]
    try:
        kinds = paddable(cfg) if kinds == ["all"] else check_kinds(kinds, cfg, "--pad-to-block")
    except PaddingError as e:
        raise UsageError(str(e)) from None
    return Recipe.from_dict({**recipe.to_dict(), "pad_to_block": kinds or None})


def resolve_mix(model, cfg, recipe: Recipe, fmts, gguf_type, target_bpw, target_size, gguf_mix, calib, out,
                progress, ct_mix=None, per_layer_experts: bool = False) -> tuple[Recipe, dict]:
    """--target-bpw / --target-size (a mix measured and solved) or --gguf-mix FILE (a mix read back): the recipe
    with the per-tensor types (`tensor_types`), and the mix record. A finished or interrupted run's mix file in
    `out` for the same request is reused (the measurement is deterministic; this saves it)."""
    import json

    from gemmaquant.target_mix import choose_mix, read_mix_record

    given = [f for f, v in (("--target-bpw", target_bpw), ("--target-size", target_size), ("--gguf-mix", gguf_mix),
                            ("--ct-mix", ct_mix)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"{given[0]} and {given[1]} exclude each other")
    if "gguf" in fmts and "safetensors" in fmts and gguf_mix is None and ct_mix is None:
        raise UsageError(f"{given[0]} chooses per tensor for one format: add --format gguf (a GGUF type per tensor) "
                         f"or --format safetensors (a compressed-tensors scheme per layer); compressed-tensors "
                         f"cannot hold GGUF's types, nor GGUF int4 groups of 128")
    if ct_mix is not None or "gguf" not in fmts:  # a per-layer mix for vLLM (gemmaquant.ct_mix)
        from gemmaquant.ct_mix import resolve_ct_mix

        return resolve_ct_mix(model, cfg, recipe, fmts, gguf_type, target_bpw, target_size, ct_mix, calib, out,
                              progress, given[0], per_layer_experts)
    if "safetensors" in fmts:
        raise UsageError(f"{given[0]} chooses GGUF types per tensor, which compressed-tensors cannot hold; add "
                         f"--format gguf")
    if recipe.method == "awq":
        raise UsageError(f"{given[0]}: AWQ folds scales across tensors of one mix; use --method gptq, imatrix or rtn")
    for flag, v in (("--target-bpw", target_bpw), ("--target-size", target_size)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0 and v == v and v != float("inf")):
            raise UsageError(f"{flag} {v}: must be a positive number")
    if gguf_mix is not None:
        types, pad = read_mix_record(gguf_mix, cfg)
        from gemmaquant.checkpoint import expected_shapes
        from gemmaquant.padding import padded_config, padding_lines
        from gemmaquant.target_mix import families

        shapes = expected_shapes(padded_config(cfg, pad))
        # tensors the file does not name keep the type the recipe alone gives them (--gguf-type, or its grid's)
        mix = {"source": str(gguf_mix), "tensor_types": types, "families": families(types, shapes),
               "file_type": recipe.gguf_type or LOSSLESS_GGUF[recipe.weight_format], "pad_to_block": list(pad),
               "padding": padding_lines(cfg, pad) if pad else []}
    else:
        request = {"target_bpw": target_bpw, "target_size_gib": target_size, "calibration": str(calib or
                   recipe.calibration), "method": recipe.method}
        saved = Path(out) / f"{Path(str(model)).name}-mix.json"
        mix = json.loads(saved.read_text()) if saved.is_file() else None
        if mix is None or mix.get("request") != request:
            base = Recipe.from_dict({**recipe.to_dict(), "gguf_type": recipe.gguf_type or "Q8_0"})
            mix = {"request": request, **choose_mix(model, base, target_bpw=target_bpw, target_size_gib=target_size,
                                                    calib=calib, progress=progress)}
        if gguf_type:
            mix["file_type"] = gguf_type.upper()
    return Recipe.from_dict({**recipe.to_dict(), "gguf_type": mix["file_type"], "tensor_types": mix["tensor_types"],
                             "pad_to_block": mix.get("pad_to_block") or None}), mix


def mix_summary(mix: dict) -> str:
    from gemmaquant.target_mix import mix_text

    if "bits_per_weight" in mix:
        return mix_text(mix)
    return "\n".join([f"mix from {mix['source']}:"] + [f"  zero-padded {p}" for p in mix.get("padding", [])]
                     + [f"  {fam:<32} " + ", ".join(types) for fam, types in mix["families"].items()])


def _is_compressed_tensors(model) -> bool:
    from gemmaquant.export.compressed_tensors_reader import is_compressed_tensors

    return Path(str(model)).is_dir() and is_compressed_tensors(Path(str(model)))


def lattice_grid(recipe: Recipe) -> Recipe:
    from gemmaquant.qat_checkpoint import lattice_recipe

    return lattice_recipe(recipe)


def _qat_choice(model, recipe: Recipe, from_qat: bool | None) -> tuple[Recipe, dict | None]:
    """The recipe after QAT detection (gemmaquant.qat_checkpoint.choose_lattice) and its record, which keeps the
    opened checkpoint under "source" for the dry run's scan; (recipe, None) when the weights are not here (an
    alias not downloaded: the dry run still plans) or from_qat is False."""
    from gemmaquant.checkpoint import Checkpoint
    from gemmaquant.hub import ModelNotFound, resolve
    from gemmaquant.qat_checkpoint import choose_lattice

    if from_qat is False:
        return recipe, None
    try:
        src = Checkpoint(resolve(model))
    except ModelNotFound:
        if from_qat:
            raise
        return recipe, {"detected": None, "note": "weights not present: the lattice was not looked for"}
    recipe, record = choose_lattice(src, recipe, from_qat)
    return recipe, None if record is None else {**record, "source": src}


def lattice_line(record: dict) -> str:
    if record.get("detected") is None:
        return f"QAT lattice: {record.get('note', 'not looked for')}"
    how = "forced (--from-qat)" if record["forced"] else ("detected" if record["detected"] else "not detected")
    return (f"QAT lattice: {how}: {100 * record['sampled_share']:.1f}% of layer 0's sampled groups of 32 are on an "
            f"int4 lattice" + ("; the weights keep its steps and codes (int4_g32_lattice)" if record["detected"]
                               else "; quantizing as a float checkpoint"))


def export_steps(name: str, recipe: Recipe, fmts: tuple[str, ...]) -> dict[str, tuple[dict, str, dict]]:
    """format -> (step key, output name in out, exporter arguments): the GGUF first, as `FORMATS` lists them."""
    steps = {}
    for fmt in (f for f in FORMATS if f in fmts):
        if fmt == "gguf":
            args = {"type": recipe.gguf_type or LOSSLESS_GGUF.get(recipe.weight_format, recipe.weight_format),
                    "token_embd_type": recipe.embedding_gguf_type}
            rel = f"{name}-{scheme_name(recipe)}.gguf"  # a per-tensor mix: named for it, not its general.file_type
            if recipe.tensor_types:
                args["tensor_types"] = recipe.tensor_types
        else:
            group = int(recipe.weight_format.split("_g")[1].split("_")[0]) if "_g" in recipe.weight_format else None
            args = {"scheme": "W8A16" if recipe.weight_format == "int8" else "W4A16", "group_size": group or 32}
            if recipe.ct_schemes:  # a per-layer mix (gemmaquant.ct_mix)
                args["schemes"] = recipe.ct_schemes
            rel = "safetensors"
        steps[fmt] = ({"output": rel, **args}, rel, args)
    return steps


def export_outputs(work: Path, out: Path, name: str, recipe: Recipe, fmts: tuple[str, ...],
                   steps=None, device: torch.device | None = None) -> dict[str, str]:
    """Write each format's file into out; with `steps` (gemmaquant.resume.Steps), a format whose recorded output
    is complete and unchanged is skipped, and each one written is recorded. device: where the GGUF exporter
    RTN-quantizes the values the work directory holds in float (the same bytes on every device)."""
    from gemmaquant.export import export_compressed_tensors, export_gguf
    from gemmaquant.quantized import QuantizedSource

    files = {}
    for fmt, (key, rel, args) in export_steps(name, recipe, fmts).items():
        files[fmt] = str(out / rel)
        if steps is not None and steps.complete(fmt, key):
            continue
        if fmt == "gguf":
            export_gguf(QuantizedSource(work), out / rel, overwrite=True, device=device, **args)
        else:
            export_compressed_tensors(QuantizedSource(work), out / rel, overwrite=True, **args)
        if steps is not None:
            steps.record(fmt, key, [rel])
    return files


def _quantize_text(s: dict) -> str:
    grid = s['recipe']['gguf_type'] or s['recipe']['weight_format']
    if s["recipe"].get("tensor_types"):
        grid = f"a per-tensor mix (file type {grid})"
    if s["recipe"].get("ct_schemes"):
        grid = "a per-layer compressed-tensors mix"
    what = f"{s['model']} with {s['recipe']['method']} onto {grid}"
    lines = [f"nothing to redo: {s['out']} already holds {what} (same recipe, calibration and weights; "
             f"--overwrite starts over)" if s.get("finished_earlier") else
             f"quantized {what} in {s['quantize_seconds']:.1f} s on {s.get('device', 'cpu')}"]
    if s.get("lattice") and s["lattice"].get("groups"):
        from gemmaquant.qat_checkpoint import summary_text

        lines.append(summary_text(s["lattice"]))
    from gemmaquant.export.inspect import file_bits

    for kind, path in s["files"].items():
        size = _size(Path(path))
        lines.append(f"  {kind:12s} {path}  ({size / 2**20:.2f} MiB, "
                     f"{file_bits(path)['bits_per_weight']:.3f} bits/weight)")
    rep = s.get("report")
    if rep and rep.get("metrics"):
        m = rep["metrics"]
        lines.append(f"  KL divergence of {rep['measured_on']} to the float model: mean {m['kl_mean']:.4f}, "
                     f"p99 {m['kl_p99']:.4f}, max {m['kl_max']:.4f}; top-1 agreement {100 * m['top1']:.1f}%; "
                     f"perplexity {m['ppl_test']:.2f} (float {m['ppl_ref']:.2f})")
        lines.append(f"  report: {rep['files']['md']}  {rep['files']['html']}")
    elif rep and rep.get("skipped"):
        lines.append(f"  evaluation skipped: {rep['skipped']}")
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
    from gemmaquant.outputs import exported_model
    from gemmaquant.runtime import load_for_inference

    dev = resolve_device(device)  # a device that is not there fails first
    check_count(n_seq, "--n-seq")
    check_count(seq_len, "--seq-len", minimum=2)  # KL and top-1 compare next-token predictions: 2 tokens at least
    quantized = exported_model(quantized)  # an output directory: its QAT result, work directory or exports
    test = load_for_inference(quantized, device=dev)  # a quantizer output runs packed, through gemmaquant.ops
    ref = gemmaquant.load(model).to(dev)
    check_count(seq_len, "--seq-len", 2, ref.config.max_position_embeddings, " (the model's context length)")
    ids = heldout_ids(resolve(model), heldout or default_heldout(), n_seq, seq_len)
    m = compare_logits(ref, test, ids, routing=True)
    text = (f"KL divergence mean {m['kl_mean']:.5f}, p99 {m['kl_p99']:.5f}, max {m['kl_max']:.5f}; "
            f"top-1 agreement {100 * m['top1']:.2f}%; perplexity {m['ppl_test']:.3f} (float {m['ppl_ref']:.3f}) "
            f"on {n_seq}x{seq_len} held-out tokens, measured on {quantized}")
    if "routing" in m:
        text += "\n" + routing_text(m)
    return {**m, "measured_on": str(quantized), "device": device_name(dev), "text": text}


def default_heldout() -> Path:
    from importlib import resources

    return Path(str(resources.files("gemmaquant.calibration") / "data" / "heldout.txt"))


def run_bench(model: str, *, prompt_len: int = 128, new_tokens: int = 32, device: str = "auto") -> dict:
    from gemmaquant.device import resolve_device
    from gemmaquant.eval.latency import measure_latency
    from gemmaquant.outputs import exported_model
    from gemmaquant.runtime import load_for_inference

    dev = resolve_device(device)  # a device that is not there fails first
    check_count(prompt_len, "--prompt-len")
    check_count(new_tokens, "--new-tokens")
    model = exported_model(model)  # an output directory: its QAT result, work directory or exports
    m = load_for_inference(model, device=dev)
    context = m.config.max_position_embeddings
    check_count(prompt_len, "--prompt-len", 1, context - 1, " (the model's context length less one new token)")
    check_count(new_tokens, "--new-tokens", 1, context - prompt_len,
                f" (the model's context length {context} less --prompt-len)")
    res = measure_latency(m, prompt_len=prompt_len, new_tokens=new_tokens)
    res["model"] = str(model)
    res["text"] = (f"{model}: prefill {res['prefill_tokens_per_s']:.1f} tok/s, decode {res['decode_tokens_per_s']:.1f} "
                   f"tok/s on {res['device']} ({res.get('threads', '?')} threads)")
    return res


def list_variants() -> dict:
    """The names `quantize`, `eval`, `qat` ... accept: the four released variants (weights from the Hugging Face
    cache) and the bundled fixtures (tiny trained models shipped inside the package, with their paths)."""
    from gemmaquant.fixtures import fixture_path
    from gemmaquant.hub import fixture_names
    from gemmaquant.model.gemma4 import param_counts

    rows = []
    fixtures = fixture_names()
    for name in [*VARIANTS, *fixtures]:
        cfg = model_config(name)
        c = param_counts(cfg)
        path = str(fixture_path(name)) if name in fixtures else None
        rows.append({"name": name, "hf_repo": HF_REPOS.get(name), "path": path, "layers": cfg.num_hidden_layers,
                     "hidden": cfg.hidden_size, "moe": cfg.enable_moe_block, "ple": cfg.has_ple,
                     "params_total": c["total"], "params_active": c["active"]})

    def line(r: dict) -> str:
        return (f"  {r['name']:11s} {_params(r['params_total'])} total {_params(r['params_active'])} active  "
                f"{r['layers']:3d} layers  hidden {r['hidden']:5d}  {r['hf_repo'] or r['path']}")

    text = "\n".join(["Gemma 4 variants (weights from the Hugging Face cache, HF_HOME; `hf download <repo>` "
                      "fetches them):", *map(line, rows[:len(VARIANTS)]),
                      "bundled trained fixtures (tiny models inside the package, to try every command on):",
                      *map(line, rows[len(VARIANTS):])])
    return {"variants": rows, "fixtures": fixtures, "text": text}


def _params(n: int) -> str:
    return f"{n / 1e9:7.2f}B" if n >= 1e8 else f"{n / 1e6:7.2f}M"


def run_qat(model: str, *, bits: int | None, data: Path, steps: int | None, out: Path, overwrite: bool = False,
            device: str = "auto", heldout: Path | None = None, export_last: bool = False,
            **recipe_overrides) -> dict:
    from gemmaquant.qat import QATRecipe, qat_train  # part of every install: an ImportError is a packaging bug

    overrides = {k: v for k, v in recipe_overrides.items() if v is not None}
    for flag, key in (("--gguf-type", "gguf_type"), ("--format", "weight_format")):
        grid = overrides.get(key)
        nominal = re.search(r"\d", grid or "")
        if bits is not None and nominal and int(nominal.group()) != bits:  # Q4_K_M, q5_0, int3_g32_sym: 4, 5, 3
            raise UsageError(f"--bits {bits} conflicts with {flag} {grid}, a {nominal.group()}-bit grid")
    from gemmaquant.device import resolve_device
    from gemmaquant.outputs import removed_if_left_empty

    dev = resolve_device(device)  # a device that is not there: exit 2, before any work
    bits = 4 if bits is None else bits
    QATRecipe(bits=bits, steps=steps, **overrides)  # every option checked before the output directory is made
    with removed_if_left_empty(out):  # a run that fails before writing anything leaves no empty directory
        prepare_out(Path(out), overwrite)
        res = qat_train(model, bits=bits, data=data, steps=steps, out=out, heldout=heldout, export_last=export_last,
                        device=dev, **overrides)
    res = dict(res) if isinstance(res, dict) else {"result": str(res)}
    res.setdefault("text", f"QAT finished: {out}")
    return res
