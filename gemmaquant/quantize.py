"""`gemmaquant.quantize`: post-training quantization of a Gemma 4, streaming layer by layer, resumable.

    for each layer i (weights read from the checkpoint one layer at a time):
        stats   = calibration statistics of layer i on inputs produced by the *quantized* layers 0..i-1
        values  = the recipe's algorithm on every planned matrix (onto the exact export grid)
        inputs  = layer i (now dequantized) applied to those inputs -> the next layer's inputs
        write layer i and the new inputs atomically          <- a killed run resumes here
Memory: one layer's weights and statistics plus the calibration activations. The result is a work directory
(`gemmaquant.quantized`) that the exporters turn into GGUF and compressed-tensors files.
Plain round-to-nearest (method "rtn") reads no statistics: it runs no calibration forward, keeps no activations,
and each layer is only read, quantized and written (`uses_activations`).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemmaquant.calibration import calibration_tokens
from gemmaquant.capture import LayerStats, batched_experts, capture, force_route_rare_experts
from gemmaquant.checkpoint import Checkpoint
from gemmaquant.config import Gemma4Config
from gemmaquant.device import (ActivationBudget, autocast, forward_dtype, host_copy, model_device, out_of_memory,
                               resolve_device, to_device, to_host)
from gemmaquant.errors import GemmaquantError
from gemmaquant.layer_quant import quantize_layer
from gemmaquant.model.gemma4 import DecoderLayer, Gemma4, LayerKV, make_forward_state, rope_inv_freqs
from gemmaquant.plan import TensorPlan, make_plan
from gemmaquant.progress import progress as progress_lines, stage
from gemmaquant.quantized import finished_layers, read_record, save_atomic, save_layer, write_json_atomic
from gemmaquant.recipe import Recipe
from gemmaquant.validate import all_finite, check_float_checkpoint, check_float_values

WORK_DIR = ".gemmaquant-work"
LAYERS_RECORD = "layers.json"  # written when every layer is finished; kept when the layer files are pruned
AWQ_SAMPLES = 2048  # calibration rows per input kept for AWQ's search (capture's default)


class QuantizeError(GemmaquantError, ValueError):
    pass


# ---- where the float weights come from ----------------------------------------------------------------------
class ModuleSource:
    """A model object the caller holds (gemmaquant's Gemma4, or transformers' Gemma4ForCausalLM /
    Gemma4ForConditionalGeneration) seen through the Checkpoint interface."""

    def __init__(self, model: torch.nn.Module, tokenizer_dir: str | os.PathLike | None = None):
        if isinstance(model, Gemma4):
            self.config, state = model.config, model.state_dict()
        else:
            hf_cfg = getattr(model, "config", None)
            if hf_cfg is None or getattr(hf_cfg, "model_type", None) not in ("gemma4", "gemma4_text"):
                raise QuantizeError(f"{type(model).__name__} is not a Gemma 4 model (model_type "
                                    f"{getattr(hf_cfg, 'model_type', None)!r})")
            self.config = Gemma4Config.from_hf_dict(hf_cfg.to_dict())
            state = {}
            for k, v in model.state_dict().items():
                for pre in ("model.language_model.", "model."):
                    if k.startswith(pre) and not k.startswith(("model.vision_tower", "model.audio_tower",
                                                               "model.embed_vision", "model.embed_audio")):
                        state[k[len(pre):]] = v
                        break
        from gemmaquant.checkpoint import expected_shapes

        self._state = {k: state[k] for k in expected_shapes(self.config) if k in state}
        missing = [k for k in expected_shapes(self.config) if k not in self._state]
        if missing:
            raise QuantizeError(f"model object lacks tensor {missing[0]!r}")
        self.path = Path(tokenizer_dir) if tokenizer_dir else None
        name_or_path = (getattr(model, "name_or_path", None)
                        or getattr(getattr(model, "config", None), "_name_or_path", ""))
        if self.path is None and name_or_path and Path(name_or_path).is_dir():
            self.path = Path(name_or_path)

    def layer_state(self, i: int, dtype=None):
        pre = f"layers.{i}."
        return {k[len(pre):]: (v if dtype is None else v.to(dtype))
                for k, v in self._state.items() if k.startswith(pre)}

    def global_state(self, dtype=None):
        return {k: (v if dtype is None else v.to(dtype)) for k, v in self._state.items() if not k.startswith("layers.")}

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]

    @torch.no_grad()
    def write_layer(self, i: int, values: dict) -> None:
        """`quantize(..., inplace=True)`: layer i's quantized values (dequantized, in each tensor's own dtype)
        copied into the model object's tensors."""
        from gemmaquant.quantized import dequantize_value

        for name, v in values.items():
            t = self._state[f"layers.{i}.{name}"]
            t.copy_(dequantize_value(v).to(t.dtype))


