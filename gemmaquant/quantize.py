"""`gemmaquant.quantize`: post-training quantization of a Gemma 4, streaming layer by layer, resumable.

    for each layer i (weights read from the checkpoint one layer at a time):
        stats   = calibration statistics of layer i on inputs produced by the *quantized* layers 0..i-1
        values  = the recipe's algorithm on every planned matrix (onto the exact export grid)
        inputs  = layer i (now dequantized) applied to those inputs -> the next layer's inputs
        write layer i and the new inputs atomically          <- a killed run resumes here
Memory: one layer's weights and statistics plus the calibration activations. The result is a work directory
(`gemmaquant.quantized`) that the exporters turn into GGUF and compressed-tensors files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemmaquant.calibration import calibration_tokens
from gemmaquant.capture import LayerStats, capture, force_route_rare_experts
from gemmaquant.checkpoint import Checkpoint
from gemmaquant.config import Gemma4Config
from gemmaquant.errors import GemmaquantError
from gemmaquant.layer_quant import quantize_layer
from gemmaquant.model.gemma4 import DecoderLayer, Gemma4, LayerKV, make_forward_state, rope_inv_freqs
from gemmaquant.plan import TensorPlan, make_plan
from gemmaquant.progress import progress as progress_lines, stage
from gemmaquant.quantized import finished_layers, save_atomic, save_layer, write_json_atomic
from gemmaquant.recipe import Recipe
from gemmaquant.validate import check_float_checkpoint, check_float_values

WORK_DIR = ".gemmaquant-work"
LAYERS_RECORD = "layers.json"  # written when every layer is finished; kept when the layer files are pruned


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
def build_layer(cfg: Gemma4Config, i: int, state: dict[str, torch.Tensor]) -> DecoderLayer:
    with torch.device("meta"):
        layer = DecoderLayer(cfg, i)
    # copies: quantize_layer writes into the layer's weights (AWQ's folds, the dequantized values), and `state`
    # may be the tensors of a model object the caller holds (`v.float()` of an fp32 tensor is that tensor)
    layer.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state.items()}, strict=True, assign=True)
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
        save_atomic(t, path, {"layer": str(layer)})

    def load_into(self, path: Path) -> None:
        from safetensors.torch import load_file

        t = load_file(str(path))
        self.h = [t[f"h.{b}"] for b in range(len(self.h))]
        self.shared = {}
        for k in t:
            if k.startswith("kv.") and k.endswith(".k"):
                _, p, b, _ = k.split(".")
                self.shared.setdefault(int(p), {})[int(b)] = LayerKV(t[k], t[k[:-1] + "v"], t[k[:-1] + "pos"])
        self.shared = {p: [d[b] for b in sorted(d)] for p, d in self.shared.items()}


@torch.no_grad()
def run_layer(layer: DecoderLayer, cfg: Gemma4Config, i: int, acts: Activations, inv_freqs) -> list[torch.Tensor]:
    out = []
    for b, h in enumerate(acts.h):
        st = make_forward_state(inv_freqs, torch.arange(h.shape[1]))
        st.fresh_kv = {p: kvs[b] for p, kvs in acts.shared.items()}
        ple = acts.ple[b][:, :, i] if acts.ple[b] is not None else None
        y = layer(h, st, ple)
        if i in _producers(cfg):
            acts.shared.setdefault(i, [None] * len(acts.h))[b] = st.fresh_kv[i]
        out.append(y)
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


def quantize(model, recipe: Recipe | str | os.PathLike, *, out: str | os.PathLike, calib: str | None = None,
             tokenizer_dir: str | os.PathLike | None = None, progress: bool | None = None,
             stop_after_layer: int | None = None, inplace: bool = False,
             layers_needed: bool = True) -> QuantizeResult:
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
    """
    t0 = time.time()
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
    if calib is not None:
        recipe = Recipe.from_dict({**recipe.to_dict(), "calibration": str(calib)})
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
    if state_file.is_file():
        old = json.loads(state_file.read_text())
        if not recipe.same_as(old.get("recipe")) or \
                {k: old.get(k) for k in ("config", "calibration_sha256")} != \
                {k: state[k] for k in ("config", "calibration_sha256")}:
            raise QuantizeError(f"{work}: holds a run with another recipe, model or calibration set; "
                                f"remove it (gemmaquant quantize --overwrite) or choose another --out")
    else:
        write_json_atomic(state, state_file)
    from gemmaquant.fingerprint import SourceChanged, SourceFingerprint
    from gemmaquant.resume import prune_layers

    fp = SourceFingerprint(work, src)
    record = work / LAYERS_RECORD
    done = json.loads(record.read_text()) if record.is_file() else None  # the layer stage finished before
    try:
        fp.verify(cfg.num_hidden_layers if done else finished_layers(work),
                  globals_done=done is not None or (work / "globals.safetensors").is_file())
    except SourceChanged as e:
        raise QuantizeError(str(e)) from None
    if done is not None and finished_layers(work) < cfg.num_hidden_layers:  # pruned (or half-pruned) by the CLI
        if not layers_needed:
            return QuantizeResult(work, plan, calib_hash, done, time.time() - t0)
        prune_layers(work)  # needed again: start the layers over
        record.unlink()

    # embeddings and PLE inputs for the calibration set (globals stay float: see plan.FLOAT_REASONS)
    globals_ = src.global_state()
    fp.add(globals_)
    for name, t in globals_.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise QuantizeError(f"tensor {name!r} contains NaN or Inf")
    with torch.device("meta"):
        shell = Gemma4(cfg)
    shell.load_state_dict({k: v.float() for k, v in globals_.items()}, strict=False, assign=True)
    batches = ids.split(recipe.batch_size)
    embedded = [shell.embed(b) for b in batches]
    acts = Activations(h=[e[0] for e in embedded], ple=[e[1] for e in embedded])
    if not (work / "globals.safetensors").is_file():
        save_atomic({k: v.contiguous() for k, v in globals_.items()}, work / "globals.safetensors")
    del shell, embedded

    start = finished_layers(work)
    if start > 0:
        acts.load_into(work / f"acts_{start:05d}.safetensors")
    inv_freqs = rope_inv_freqs(cfg)
    layer_plans = [{k[len(f"layers.{i}."):]: v for k, v in plan.items() if k.startswith(f"layers.{i}.")}
                   for i in range(cfg.num_hidden_layers)]
    if start > 0:
        stage(f"resuming {work}: layers 0-{start - 1} were finished by an earlier run", progress)
    bar = progress_lines(range(start, cfg.num_hidden_layers), desc="quantize", unit="layer", initial=start,
                         total=cfg.num_hidden_layers, enabled=progress)
    for i in bar:
        lt = time.time()
        weights = src.layer_state(i)
        fp.add(weights, f"layers.{i}.")  # before the layer is saved: a finished layer's weights are on record
        layer = build_layer(cfg, i, weights)
        del weights
        for name, t in layer.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise QuantizeError(f"tensor 'layers.{i}.{name}' contains NaN or Inf")
        stats = LayerStats()
        with capture(layer, stats):
            run_layer(layer, cfg, i, Activations(acts.h, acts.ple, dict(acts.shared)), inv_freqs)
        for g, s in stats.inputs.items():
            if s.xtx is not None:
                _check_finite(s.xtx, f"entering layer {i} ({g})")
        force_route_rare_experts(layer, stats, recipe.moe_min_tokens)
        values, sqnr, expert_sqnr = quantize_layer(layer, stats, layer_plans[i], recipe)
        acts.h = run_layer(layer, cfg, i, acts, inv_freqs)
        for b, h in enumerate(acts.h):
            _check_finite(h, f"leaving layer {i}")
        info = {"layer": i, "sqnr_db": sqnr, "expert_sqnr_db": expert_sqnr, "seconds": round(time.time() - lt, 3),
                "expert_tokens": stats.expert_tokens.tolist() if stats.expert_tokens is not None else None,
                "forced_experts": stats.forced_experts}
        # order matters for resumption: inputs of layer i+1, then layer i (its .json last), then drop layer i's inputs
        acts.save(work / f"acts_{i + 1:05d}.safetensors", i + 1)
        save_layer(work, i, values, info)
        (work / f"acts_{i:05d}.safetensors").unlink(missing_ok=True)
        del layer, stats, values
        if stop_after_layer is not None and i >= stop_after_layer:
            break
    layers = [json.loads((work / f"layer_{i:05d}.json").read_text()) for i in range(finished_layers(work))]
    if len(layers) == cfg.num_hidden_layers:
        write_json_atomic(layers, record)
    if inplace:  # from the work directory, so that a resumed run writes the layers an earlier run finished too
        from gemmaquant.quantized import read_values

        for i in range(len(layers)):
            src.write_layer(i, read_values(work / f"layer_{i:05d}.safetensors"))
    return QuantizeResult(work, plan, calib_hash, layers, time.time() - t0)
