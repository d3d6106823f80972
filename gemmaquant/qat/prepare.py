"""`prepare_qat` / `convert`: fake quantization put on (and taken off) a model's weights, in place.

Works on gemmaquant's reference `Gemma4`, on transformers' `Gemma4ForCausalLM` / `Gemma4ForConditionalGeneration`
(text weights only; the towers stay as they are) and on either wrapped by PEFT. Which weights and onto which grid
is the PTQ plan (`gemmaquant.plan.make_plan`): every attention / MLP matrix and both fused expert tensors
(`experts.gate_up_proj` [E, 2*Ie, H], `experts.down_proj` [E, H, Ie]) are fake-quantized; norms, router,
embeddings stay float, exactly as the PTQ pipeline and the exporters treat them.

Each weight gets a `torch.nn.utils.parametrize` parametrization (`FakeQuant`), so every code path that reads
`module.weight` (or `experts.gate_up_proj`) sees the quantized value: our forward, transformers' forward and its
expert implementations, PEFT's LoRA layers. State-dict hooks keep the checkpoint names: `state_dict()` holds the
latent weight under its own name (`...q_proj.weight`, not `...parametrizations.weight.original`) and learnable
block parameters as `<weight name>_qat_<key>` (e.g. `...q_proj.weight_qat_scale`), so a mid-training state saves
with safetensors and loads back with `load_state_dict` into a model that went through the same `prepare_qat`.

LoRA (PEFT): apply the adapters first (`get_peft_model`), then `prepare_qat`. The fake quantizer then quantizes
the *merged* weight W + scaling * B @ A (and subtracts the adapter's own contribution), so training sees exactly
the weights `convert` exports. `convert` folds each adapter into the quantized weight and zeroes its B, so a later
`merge_and_unload()` leaves the quantized weights unchanged. (Adapters added after `prepare_qat` train in float
beside a fake-quantized base weight, the torchtune QAT + LoRA scheme; `convert` still merges them before
rounding.) Never call PEFT's `merge_and_unload()` on a prepared model: it cannot write through the
parametrization.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gemmaquant.config import Gemma4Config
from gemmaquant.formats.base import Packed
from gemmaquant.qat.fake_quant import FakeQuant, _is_dtensor, quantize_rows
from gemmaquant.quantize import QuantizeError
from gemmaquant.recipe import Recipe, RecipeError

PACKED_ATTR = "gemmaquant_packed"  # set by convert() on the model: {checkpoint name: Packed | [Packed per expert]}
TOWER_PREFIXES = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.")


class QATError(QuantizeError):
    """Input that QAT cannot work with (quantized model, recipe that does not fit, too little data, ...)."""


# ---- names and plan -----------------------------------------------------------------------------------------
def checkpoint_name(param_name: str) -> str:
    """A parameter name in any of the supported wrappers -> gemmaquant's checkpoint name (prefix stripped):
    `base_model.model.model.language_model.layers.0.mlp.up_proj.base_layer.weight` -> `layers.0.mlp.up_proj.weight`."""
    n = param_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for pre in ("model.language_model.", "model."):
        if n.startswith(pre):
            return n[len(pre):]
    return n


def model_config(model: nn.Module) -> Gemma4Config:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, Gemma4Config):
        return cfg
    if getattr(cfg, "model_type", None) in ("gemma4", "gemma4_text"):
        return Gemma4Config.from_hf_dict(cfg.to_dict())
    raise QATError(f"{type(model).__name__} is not a Gemma 4 model (config model_type "
                   f"{getattr(cfg, 'model_type', None)!r}); prepare_qat takes gemmaquant's Gemma4 or transformers' "
                   f"Gemma4ForCausalLM / Gemma4ForConditionalGeneration (optionally wrapped by PEFT)")


def as_recipe(recipe) -> tuple[Recipe, object | None]:
    """Recipe | format name | format object -> (Recipe deciding float tensors, format overriding the plan's)."""
    from gemmaquant.formats import FORMATS, get_format

    if isinstance(recipe, Recipe):
        return recipe, None
    if isinstance(recipe, str):
        try:
            get_format(recipe)
        except KeyError as e:
            raise QATError(f"recipe {recipe!r}: {e.args[0]}") from None
        return Recipe(weight_format=recipe.lower()), None
    if hasattr(recipe, "fit") and hasattr(recipe, "grid"):
        name = next((k for k, f in FORMATS.items() if f == recipe), None)
        return Recipe(weight_format=name or "int4_g32_sym"), (None if name else recipe)
    raise QATError(f"recipe: expected a gemmaquant Recipe, a format name or a format, got {type(recipe).__name__}")


def qat_plan(model: nn.Module, recipe) -> dict[str, object]:
    """{checkpoint name: format} for every weight QAT fake-quantizes; QATError when the recipe does not fit."""
    from gemmaquant.plan import make_plan

    cfg = model_config(model)
    rec, fmt = as_recipe(recipe)
    try:
        plan = make_plan(cfg, rec)
    except (ValueError, KeyError, RecipeError) as e:
        msg = e.args[0] if e.args else str(e)
        raise QATError(f"recipe {rec.gguf_type or rec.weight_format!r} does not fit this model: {msg}") from None
    out = {n: (fmt or p.fmt) for n, p in plan.items() if p.fmt is not None}
    fits: dict[tuple, str | None] = {}
    for name, f in out.items():
        if getattr(f, "levels", None) is not None:  # fake_quant's straight-through gradient assumes v(q) = q
            raise QATError(f"recipe {rec.gguf_type or rec.weight_format!r}: {name} is on {f.name}, a non-uniform "
                           "codebook grid; QAT trains uniform grids only (use a K-quant or legacy type)")
        key = (f, plan[name].shape[-1])
        if key not in fits:  # the format's own check, on one zero row (K-quants need 256-weight super-blocks)
            try:
                f.quantize(torch.zeros(1, key[1]))
                fits[key] = None
            except ValueError as e:
                fits[key] = str(e)
        if fits[key]:
            raise QATError(f"recipe {f.name} does not fit this model: {name} {list(plan[name].shape)}: {fits[key]}")
    return out


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """checkpoint name -> (module holding the parameter, attribute name, full parameter name)."""
    out = {}
    for mod_name, mod in model.named_modules():
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            name = checkpoint_name(full)
            if not name.startswith(TOWER_PREFIXES):
                out.setdefault(name, (mod, pname, full))
    return out


def _parents(model: nn.Module) -> dict[int, nn.Module]:
    return {id(child): mod for mod in model.modules() for child in mod.children()}


def _lora_layer(parent: nn.Module | None, owner: nn.Module):
    """The PEFT LoRA layer wrapping `owner` (as its base_layer), or None."""
    if parent is not None and getattr(parent, "base_layer", None) is owner and hasattr(parent, "get_delta_weight"):
        return parent
    return None


def _lora_delta(layer) -> Tensor | None:
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in getattr(layer, "lora_A", {})]
    return sum(deltas) if deltas else None