def open_source(model, tokenizer_dir=None):
    if isinstance(model, torch.nn.Module):
        return ModuleSource(model, tokenizer_dir)
    from gemmaquant.hub import resolve

    return Checkpoint(resolve(model))


# ---- one layer at a time ------------------------------------------------------------------------------------
def _owned_fp32(v: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`v` in fp32 on `device`, in storage of its own (never the caller's tensor itself)."""
    t = to_device(v, device)
    return t.to(torch.float32, copy=t is v)


def build_layer(cfg: Gemma4Config, i: int, state: dict[str, torch.Tensor],
                device: torch.device = torch.device("cpu")) -> DecoderLayer:
    """Layer i with its weights in fp32 on `device` (copied as stored, then widened there: half the transfer of a
    bf16 checkpoint; the forward's precision is autocast's business, see gemmaquant.device)."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg, i)
    # a copy even where the dtype and device already match: quantize_layer writes into the layer's weights (AWQ's
    # folds, the dequantized values), and `state` may be the tensors of a model object the caller holds
    layer.load_state_dict({k: _owned_fp32(v, device) for k, v in state.items()}, strict=True, assign=True)
    return layer.eval()


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise QuantizeError(f"non-finite activations (NaN/Inf) {where}")


@dataclass
class Activations:
    """Calibration activations entering the current layer, in batches, plus K/V of producer layers that
    KV-shared layers will read."""

    h: list[torch.Tensor]  # [b, T, H] per batch
    ple: list[torch.Tensor | None]  # [b, T, L, P] per batch
    shared: dict[int, list[LayerKV]] = field(default_factory=dict)

    def save(self, path: Path, layer: int) -> None:
        t = {f"h.{b}": h for b, h in enumerate(self.h)}
        for p, kvs in self.shared.items():
            for b, kv in enumerate(kvs):
                t[f"kv.{p}.{b}.k"], t[f"kv.{p}.{b}.v"], t[f"kv.{p}.{b}.pos"] = kv.k, kv.v, kv.pos
        save_atomic(to_host(t), path, {"layer": str(layer)})

    def nbytes(self) -> int:  # what lives between layers: h in and h out, and the shared K/V
        kv = sum(t.numel() * t.element_size() for kvs in self.shared.values() for x in kvs if x is not None
                 for t in (x.k, x.v))
        return 2 * sum(h.numel() * h.element_size() for h in self.h) + kv

    def move(self, dev: torch.device) -> None:
        """h and the shared K/V to `dev` (their home between layers); PLE inputs stay in host memory."""
        self.h = [to_device(h, dev) for h in self.h]
        self.shared = {p: [_kv_to(x, dev) for x in kvs] for p, kvs in self.shared.items()}

    def load_into(self, path: Path) -> None:
        from safetensors.torch import load_file

        from gemmaquant.quantized import damaged_work_file

        try:
            t = load_file(str(path))
            self.h = [t[f"h.{b}"] for b in range(len(self.h))]
            self.shared = {}
            for k in t:
                if k.startswith("kv.") and k.endswith(".k"):
                    _, p, b, _ = k.split(".")
                    self.shared.setdefault(int(p), {})[int(b)] = LayerKV(t[k], t[k[:-1] + "v"], t[k[:-1] + "pos"])
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001  (a damaged header or body, or tensors missing from it)
            raise damaged_work_file(path, f"{type(e).__name__}: {e}") from None
        self.shared = {p: [d[b] for b in sorted(d)] for p, d in self.shared.items()}


def _kv_to(kv: LayerKV | None, dev: torch.device) -> LayerKV | None:
    if kv is None:  # a producer's own entry, not yet filled for this batch
        return None
    return LayerKV(to_device(kv.k, dev), to_device(kv.v, dev), to_device(kv.pos, dev))


@torch.no_grad()
def run_layer(layer: DecoderLayer, cfg: Gemma4Config, i: int, acts: Activations, inv_freqs,
              dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Layer i on every calibration batch, on the layer's device, the forward in `dtype` (autocast; fp32 is the
    plain forward). Each output (and a producer's K/V) goes back where its input batch came from."""
    dev = layer.layer_scalar.device
    out = []
    for b, h in enumerate(acts.h):
        home = h.device
        h = to_device(h, dev)
        st = make_forward_state(inv_freqs, torch.arange(h.shape[1], device=dev))
        st.fresh_kv = {p: _kv_to(kvs[b], dev) for p, kvs in acts.shared.items()}
        ple = to_device(acts.ple[b][:, :, i], dev) if acts.ple[b] is not None else None
        with autocast(dev, dtype):
            y = layer(h, st, ple)
        if i in _producers(cfg):
            acts.shared.setdefault(i, [None] * len(acts.h))[b] = _kv_to(st.fresh_kv[i], home)
        out.append(to_device(y, home))
    return out


def _producers(cfg: Gemma4Config) -> set[int]:
    return {cfg.kv_producer(j) for j in range(cfg.num_hidden_layers) if cfg.is_kv_shared(j)}


# ---- the whole model -----------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    work_dir: Path
    plan: dict[str, TensorPlan]
    calibration_sha256: str
    layers: list[dict]
    seconds: float
    recipe: Recipe | None = None  # the recipe run (the lattice grid when a QAT checkpoint was detected)
    lattice: dict | None = None  # detection, and what was read back / re-rounded (gemmaquant.qat_checkpoint)


def uses_activations(recipe: Recipe) -> bool:
    """Whether the recipe's algorithm reads calibration statistics (Hessians, input rows, expert routing).
    Plain RTN does not: its layers need no calibration forward and no activations between layers."""
    return recipe.method != "rtn"


def quantize_one_layer(cfg: Gemma4Config, i: int, state: dict[str, torch.Tensor], acts: Activations | None,
                       layer_plan: dict[str, TensorPlan], recipe: Recipe, inv_freqs, device: torch.device,
                       fwd_dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """Layer i, start to finish, with no file I/O: build it on `device`, collect its statistics on `acts`,
    quantize its matrices, and replace `acts` by the quantized layer's outputs (in place). Returns (the layer's
    values in host memory, for `save_layer`; its report entry). acts None (a recipe that reads no statistics,
    see `uses_activations`): the matrices are quantized and nothing is run."""
    lt = time.time()
    layer = build_layer(cfg, i, state, device)
    for name, t in layer.state_dict().items():
        if t.is_floating_point() and not all_finite(t):
            raise QuantizeError(f"tensor 'layers.{i}.{name}' contains NaN or Inf")
    stats = LayerStats(acc_dtype=torch.float64 if device.type == "cpu" else torch.float32)
    from gemmaquant.qat_checkpoint import LatticeLog

    lattice = LatticeLog()
    if acts is None:  # nothing runs the layer afterwards: its weights need not hold the quantized values
        values, sqnr, expert_sqnr = quantize_layer(layer, stats, layer_plan, recipe, lattice=lattice,
                                                   write_back=False)
        info = {"layer": i, "sqnr_db": sqnr, "expert_sqnr_db": expert_sqnr, "seconds": round(time.time() - lt, 3),
                "expert_tokens": None, "forced_experts": []}
        if lattice.tensors:
            info["lattice"] = lattice.tensors
        return to_host(values), info
    samples = AWQ_SAMPLES if recipe.method == "awq" else 0  # only AWQ reads input rows; the rest, Hessians
    batched = batched_experts(device)
    with capture(layer, stats, max_samples=samples, batched=batched):
        run_layer(layer, cfg, i, Activations(acts.h, acts.ple, dict(acts.shared)), inv_freqs, fwd_dtype)
    for g, s in stats.inputs.items():
        if s.xtx is not None:
            _check_finite(s.xtx, f"entering layer {i} ({g})")
    force_route_rare_experts(layer, stats, recipe.moe_min_tokens, max_samples=samples, batched=batched)
    values, sqnr, expert_sqnr = quantize_layer(layer, stats, layer_plan, recipe, lattice=lattice)
    acts.h = run_layer(layer, cfg, i, acts, inv_freqs, fwd_dtype)
    for b, h in enumerate(acts.h):
        _check_finite(h, f"leaving layer {i}")
    info = {"layer": i, "sqnr_db": sqnr, "expert_sqnr_db": expert_sqnr, "seconds": round(time.time() - lt, 3),
            "expert_tokens": stats.expert_tokens.tolist() if stats.expert_tokens is not None else None,
            "forced_experts": stats.forced_experts}
    if lattice.tensors:  # (absent otherwise: the records of other recipes keep their bytes)
        info["lattice"] = lattice.tensors
    return to_host(values), info


def quantize(model, recipe: Recipe | str | os.PathLike, *, out: str | os.PathLike, calib: str | None = None,
             tokenizer_dir: str | os.PathLike | None = None, progress: bool | None = None,
             stop_after_layer: int | None = None, inplace: bool = False, layers_needed: bool = True,
             device: str | torch.device | None = None, activation_budget: int | None = None,
             from_qat: bool | None = None) -> QuantizeResult:
    """Quantize `model` (alias, checkpoint directory, or a Gemma 4 model object) with `recipe`: a `Recipe`, a recipe
    file (.toml), or a bundled recipe's name (`26b-a4b/int4-gptq`, see `gemmaquant.recipe.bundled_recipes()`).

    Writes the work directory `out/.gemmaquant-work`; running the same call again after an interruption
    resumes after the last finished layer, and the result is byte-identical to an uninterrupted run.
    `stop_after_layer` stops early (for tests of resumption).

    A model object is read one layer at a time and left as it was. With `inplace=True` the quantized model is
    written into it instead: after the run, every tensor of every finished layer holds its quantized value
    (dequantized, cast to the tensor's dtype; norms that AWQ folded scales into hold the folded values), so the
    object computes what the exported model computes. Embeddings, the final norm and the PLE tables (kept float)
    are not touched. `inplace=True` needs a model object. A resumed run first
    checks that the finished layers' source weights are unchanged (gemmaquant.fingerprint). `layers_needed=False`:
    a work directory whose layer files were pruned after its exports were written (the CLI does so) is not
    recomputed, and the result has none.

    device: where the layers are quantized, 'auto' (the first GPU, else the CPU), 'cpu', 'cuda', 'cuda:N'; None:
        the device of a model object's parameters, 'auto' for a path or alias. One layer's weights at a time go
        there. activation_budget: bytes of device memory the calibration activations may hold between layers
        (default: half the free memory); beyond it they live in host memory. See gemmaquant.device.
    from_qat: a QAT checkpoint (its int4 group-32 lattice read back, not rounded again; gemmaquant.qat_checkpoint):
        None detects it (layer 0, sampled) when the recipe is the int4 g32 grid, True forces it (an error if the
        weights are on no lattice), False never reads it. The result's `lattice` says what was done.
    """
    from gemmaquant.lock import hold

    with hold(out):  # one run per output directory (re-entrant: the CLI holds it around this call)
        return _quantize(model, recipe, out=out, calib=calib, tokenizer_dir=tokenizer_dir, progress=progress,
                         stop_after_layer=stop_after_layer, inplace=inplace, layers_needed=layers_needed,
                         device=device, activation_budget=activation_budget, from_qat=from_qat)


def _quantize(model, recipe, *, out, calib, tokenizer_dir, progress, stop_after_layer, inplace, layers_needed,
              device, activation_budget, from_qat=None) -> QuantizeResult:
    t0 = time.time()
    dev = (model_device(model) if device is None and isinstance(model, torch.nn.Module)
           else resolve_device(device))
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_file(recipe) if Path(recipe).suffix == ".toml" else Recipe.from_name(str(recipe))
    torch.manual_seed(0)
    src = open_source(model, tokenizer_dir)
    if inplace and not isinstance(src, ModuleSource):
        raise QuantizeError("inplace=True writes into a model object; a checkpoint path is never written to")
    if isinstance(src, Checkpoint):  # names, shapes, dtypes and values of every tensor, before any work
        check_float_checkpoint(src)
        check_float_values(src)
    cfg = src.config
    from gemmaquant.qat_checkpoint import choose_lattice

    recipe, detection = choose_lattice(src, recipe, from_qat)
    if detection is not None and detection["detected"]:
        stage(f"QAT checkpoint: {100 * detection['sampled_share']:.1f}% of layer 0's sampled groups are on an int4 "
              f"group-32 lattice; reading it back ({'forced' if detection['forced'] else 'detected'})", progress)
    if calib is not None:
        recipe = Recipe.from_dict({**recipe.to_dict(), "calibration": str(calib)})
    if recipe.pad_to_block:  # the widths padded to the 256-block (gemmaquant.padding): the same function
        from gemmaquant.padding import PaddedSource, PaddingError

        if inplace:
            raise QuantizeError("inplace=True cannot write a padded model (pad_to_block) into the model object")
        try:
            src = PaddedSource(src, recipe.pad_to_block)
        except PaddingError as e:
            raise QuantizeError(str(e)) from None
        cfg = src.config
    plan = make_plan(cfg, recipe)
    tok_dir = getattr(src, "path", None)
    if tok_dir is None:
        raise QuantizeError("no tokenizer: pass tokenizer_dir= (the directory with tokenizer.json)")
    ids, calib_hash = calibration_tokens(tok_dir, recipe.calibration, recipe.n_samples, recipe.seq_len,
                                         cfg.bos_token_id)
    work = Path(out) / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    state = {"recipe": recipe.to_dict(), "config": cfg.to_hf_dict(), "calibration_sha256": calib_hash,
             "source_dir": str(Path(tok_dir).resolve()),
             # the exporters add the "gemmaquant." prefix (GGUF keys, safetensors metadata)
             "metadata": {"recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                          "calibration_sha256": calib_hash, "version": "0.1.0"}}
    state_file = work / "state.json"
    fwd_dtype = forward_dtype(recipe.forward_dtype, dev)
    if state_file.is_file():
        old = read_record(state_file, {})
        if not recipe.same_as(old.get("recipe")) or \
                {k: old.get(k) for k in ("config", "calibration_sha256")} != \
                {k: state[k] for k in ("config", "calibration_sha256")}:
            raise QuantizeError(f"{work}: holds a run with another recipe, model or calibration set; "
                                f"remove it (gemmaquant quantize --overwrite) or choose another --out")
        started_on = old.get("device", "cpu")  # work directories from before devices were recorded ran on the CPU
        if started_on != dev.type:  # a bf16 GPU forward and an fp32 CPU forward do not give the same layers
            raise QuantizeError(f"{work}: this run was started on the {started_on.upper()}; resume it there "
                                f"(--device {started_on}) or remove the directory to start again on {dev}")
    else:
        write_json_atomic({**state, "device": dev.type, "forward_dtype": str(fwd_dtype).removeprefix("torch.")},
                          state_file)
    from gemmaquant.fingerprint import SourceChanged, SourceFingerprint
    from gemmaquant.resume import prune_layers

    fp = SourceFingerprint(work, src)
    record = work / LAYERS_RECORD
    done = read_record(record) if record.is_file() else None  # the layer stage finished before
    try:
        fp.verify(cfg.num_hidden_layers if done else finished_layers(work),
                  globals_done=done is not None or (work / "globals.safetensors").is_file())
    except SourceChanged as e:
        raise QuantizeError(str(e)) from None
    if done is not None and finished_layers(work) < cfg.num_hidden_layers:  # pruned (or half-pruned) by the CLI
        if not layers_needed:
            return QuantizeResult(work, plan, calib_hash, done, time.time() - t0, recipe,
                                  _lattice_record(detection, done))
        prune_layers(work)  # needed again: start the layers over
        record.unlink()

    # embeddings and PLE inputs for the calibration set (globals stay float: see plan.FLOAT_REASONS)
    globals_ = src.global_state()
    fp.add(globals_)
    for name, t in globals_.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise QuantizeError(f"tensor {name!r} contains NaN or Inf")
    acts = None
    if uses_activations(recipe):
        with torch.device("meta"):
            shell = Gemma4(cfg)
        shell.load_state_dict({k: v.float() for k, v in globals_.items()}, strict=False, assign=True)
        batches = ids.split(recipe.batch_size)
        embedded = [shell.embed(b) for b in batches]
        acts = Activations(h=[e[0] for e in embedded], ple=[e[1] for e in embedded])
        del shell, embedded
    if not (work / "globals.safetensors").is_file():
        save_atomic({k: v.contiguous() for k, v in globals_.items()}, work / "globals.safetensors")

    start = finished_layers(work)
    if start > 0 and acts is not None:
        acts.load_into(work / f"acts_{start:05d}.safetensors")
    inv_freqs = rope_inv_freqs(cfg)
    layer_plans = [{k[len(f"layers.{i}."):]: v for k, v in plan.items() if k.startswith(f"layers.{i}.")}
                   for i in range(cfg.num_hidden_layers)]
    if start > 0:
        stage(f"resuming {work}: layers 0-{start - 1} were finished by an earlier run", progress)
    bar = progress_lines(range(start, cfg.num_hidden_layers), desc="quantize", unit="layer", initial=start,
                         total=cfg.num_hidden_layers, enabled=progress)
    if acts is not None:
        acts.move(ActivationBudget(dev, activation_budget).home(acts.nbytes()))
    # on a GPU a thread reads (and pins) layer i+1 from the checkpoint while layer i is worked on
    prefetch = ThreadPoolExecutor(1) if dev.type == "cuda" else None
    read = (lambda j: host_copy(src.layer_state(j), dev))
    pending = prefetch.submit(read, start) if prefetch and start < cfg.num_hidden_layers else None
    try:
        for i in bar:
            state_i = pending.result() if pending else read(i)
            if prefetch and i + 1 < cfg.num_hidden_layers:
                pending = prefetch.submit(read, i + 1)
            fp.add(state_i, f"layers.{i}.")  # before the layer is saved: a finished layer's weights are on record
            try:
                values, info = quantize_one_layer(cfg, i, state_i, acts, layer_plans[i], recipe, inv_freqs, dev,
                                                  fwd_dtype)
            except torch.cuda.OutOfMemoryError:  # nothing of layer i was written: the work directory resumes
                raise out_of_memory(dev, f"layer {i} of {cfg.num_hidden_layers}",
                                    "resumes " + (f"after layer {i - 1}" if i else "at layer 0")) from None
            del state_i
            # order matters for resumption: inputs of layer i+1, then layer i (its .json last), then drop layer
            # i's inputs
            if acts is not None:
                acts.save(work / f"acts_{i + 1:05d}.safetensors", i + 1)
            save_layer(work, i, values, info)
            (work / f"acts_{i:05d}.safetensors").unlink(missing_ok=True)
            del values
            if stop_after_layer is not None and i >= stop_after_layer:
                break
    finally:
        if prefetch:
            prefetch.shutdown(wait=True, cancel_futures=True)
    layers = [read_record(work / f"layer_{i:05d}.json", {}) for i in range(finished_layers(work))]
    if len(layers) == cfg.num_hidden_layers:
        write_json_atomic(layers, record)
    if inplace:  # from the work directory, so that a resumed run writes the layers an earlier run finished too
        from gemmaquant.quantized import read_values

        for i in range(len(layers)):
            src.write_layer(i, read_values(work / f"layer_{i:05d}.safetensors"))
    return QuantizeResult(work, plan, calib_hash, layers, time.time() - t0, recipe, _lattice_record(detection, layers))


def _lattice_record(detection: dict | None, layers: list[dict]) -> dict | None:
    from gemmaquant.qat_checkpoint import lattice_summary

    done = lattice_summary(layers)
    if detection is None and done is None:
        return None
    return {"detection": detection, **(done or {})}