def fake_quantizers(model: nn.Module) -> list[tuple[nn.Module, str, FakeQuant]]:
    """(owner module, attribute, FakeQuant) for every weight `prepare_qat` fake-quantized, in module order."""
    out = []
    for mod in model.modules():
        plist = getattr(mod, "parametrizations", None)
        if isinstance(plist, nn.ModuleDict):
            for pname, pl in plist.items():
                out.extend((mod, pname, fq) for fq in pl if isinstance(fq, FakeQuant))
    return out


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable block parameters (LSQ scales / mins; K-quant sub-scales with learnable_ints) of a model
    prepared with learnable_scales=True."""
    return [p for _, _, fq in fake_quantizers(model) for p in fq.parameters(recurse=False)]


def latent_weights(model: nn.Module) -> list[nn.Parameter]:
    """The latent (float) weights behind every fake-quantized weight."""
    return [mod.parametrizations[pname].original for mod, pname, _ in fake_quantizers(model)]


# ---- bad input ----------------------------------------------------------------------------------------------
def refuse_quantized(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """QATError when `model` is prepared or quantized already: QAT needs the float model."""
    if fake_quantizers(model):
        raise QATError("the model is already prepared for QAT (prepare_qat was called on it)")
    if getattr(model, PACKED_ATTR, None) is not None:
        raise QATError("the model is already quantized (convert() was called on it); QAT starts from the float model")
    cfg = getattr(model, "config", None)
    qc = getattr(cfg, "quantization_config", None) or getattr(getattr(cfg, "text_config", None),
                                                              "quantization_config", None)
    if qc or getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise QATError(f"the model is already quantized ({method}); QAT starts from the float (unquantized) model")
    for name, w in weights.items():
        if not w.is_floating_point():
            raise QATError(f"the model is already quantized: {name} is {w.dtype}, not a float tensor")
    # a dequantized model (e.g. loaded from GGUF or compressed-tensors) has few distinct values per block
    looks = []
    for name, w in list(weights.items())[:8]:
        if w.shape[-1] % 32 or w.is_meta or not bool(w.detach().abs().amax() > 0):
            continue
        blocks = w.detach().reshape(-1, 32).sort(-1).values
        distinct = 1 + (blocks.diff(dim=-1) != 0).sum(-1)
        looks.append(float((distinct <= 16).float().mean()) > 0.9)
    if looks and all(looks):
        raise QATError("the model is already quantized: its matrices hold at most 16 distinct values per 32-weight "
                       "block (a dequantized model, e.g. loaded from GGUF or compressed-tensors); QAT starts from the "
                       "float model (pass init= to start from PTQ results)")


# ---- state dict under checkpoint names ----------------------------------------------------------------------
def _state_dict_hooks(owner: nn.Module, pname: str, fq: FakeQuant) -> list:
    inner = f"parametrizations.{pname}."
    names = {inner + "original": pname, **{f"{inner}0.{k}": f"{pname}_qat_{k}" for k in fq.storage}}

    def save(module, state_dict, prefix, local_metadata):
        for a, b in names.items():
            if prefix + a in state_dict:
                state_dict[prefix + b] = state_dict.pop(prefix + a)

    def load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for a, b in names.items():
            if prefix + b in state_dict:
                path, _, leaf = a.rpartition(".")  # a parameter or a buffer (an integer zero point)
                target = getattr(module.get_submodule(path), leaf)
                state_dict[prefix + a] = _shard_like(state_dict.pop(prefix + b), target)

    return [owner.register_state_dict_post_hook(save), owner.register_load_state_dict_pre_hook(load)]


def _shard_like(value: Tensor, param: Tensor) -> Tensor:
    """A whole tensor loaded into an FSDP2-sharded parameter: this rank's shard of it (every rank holds the whole
    value, as set_model_state_dict(full_state_dict=True) gives it). Other values pass unchanged."""
    if not _is_dtensor(param) or _is_dtensor(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def _expose_block_params(owner: nn.Module, pname: str, fq: FakeQuant) -> None:
    """`owner.<pname>_qat_<key>`: the learnable block parameter under its state-dict name, as an attribute, so
    that code walking the state dict's names through the modules (torch.distributed.checkpoint's
    get_model_state_dict, for FSDP) finds it. A property of the class `parametrize` made for this module alone
    (convert removes that class, and the attribute with it)."""
    cls = type(owner)
    for k in fq.storage:
        setattr(cls, f"{pname}_qat_{k}", property(lambda m, k=k: getattr(m.parametrizations[pname][0], k)))


def _cache_hooks(owner: nn.Module, fq: FakeQuant) -> list:
    """A fused expert tensor is indexed once per expert: fake-quantize it once per forward of its module."""

    def start(module, args):
        fq.caching, fq._cache = True, None

    def stop(module, args, output):
        fq.caching, fq._cache = False, None

    return [owner.register_forward_pre_hook(start), owner.register_forward_hook(stop, always_call=True)]


# ---- prepare / convert --------------------------------------------------------------------------------------
def _packed_params(value) -> tuple[Tensor, dict[str, Tensor], object]:
    """A PTQ value (Packed, or one Packed per expert) -> (dequantized weight, block params stacked by rows, fmt)."""
    packs = value if isinstance(value, list) else [value]
    if not packs or not all(isinstance(p, Packed) for p in packs):
        raise QATError(f"init: expected Packed values, got {type(value).__name__}")
    fmt = packs[0].fmt
    w = torch.stack([fmt.dequantize(p) for p in packs]) if isinstance(value, list) else fmt.dequantize(packs[0])
    params = {k: torch.cat([fmt.params(p)[k] for p in packs]) for k in fmt.params(packs[0])}
    return w, params, fmt


@torch.no_grad()
def prepare_qat(model: nn.Module, recipe="int4_g32_sym", *, learnable_scales: bool = False, init=None,
                scale_grad: str = "codes", learnable_ints: bool = False) -> nn.Module:
    """Put fake quantization on every weight the recipe quantizes, in place; returns `model`.

    recipe: a gemmaquant `Recipe` (its plan: weight_format or GGUF mix), a format name (`"int4_g32_sym"`,
        `"int4_g128_asym"`, `"int8"`, `"q4_0"`, `"q4_k"`, ...) or a format object.
    learnable_scales: False: each forward fits the block parameters on the current weights (the format's own
        round-to-nearest fit, no gradient to them). True: LSQ: the float block parameters (scales, mins) are
        trainable parameters initialised from the fit (or from `init`), rounded to their stored precision.
    scale_grad: "codes" (default) or "lsq": the gradient of the learnable block parameters (fake_quant.py).
    learnable_ints: with learnable_scales, also train the integer sub-block scales and mins of the K-quants
        (`fmt.trainable_ints`), rounded and clamped to their 6-bit (Q6_K: 8-bit) range. Other formats: no effect.
    init: start from PTQ results: {checkpoint name: Packed | [Packed per expert]} or a tensor source (e.g.
        `gemmaquant.quantized.QuantizedSource`). Each weight is set to its dequantized PTQ value and the learnable
        block parameters to the PTQ ones, so the prepared model computes exactly the PTQ model at step 0.
    Raises QATError for a model that is already prepared or quantized, a non-Gemma 4 model, a recipe that does
    not fit the model (e.g. K-quants on rows that are not a multiple of 256), init values on another grid.
    """
    if scale_grad not in ("codes", "lsq"):
        raise QATError(f"scale_grad must be 'codes' or 'lsq', not {scale_grad!r}")
    if fake_quantizers(model):
        raise QATError("the model is already prepared for QAT (prepare_qat was called on it)")
    plan = qat_plan(model, recipe)
    owners = _owners(model)
    missing = [n for n in plan if n not in owners]
    if missing:
        raise QATError(f"the model lacks tensor {missing[0]!r} that the recipe quantizes ({len(missing)} missing)")
    refuse_quantized(model, {n: getattr(owners[n][0], owners[n][1]) for n in plan})
    for name in plan:
        w = getattr(owners[name][0], owners[name][1])
        if w.ndim not in (2, 3):
            raise QATError(f"{name}: shape {list(w.shape)} is not a matrix or a fused expert tensor")
    parents = _parents(model)
    for name, fmt in plan.items():
        owner, pname, _ = owners[name]
        w = getattr(owner, pname)
        params = None
        if init is not None:
            value = init[name] if isinstance(init, dict) else init.get(name)
            w_hat, params, got = _packed_params(value)
            if got != fmt:
                raise QATError(f"init: {name} is on {got.name}, the recipe puts it on {fmt.name}")
            if tuple(w_hat.shape) != tuple(w.shape):
                raise QATError(f"init: {name} has shape {list(w_hat.shape)}, the model's is {list(w.shape)}")
            w.copy_(w_hat.to(w.dtype))
        elif learnable_scales:
            params = fmt.params(quantize_rows(w.reshape(-1, w.shape[-1]), fmt))
        fq = FakeQuant(fmt, name, tuple(w.shape), params if learnable_scales else None, learnable_scales, scale_grad,
                       learnable_ints)
        if any(t.device != w.device for t in [*fq.parameters(), *fq.buffers()]):  # (the block parameters are
            fq.to(w.device)                                                       # fit on w's device already)
        lora = _lora_layer(parents.get(id(owner)), owner)
        if lora is not None:
            ref = weakref.ref(lora)
            fq.lora = lambda ref=ref: _lora_delta(ref())
        parametrize.register_parametrization(owner, pname, fq, unsafe=True)
        handles = _state_dict_hooks(owner, pname, fq)
        _expose_block_params(owner, pname, fq)
        if w.ndim == 3:
            handles += _cache_hooks(owner, fq)
        fq.__dict__["_handles"] = handles  # plain attribute: not a submodule, not in the state dict
    return model


@torch.no_grad()
def convert(model: nn.Module) -> dict[str, Packed | list[Packed]]:
    """Replace fake quantization by the quantized weights, in place, and return the Packed values.

    For every fake-quantized weight: the format packs the latent weight (plus a wrapping LoRA adapter's delta) on
    the current grid - the fit of the format, or the learned block parameters rounded to their stored precision -
    the parametrization is removed and the weight becomes the dequantized value. The model then computes what the
    exported model computes. Returns {checkpoint name: Packed | [Packed per expert]}, also kept on the model as
    `model.gemmaquant_packed` for `export_source`.
    """
    found = fake_quantizers(model)
    if not found:
        raise QATError("nothing to convert: the model was not prepared with prepare_qat (or was converted already)")
    parents = _parents(model)
    packed: dict[str, Packed | list[Packed]] = {}
    for owner, pname, fq in found:
        latent = owner.parametrizations[pname].original
        lora = _lora_layer(parents.get(id(owner)), owner)
        delta = _lora_delta(lora) if lora is not None else None
        w = latent.detach().float() + (0 if delta is None else delta.float())
        value = fq.pack(w)
        packs = value if isinstance(value, list) else [value]
        w_hat = torch.stack([fq.fmt.dequantize(p) for p in packs]) if isinstance(value, list) else \
            fq.fmt.dequantize(packs[0])
        for h in fq.__dict__.pop("_handles", []):
            h.remove()
        parametrize.remove_parametrizations(owner, pname, leave_parametrized=False)
        getattr(owner, pname).copy_(w_hat.reshape(latent.shape).to(latent.dtype))
        if delta is not None:  # folded into the quantized weight
            for a in lora.active_adapters:
                if a in lora.lora_B:
                    lora.lora_B[a].weight.zero_()
        packed[fq.name] = value
    setattr(model, PACKED_ATTR, packed)
    if hasattr(model, "get_base_model"):  # PEFT: also on the model merge_and_unload() will return
        setattr(model.get_base_model(), PACKED_ATTR, packed)
    return packed
