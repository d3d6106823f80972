"""The QAT recipe: start from GPTQ, then distill the float model into the fake-quantized one.

    teacher  = the float model (frozen)
    student  = the GPTQ result (gemmaquant.quantize, calibrated on the training text): weights set to the
               dequantized GPTQ values, LSQ block parameters initialised to GPTQ's, so step 0 *is* the PTQ model
    for step t < steps:
        ids     = batch_size random windows of seq_len tokens of the training text (fixed by seed and t)
        loss    = KL(softmax(teacher(ids) / T) || softmax(student(ids) / T)) * T^2, mean over tokens
                  + hidden_weight * mean over layers |h_student - h_teacher|^2 / |h_teacher|^2
                  + router_weight * KL of the router distributions (MoE)
        AdamW on the latent weights (lr), the block parameters (scale_lr: scales, mins, the K-quants' 6-bit
        sub-scales), the float norms / router (float_lr) and the embeddings (embed_lr), the first two in grid
        steps per step (param_groups), linear warm-up then cosine decay to min_lr_ratio, gradient clipping
        avg     = average * avg + (1 - average) * trained values (latent weights, scales, floats, embeddings)
        every save_every steps: model, average + optimizer state to one safetensors file (resumable, no pickle)
    trained values <- avg (the moving average is what is exported)
    convert -> Packed values -> work directory + GGUF + compressed-tensors (the PTQ exporters), held-out report

The embeddings train too: tied to the output head, they are the largest lever on the logits, and they are
exported as the PTQ pipeline exports them (bf16 in compressed-tensors, Q6_K by round-to-nearest in GGUF).
Measured on the trained fixtures (docs/qat.md): most of the gain comes from the scales, the embeddings and the
norms; the latent weights move slowly (a code flips only after a weight travels half a grid step), and larger
weight learning rates flip codes on gradient noise and undo GPTQ's work. Hence the defaults: low rates (a
quarter of a grid step per 100 steps) over 1000 steps, which beat 4x the rates over 500 or 1000 steps on every
fixture. On an MoE model most of the remaining error sits on tokens whose top-k expert choice differs from the
float model's; the router term (weight 160) is what keeps those choices aligned. The fused experts train at 4x
the latent-weight and scale rates of the other matrices (`expert_lr_scale`): on tiny-moe int4 that removes 47%
of GPTQ's KL against 43% at 1x (2x: 46%, 8x: 47%, 16x: 43%), while all weights at 2x give 41%.
An MoE model also trains on four times the batch, 32 sequences a step (`default_batch_size`), with its attention
matrices at 0.25x the rates (`default_attention_lr_scale`): 51.1% of tiny-moe int4's GPTQ KL removed over five
seeds, against 49.9% at 1x.
The grid is one format (`bits`, `weight_format`) or a llama.cpp mix (`gguf_type="Q4_K_M"`: every weight on the
block type llama-quantize gives it); `embedding_type` puts the embedding tables on the GGUF's token_embd grid
too (`FloatOnGrid`), so that the GGUF holds exactly the trained model. `per_layer_embed_lr=0` freezes E2B's and
E4B's per-layer embedding tables, half of their parameters, and the student shares them with the teacher
(`shared_tables`): about 24 bytes per parameter fewer for that half, at some cost in quality (docs/qat.md).
Trained (the default), the table trains on the rows of the training text's tokens only, the others shared with
the teacher (`SparseRowsEmbedding`): the same result, since the other rows never get a gradient.
Never silently worse (issue 29): part of the text is held out, the GPTQ start and the training are evaluated on it
as they go, and the best of them is exported (heldout.py); steps and rates left unset follow the amount of text
(schedule.py).
`qat_train` is what `gemmaquant qat MODEL --bits 4 --data FILE [--steps N] --out DIR` runs.
The loss and its hooks are in distill.py; the moving average and the resumable checkpoint in state.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gemmaquant.device import to_host
from gemmaquant.export.gguf_names import is_expert
from gemmaquant.formats import FORMATS
from gemmaquant.progress import progress as progress_lines, stage
from gemmaquant.qat.fake_quant import grid_sensitivity, quantize_rows
from gemmaquant.qat.distill import Taps, accumulate_gradients
from gemmaquant.qat.prepare import QATError, convert, prepare_qat
from gemmaquant.qat.state import WeightAverage, load_state, save_state

BITS_FORMAT = {8: "int8", 4: "int4_g32_sym", 3: "int3_g32_sym", 2: "int2_g32_asym"}
# QAT format -> (GGUF type, compressed-tensors scheme) that hold its trained grid exactly (None: no such export).
# A GGUF block format (weight_format="q4_0", "q4_k", ...) trains on llama.cpp's own grid: Q4_0 uses all 16 codes
# and fp16 scales, where int4_g32_sym leaves the code -8 unused and keeps bf16 scales (vLLM's W4A16 layout).
EXPORTS = {"int4_g32_sym": ("Q4_0", "W4A16"), "int8": ("Q8_0", "W8A16"),
           **{name: (fmt.type_name, None) for name, fmt in FORMATS.items() if hasattr(fmt, "type_name")}}
CHECKPOINT = "qat-checkpoint.safetensors"


@dataclass(frozen=True)
class QATRecipe:
    bits: int = 4
    weight_format: str | None = None  # default: BITS_FORMAT[bits]
    gguf_type: str | None = None  # instead: each weight on the block type this llama.cpp mix gives it (Q4_K_M, ...)
    embedding_type: str | None = None  # train the embedding tables on this GGUF type, the GGUF's token_embd type
    steps: int | None = None  # None: from the training text (gemmaquant.qat.schedule: up to 1000, at least 400)
    batch_size: int | None = None  # sequences per step; None: default_batch_size(config), 32 on an MoE model, else 8
    micro_batch: int | None = None  # windows per forward/backward (gradient accumulation); None: the whole batch
    seq_len: int = 128
    lr: float | None = None  # latent weights, in grid steps per step (see param_groups); None: LR, raised for a
    # run shorter than 1000 steps (gemmaquant.qat.schedule.rate_scale)
    scale_lr: float | None = None  # learnable block scales / mins, relative to the grid step; None: SCALE_LR, so
    # raised too
    float_lr: float = 3e-4  # norms, router, per-layer projections kept in float
    embed_lr: float = 2e-4  # token embeddings, tied to the output head; 0 freezes them
    per_layer_embed_lr: float | None = None  # per-layer embedding tables (E2B, E4B); None: embed_lr; 0 freezes
    # them. Either way the student shares the teacher's table; trained, only the rows of the training text's tokens
    # are its own (SparseRowsEmbedding)
    warmup: int = 10
    min_lr_ratio: float = 0.1
    temperature: float = 1.0
    hidden_weight: float = 1.0  # relative squared error of every layer's output (0: logits KL only)
    router_weight: float = 160.0  # KL of the router distributions (MoE models only)
    expert_lr_scale: float = 4.0  # the fused experts' latent-weight and scale rates, relative to lr / scale_lr
    attention_lr_scale: float | None = None  # the attention matrices' rates, relative to lr / scale_lr; None:
    # for_model, 0.25 on an MoE model, 1 otherwise
    grad_clip: float = 1.0
    learnable_scales: bool = True
    learnable_ints: bool = True  # also train the K-quants' 6-bit sub-block scales and mins (gguf_type, q4_k, ...)
    scale_grad: str = "codes"  # or "lsq" (see gemmaquant.qat.fake_quant)
    calib_samples: int = 32  # GPTQ calibration windows from the training text
    calib_seq_len: int = 256
    save_every: int = 50
    seed: int = 0
    average: float = 0.99  # decay of the moving average that is exported (0: the last step); see average_decay
    select_windows: int = 16  # held-out windows of seq_len tokens for best-state selection (heldout.py); 0: none
    eval_every: int | None = None  # steps between held-out evaluations; None: a twentieth of the run
    heldout_share: float = 0.1  # of the training text held out for the selection when no held-out file is given

    def __post_init__(self):
        from gemmaquant.validate import check_fields

        check_fields(self, QATError, qat_ranges())
        for k in ("gguf_type", "embedding_type"):
            if getattr(self, k) is not None:
                object.__setattr__(self, k, getattr(self, k).upper())
        if self.gguf_type is not None and self.weight_format is not None:
            raise QATError(f"name a weight_format ({self.weight_format}) or a gguf_type ({self.gguf_type}), not both")
        if self.weight_format is None and self.gguf_type is None and self.bits not in BITS_FORMAT:
            raise QATError(f"bits={self.bits}: choose one of {sorted(BITS_FORMAT)} (or name a weight_format)")
        for k in ("steps", "batch_size", "seq_len", "calib_samples", "calib_seq_len", "save_every"):
            if getattr(self, k) is not None and getattr(self, k) <= 0:
                raise QATError(f"{k} must be positive, got {getattr(self, k)}")
        if self.micro_batch is not None and not 0 < self.micro_batch <= (self.batch_size or self.micro_batch):
            raise QATError(f"micro_batch must be in 1..batch_size ({self.batch_size}), got {self.micro_batch}")
        if self.per_layer_embed_lr is not None and self.per_layer_embed_lr < 0:
            raise QATError(f"per_layer_embed_lr must be >= 0 (0 freezes the tables), got {self.per_layer_embed_lr}")
        for k in ("expert_lr_scale", "attention_lr_scale"):
            if getattr(self, k) is not None and getattr(self, k) < 0:
                raise QATError(f"{k} multiplies rates: >= 0, got {getattr(self, k)}")
        if self.select_windows < 0 or (self.eval_every is not None and self.eval_every <= 0):
            raise QATError(f"select_windows >= 0 (0: no held-out selection) and eval_every > 0 are required, got "
                           f"{self.select_windows} and {self.eval_every}")
        if not 0 < self.heldout_share < 1:
            raise QATError(f"heldout_share is a share of the training text in (0, 1), got {self.heldout_share}")
        if not 0 <= self.average < 1:
            raise QATError(f"average is an EMA decay in [0, 1), got {self.average}")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1 or self.temperature <= 0:
            raise QATError("warmup >= 0, 0 <= min_lr_ratio <= 1 and temperature > 0 are required")

    @property
    def format_name(self) -> str:
        return self.gguf_type or self.weight_format or BITS_FORMAT[self.bits]

    def exports(self) -> tuple[str, str | None] | None:
        """(GGUF type, compressed-tensors scheme) that hold the trained grid exactly; None: no such export."""
        if self.gguf_type is not None:  # a mix: the GGUF of that type, whose block types are the trained ones
            return self.gguf_type, None
        return EXPORTS.get(self.format_name)


LR, SCALE_LR = 0.0025, 7.5e-4  # the rates measured at 1000 steps (docs/qat.md)


def rates(r: QATRecipe) -> tuple[float, float]:
    """(lr, scale_lr) of the recipe, the 1000-step defaults where unset (for_data sets them from the run length)."""
    return (LR if r.lr is None else r.lr), (SCALE_LR if r.scale_lr is None else r.scale_lr)


def qat_ranges() -> dict:
    """What each QATRecipe value may be beyond its annotated type (gemmaquant.validate.check_fields); the checks
    that relate two values are in QATRecipe.__post_init__."""
    from gemmaquant.export.gguf_mix import BLOCK_TYPES, FLOAT_TYPES
    from gemmaquant.recipe import recipe_ranges
    from gemmaquant.validate import at_least, one_of, positive

    rates = {k: at_least(0.0, ">= 0 (0 freezes what it trains)") for k in ("lr", "scale_lr", "float_lr", "embed_lr")}
    return {**rates, "weight_format": recipe_ranges()["weight_format"], "gguf_type": recipe_ranges()["gguf_type"],
            "embedding_type": (lambda v: v.upper() in BLOCK_TYPES + FLOAT_TYPES,
                               f"a GGUF type: {', '.join(BLOCK_TYPES + FLOAT_TYPES)}"),
            "grad_clip": positive(), "hidden_weight": at_least(0.0), "router_weight": at_least(0.0),
            "scale_grad": one_of(("codes", "lsq")), "seed": at_least(0)}


def has_experts(config) -> bool:
    """A model with routed experts; `config` is gemmaquant's, or a transformers one (its text_config)."""
    return bool(getattr(getattr(config, "text_config", None) or config, "enable_moe_block", False))


def default_batch_size(config) -> int:
    """Sequences per step when the recipe does not say: 32 on a model with routed experts, 8 otherwise. Each
    expert's gradient comes only from the tokens routed to it (a quarter of the batch on tiny-moe, top-2 of 8;
    a sixteenth on 26B-A4B, top-8 of 128), so an MoE model gets the larger batch: on tiny-moe int4 batch 32
    removes 49.9% of GPTQ's KL on average over five seeds (48.2-51.9%) against 48.4% over three at batch 8
    (docs/qat.md), at four times the compute per step. The dense fixtures reach half at batch 8 and were not
    run at 32."""
    return 32 if has_experts(config) else 8


def default_attention_lr_scale(config) -> float:
    """The attention matrices' rates relative to the others' when the recipe does not say: 0.25 on a model with
    routed experts, 1 otherwise. On tiny-moe int4 (batch 32) every attention matrix at 0.25x removes 51.1% of
    GPTQ's KL on average over five seeds (50.4-51.6%) against 49.9% at 1x (48.2-51.9%), mostly on the tokens whose
    expert choice flips (docs/qat.md, session 20); the dense fixtures were not run with it."""
    return 0.25 if has_experts(config) else 1.0


def for_model(r: QATRecipe, config) -> QATRecipe:
    """The recipe with the fields left to the model (None) resolved: batch_size, attention_lr_scale."""
    if r.batch_size is None:
        r = dataclasses.replace(r, batch_size=default_batch_size(config))
    if r.attention_lr_scale is None:
        r = dataclasses.replace(r, attention_lr_scale=default_attention_lr_scale(config))
    return r


def default_heldout() -> Path:
    from importlib import resources

    return Path(str(resources.files("gemmaquant.calibration") / "data" / "heldout.txt"))


# ---- pieces -------------------------------------------------------------------------------------------------
def token_stream(tokenizer_dir: str | os.PathLike, data: str | os.PathLike, bos: int = 2,
                 what: str = "training data") -> Tensor:
    """All documents of `data` (.txt: blank-line or <eos> separated; .jsonl: "text" fields), BOS before each."""
    from gemmaquant.calibration import CalibrationError, load_tokenizer, read_texts

    try:
        texts = read_texts(Path(data))
    except CalibrationError as e:
        raise QATError(f"{what}: {e}") from None
    tok = load_tokenizer(tokenizer_dir)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int64)


def check_data(stream: Tensor, r: QATRecipe, data) -> None:
    need = r.batch_size * r.seq_len + 1
    if stream.numel() < need:
        raise QATError(f"{data}: {stream.numel()} tokens of training data, too short for one batch of "
                       f"{r.batch_size} x {r.seq_len} tokens ({need} needed); give more text or lower "
                       f"batch_size / seq_len")


def batch_at(stream: Tensor, step: int, r: QATRecipe) -> Tensor:
    """[batch_size, seq_len] windows at random offsets, a function of (seed, step) only (exact resume)."""
    g = torch.Generator().manual_seed(r.seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - r.seq_len + 1, (r.batch_size,), generator=g)
    return torch.stack([stream[s:s + r.seq_len] for s in starts.tolist()])


def lr_factor(step: int, r: QATRecipe) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_lr_ratio at the last step."""
    if step < r.warmup:
        return (step + 1) / (r.warmup + 1)
    t = (step - r.warmup) / max(r.steps - r.warmup - 1, 1)
    return r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def grid_step(fq) -> float:
    """Mean |scale| of a fake quantizer's current grid: the distance between neighbouring grid points."""
    params = fq.block_params()
    if params is None:
        return 0.0
    scale = fq.fmt.grid({k: v.detach().float() for k, v in params.items()})[0]
    return float(scale.abs().mean())


def param_groups(model: nn.Module, r: QATRecipe) -> list[dict]:
    """AdamW groups: for each quantized weight, its latent weight with lr = r.lr * grid step, and each of its
    learnable block parameters with lr = r.scale_lr * grid step / (how far one unit of it moves the grid,
    `grid_sensitivity`). Adam moves every element by about lr per step, so all these rates are in grid steps per
    step, whatever the format or bit width: an int4 group scale or a Q4_0 scale moves at r.scale_lr * its own
    size, a Q4_K super-block scale (which multiplies 6-bit sub-scales of about 50) 50 times slower in its own
    units, its sub-scales (with learnable_ints) at about 50 * r.scale_lr units per step. Then the small float
    tensors (norms, router) at r.float_lr, the token embeddings at r.embed_lr and the per-layer ones at
    per_layer_lr(r) (0 freezes them)."""
    from gemmaquant.qat.prepare import fake_quantizers

    groups, taken = [], set()
    lr, scale_lr = rates(r)
    attention = for_model(r, model.config).attention_lr_scale  # (as qat_train resolves it, where the recipe is silent)
    for mod, pname, fq in fake_quantizers(model):
        latent = mod.parametrizations[pname].original
        step = grid_step(fq)
        if step == 0.0:  # fit mode: the grid of the current weights
            p = quantize_rows(latent.detach().reshape(-1, latent.shape[-1]), fq.fmt)
            step = float(fq.fmt.grid(fq.fmt.params(p))[0].float().abs().mean())
        step *= r.expert_lr_scale if is_expert(fq.name) else 1.0
        step *= attention if ".self_attn." in f".{fq.name}" else 1.0
        latent.requires_grad_(True)
        groups.append({"params": [latent], "lr": lr * step, "name": f"{fq.name}"})
        block = dict(fq.named_parameters(recurse=False))
        moves = grid_sensitivity(fq.fmt, fq.block_params()) if block else {}
        for k, p in block.items():  # one unit of k moves the grid moves[k]: lr in grid steps per step for all
            groups.append({"params": [p], "lr": scale_lr * step / (moves[k] or 1.0), "name": f"{fq.name}:{k}"})
        taken |= {id(latent), *map(id, block.values())}
    floats, embeds, per_layer = [], [], []
    for n, p in model.named_parameters():
        if id(p) not in taken:
            (per_layer if "embed_tokens_per_layer" in n else embeds if "embed_tokens" in n else floats).append(p)
    for name, ps, lr in (("float", floats, r.float_lr), ("embeddings", embeds, r.embed_lr),
                         ("per-layer embeddings", per_layer, per_layer_lr(r))):
        for p in ps:
            p.requires_grad_(lr > 0)
        if ps and lr > 0:
            groups.append({"params": ps, "lr": lr, "name": name})
    return groups


def per_layer_lr(r: QATRecipe) -> float:
    return r.embed_lr if r.per_layer_embed_lr is None else r.per_layer_embed_lr


def shared_tables(teacher: nn.Module) -> list[Tensor]:
    """The teacher's tensors the student shares instead of copying: the per-layer embedding table. On E2B and E4B
    it is half of all parameters (35 x 256 and 42 x 256 columns of 262,144 rows). Frozen (per_layer_embed_lr=0),
    the student uses it as it is; trained, only the rows of the training text's tokens are the student's own
    (`SparseRowsEmbedding`): the same training, without a copy, gradient, AdamW moments and average of the rest."""
    ple = getattr(teacher, "embed_tokens_per_layer", None)
    return [ple.weight] if ple is not None else []


def train_used_rows(student: nn.Module, stream: Tensor, r: QATRecipe) -> None:
    """Put a trained per-layer table on the rows of the tokens in `stream` (the training text)."""
    from gemmaquant.qat.sparse_rows import SparseRowsEmbedding

    if getattr(student, "embed_tokens_per_layer", None) is not None and per_layer_lr(r) > 0:
        student.embed_tokens_per_layer = SparseRowsEmbedding(student.embed_tokens_per_layer.weight, stream)


def embedding_formats(config, type_name: str) -> dict[str, object]:
    """{module name: format} of the embedding tables (token, and per-layer where the model has them) under GGUF
    type `type_name`, as llama-quantize --token-embedding-type stores them; {} for a float type. QATError when
    the type does not fit the rows."""
    from gemmaquant.export.gguf_mix import FLOAT_TYPES, MixError, gguf_mix_plan
    from gemmaquant.formats import get_format

    try:
        plan = gguf_mix_plan(config, "Q8_0", token_embd_type=type_name)
    except MixError as e:
        raise QATError(f"embedding_type: {e}") from None
    if type_name in FLOAT_TYPES:  # stored as floats: no grid to train on
        return {}
    return {name: get_format(plan[f"{name}.weight"].lower()) for name in ("embed_tokens", "embed_tokens_per_layer")
            if f"{name}.weight" in plan}


def embeddings_on_grid(model: nn.Module, type_name: str) -> list[nn.Module]:
    """Put the embedding tables on GGUF type `type_name`'s grid for training (`FloatOnGrid`); returns their
    modules. The tied token table is also the output head, so the head trains on the grid the GGUF file holds."""
    from gemmaquant.qat.fake_quant import FloatOnGrid

    from gemmaquant.qat.sparse_rows import SparseRowsEmbedding

    owners = []
    for name, fmt in embedding_formats(model.config, type_name).items():
        owner = getattr(model, name)
        if isinstance(owner, SparseRowsEmbedding):  # puts its looked-up rows on the grid itself
            owner.fmt = fmt
            continue
        parametrize.register_parametrization(owner, "weight", FloatOnGrid(fmt, f"{name}.weight"), unsafe=True)
        owners.append(owner)
    return owners


def average_decay(r: QATRecipe) -> float:
    """The recipe's EMA decay, capped so that the average spans at most the last fifth of the run
    (1 / (1 - decay) <= steps / 5): 0.99 from 500 steps on, as measured; a short run is not left at its start."""
    return max(0.0, min(r.average, 1.0 - 5.0 / r.steps))


# ---- the recipe ---------------------------------------------------------------------------------------------
def _float_model(model, tokenizer_dir):
    """-> (reference Gemma4 in fp32, tokenizer dir, display name) from an alias / path / model object."""
    import gemmaquant
    from gemmaquant.model.gemma4 import Gemma4

    if isinstance(model, nn.Module):
        from gemmaquant.quantize import ModuleSource

        src = ModuleSource(model, tokenizer_dir)
        m = Gemma4(src.config)
        m.load_state_dict({**src.global_state(torch.float32),
                           **{f"layers.{i}.{k}": v for i in range(src.config.num_hidden_layers)
                              for k, v in src.layer_state(i, torch.float32).items()}}, strict=True)
        if src.path is None:
            raise QATError("no tokenizer: pass tokenizer_dir= (the checkpoint directory with tokenizer.json)")
        return m.eval(), Path(src.path), Path(src.path).name
    from gemmaquant.hub import resolve

    path = resolve(model)
    return gemmaquant.load(path, dtype=torch.float32).eval(), Path(tokenizer_dir or path), Path(str(model)).name


def _device_for(model, device) -> torch.device:
    """qat_train's device: `device` as named, else a model object's own, else 'auto'."""
    from gemmaquant.device import model_device, resolve_device

    if device is None and isinstance(model, nn.Module):
        return model_device(model)
    return resolve_device(device)


def qat_train(model, bits: int = 4, data: str | os.PathLike | None = None, steps: int | None = None,
              out: str | os.PathLike | None = None, *, tokenizer_dir: str | os.PathLike | None = None,
              heldout: str | os.PathLike | None = None, eval_seqs: int = 16, eval_seq_len: int = 128,
              export: bool = True, export_last: bool = False, progress: bool | None = None,
              stop_after_step: int | None = None, device: str | torch.device | None = None,
              **recipe_overrides) -> dict:
    """Quantization-aware training of a Gemma 4 onto `bits`-bit weights; returns a summary dict ("text" included).

    model: alias (`tiny-moe`, `26b-a4b`, ...), checkpoint directory, or a Gemma 4 model object (then pass
        tokenizer_dir unless it is a transformers model loaded from a local directory).
    data: the training text (.txt, documents separated by blank lines or `<eos>` lines; or .jsonl), also
        GPTQ's calibration text. `recipe_overrides`: any QATRecipe field (lr, batch_size, seq_len, ...).
    steps: None sets the run's length from the amount of text (gemmaquant.qat.schedule).
    heldout: a held-out text file: the best-state selection evaluates on it (else on the last heldout_share of
        `data`, then not trained on), and the report's held-out quality is measured on it (else on the bundled
        held-out set). The exported files are the state with the lowest held-out KL among the GPTQ start and
        the evaluations every eval_every steps (gemmaquant.qat.heldout); export_last=True exports the last
        state instead. select_windows=0 turns the selection off (the last state is exported).
    out: the output directory:
        .gemmaquant-work/                GPTQ's resumable work directory, and qat-checkpoint.safetensors
        quantized/                       the QAT result in the work-directory layout (QuantizedSource), any format
        <name>-Q4_0.gguf, safetensors/   GGUF and compressed-tensors exports (4 and 8 bits)
        qat-report.json                  loss curve, held-out KL / top-1 / perplexity of GPTQ and QAT vs float,
                                         the share of GPTQ's KL removed with its 95% interval (gap_removed),
                                         the held-out selection (which state was exported, and why)
    Running the same call again after an interruption resumes from the last saved step (same result).
    device: where the teacher, the student and the training live ('auto', 'cpu', 'cuda', 'cuda:N'); None: the
        device of a model object's parameters, 'auto' for an alias or a path. The results come back to host memory.
    """
    from gemmaquant.eval.metrics import compare_logits, heldout_ids, share_removed
    from gemmaquant.quantize import quantize
    from gemmaquant.quantized import QuantizedSource
    from gemmaquant.recipe import Recipe

    if data is None or out is None:
        raise QATError("qat_train needs data= (training text) and out= (output directory)")
    r = QATRecipe(bits=bits, steps=steps, **recipe_overrides)
    out = Path(out)
    t0 = time.time()
    teacher, tok_dir, name = _float_model(model, tokenizer_dir)
    dev = _device_for(model, device)
    teacher = teacher.to(dev)  # a copy of the caller's model (_float_model): theirs stays where it is
    r = for_model(r, teacher.config)
    for p in teacher.parameters():
        p.requires_grad_(False)
    stream = token_stream(tok_dir, data, teacher.config.bos_token_id)
    check_data(stream, r, data)
    from gemmaquant.qat.heldout import HeldoutSelection, selection_text, split_heldout
    from gemmaquant.qat.schedule import exposure, for_data

    train = stream
    if r.select_windows > 0:  # held-out windows for best-state selection; the rest trains
        held = (None if heldout is None else
                token_stream(tok_dir, heldout, teacher.config.bos_token_id, "held-out text"))
        train, select_ids, select_source = split_heldout(stream, r, held, data, heldout)
    r = for_data(r, train.numel())

    # 1. GPTQ, calibrated on the training text (resumable, in out/.gemmaquant-work)
    n_cal = min(r.calib_samples, stream.numel() // r.calib_seq_len)
    ptq_recipe = Recipe(name=f"qat-{r.format_name}-gptq", method="gptq",
                        **({"gguf_type": r.gguf_type} if r.gguf_type else {"weight_format": r.format_name}),
                        calibration=str(Path(data).resolve()), n_samples=max(n_cal, 1),
                        seq_len=min(r.calib_seq_len, stream.numel()))
    from gemmaquant.qat.prepare import qat_plan

    qat_plan(teacher, ptq_recipe)  # a recipe that does not fit the model fails here, before any work
    if r.embedding_type:
        embedding_formats(teacher.config, r.embedding_type)  # so does an embedding type that does not fit
    # (quantize() reads the teacher layer by layer and leaves it as it was: no copy needed)
    shared = shared_tables(teacher)  # the student's are the teacher's own tensors: not copied, not saved
    stage(f"QAT 1/4: GPTQ start on {ptq_recipe.n_samples} x {ptq_recipe.seq_len} tokens of {data}", progress)
    ptq = quantize(teacher, ptq_recipe, out=out, tokenizer_dir=tok_dir, progress=progress)
    ptq_src = QuantizedSource(ptq.work_dir)

    # 2. the student: GPTQ's weights and block parameters under fake quantization
    student = copy.deepcopy(teacher, memo={id(t): t for t in shared})
    prepare_qat(student, ptq_recipe, learnable_scales=r.learnable_scales, init=ptq_src, scale_grad=r.scale_grad,
                learnable_ints=r.learnable_ints)
    train_used_rows(student, train, r)
    embeddings = embeddings_on_grid(student, r.embedding_type) if r.embedding_type else []
    student.train()
    fingerprint = json.dumps({"recipe": dataclasses.asdict(r), "ptq": ptq.calibration_sha256,
                              "data_tokens": int(stream.numel()), "model": name}, sort_keys=True)
    ckpt = Path(ptq.work_dir) / CHECKPOINT
    opt = torch.optim.AdamW(param_groups(student, r), betas=(0.9, 0.95), weight_decay=0.0)
    if any(t.requires_grad for t in shared):  # training it would write into the teacher
        raise RuntimeError("a tensor the student shares with the teacher is set to train")
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    decay = average_decay(r)
    average = WeightAverage(student, decay) if decay > 0 else None
    skip = {k for k, v in student.state_dict().items() if any(v.data_ptr() == t.data_ptr() for t in shared)}
    start, log = (load_state(ckpt, student, opt, fingerprint, average, skip) if ckpt.is_file() else (0, []))
    select = HeldoutSelection(teacher, select_ids, ptq.work_dir, r, select_source) if r.select_windows else None
    if select is not None and start:
        select.restore(ckpt)
    elif select is not None:
        stage(f"QAT: held-out KL of the GPTQ start on {select_ids.shape[0]} x {r.seq_len} tokens", progress)
        select.evaluate(0, student, average)
    extra = select.state if select is not None else dict

    # 3. distillation
    stage(f"QAT 2/4: distillation from the float model, {r.steps} steps of {r.batch_size} x {r.seq_len} tokens"
          + (f" (resuming after step {start})" if start else ""), progress)
    bar = progress_lines(range(start, r.steps), desc="qat", unit="step", initial=start, total=r.steps,
                         enabled=progress)
    t_taps = Taps(teacher, r.hidden_weight > 0, r.router_weight > 0)
    s_taps = Taps(student, r.hidden_weight > 0, r.router_weight > 0)
    try:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            loss, parts = accumulate_gradients(student, teacher, batch_at(train, step, r).to(dev), s_taps, t_taps,
                                               r)
            gnorm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], r.grad_clip)
            f = lr_factor(step, r)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            opt.step()
            if average is not None:
                average.update()
            log.append({"step": step, "loss": round(loss, 6), **{k: round(v, 6) for k, v in parts.items()},
                        "grad_norm": round(float(gnorm), 4), "lr_factor": round(f, 5)})
            bar.set_postfix(kl=f"{parts['kl']:.4f}")
            done = step + 1
            stop = stop_after_step is not None and done > stop_after_step
            improved = select is not None and select.due(done, r.steps) and select.evaluate(done, student, average)
            if improved:
                bar.set_postfix(kl=f"{parts['kl']:.4f}", best=f"{select.best_kl:.5f}@{done}")
            if done % r.save_every == 0 or done == r.steps or stop or improved:  # (the best file is never ahead)
                save_state(ckpt, student, opt, done, fingerprint, log, average, skip, extra())
            if stop:
                return {"stopped_at_step": done, "log": log, "text": f"QAT stopped after step {done}"}
    finally:
        t_taps.remove(), s_taps.remove()

    # 4. convert, write, export
    stage(f"QAT 3/4: writing {out / 'quantized'}" + (" and the exports" if export and r.exports() else ""),
          progress)
    if select is not None and not export_last:
        select.apply_best(student)  # the values of the best held-out evaluation, the GPTQ start included
    elif average is not None:
        average.apply()
    opt.zero_grad(set_to_none=True)
    opt.state.clear()  # the gradients, AdamW moments and average are done with: freed before the export's copies
    average = None
    student.eval()
    from gemmaquant.qat.sparse_rows import SparseRowsEmbedding

    if isinstance(getattr(student, "embed_tokens_per_layer", None), SparseRowsEmbedding):
        student.embed_tokens_per_layer = student.embed_tokens_per_layer.materialize()
    for owner in embeddings:  # the tables become their values on the grid, which the GGUF stores exactly
        if any(owner.parametrizations.weight.original is t for t in shared):  # (not in place: the teacher's)
            value = owner.weight.detach().clone()
            parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)
            owner.weight = nn.Parameter(value, requires_grad=False)
        else:
            parametrize.remove_parametrizations(owner, "weight", leave_parametrized=True)
    packed = to_host(convert(student))
    from gemmaquant.qat.source import ModelSource, dequantized_model, write_work_dir

    meta = {**ptq_src.metadata, "qat": json.dumps({**dataclasses.asdict(r), "data": str(data)}, sort_keys=True)}
    src = ModelSource(student, packed, tok_dir, meta)
    files = {"quantized": str(write_work_dir(src, out / "quantized"))}
    if export and r.exports() is not None:
        from gemmaquant.export import export_compressed_tensors, export_gguf

        gguf_type, scheme = r.exports()
        files["gguf"] = str(export_gguf(src, out / f"{name}-{gguf_type}.gguf", type=gguf_type, overwrite=True,
                                        token_embd_type=r.embedding_type))
        if scheme is not None:
            files["safetensors"] = str(export_compressed_tensors(src, out / "safetensors", scheme=scheme,
                                                                 group_size=32, overwrite=True))

    # 5. held-out quality of GPTQ and QAT against the float model
    report = {"model": name, "recipe": dataclasses.asdict(r), "format": r.format_name, "steps": r.steps,
              "kl_first": log[0]["kl"] if log else None, "kl_last": log[-1]["kl"] if log else None,
              "kl_head": window_mean(log[:TRAIN_WINDOW]), "kl_tail": window_mean(log[-TRAIN_WINDOW:]),
              "log": log, "files": files, "work_dir": str(Path(ptq.work_dir)), "ptq_recipe": ptq_recipe.to_dict(),
              "exposure": exposure(r, int(train.numel()), sum(p.numel() for p in teacher.parameters()))}
    if select is not None:
        report["selection"] = select.summary(export_last)
    if eval_seqs > 0:
        stage(f"QAT 4/4: held-out KL of GPTQ and QAT against the float model ({eval_seqs} x {eval_seq_len} "
              f"tokens)", progress)
        ids = heldout_ids(tok_dir, heldout or default_heldout(), eval_seqs, eval_seq_len, teacher.config.bos_token_id)
        ids = ids.to(dev)
        ptq_model = dequantized_model(ptq_src).to(dev)
        if r.embedding_type:  # the same embedding rounding as QAT's: what GPTQ's GGUF of that type would hold
            with torch.no_grad():
                for name, fmt in embedding_formats(ptq_model.config, r.embedding_type).items():
                    w = getattr(ptq_model, name).weight
                    w.copy_(fmt.dequantize(quantize_rows(w, fmt)).to(w.dtype))
        # (routing: on an MoE model, how much of each model's KL is expert choices that flip)
        report["ptq"] = compare_logits(teacher, ptq_model, ids, windows=True, routing=True)
        report["qat"] = compare_logits(teacher, as_exported(src).to(dev), ids, windows=True, routing=True)
        if eval_seqs >= 2 and report["ptq"]["kl_mean"] > 0:  # the share of GPTQ's KL QAT removes, with its 95% CI
            report["gap_removed"] = share_removed(report["ptq"]["kl_windows"], report["qat"]["kl_windows"])
    report["seconds"] = round(time.time() - t0, 2)
    report["text"] = _summary(report, out, selection_text(report["selection"]) if select is not None else [])
    (out / "qat-report.json").write_text(json.dumps(report, indent=2, default=str))
    from gemmaquant.eval.qat_report import save_qat_report

    save_qat_report(report, out)  # qat-report.md and qat-report.html, like the PTQ report
    return report


def as_exported(src, float_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The QAT result as the exporters write it: quantized weights on their grid, the trained float tensors
    (norms, router, embeddings) rounded to the checkpoint dtype, so the report measures the shipped model."""
    from gemmaquant.qat.source import dequantized_model

    model = dequantized_model(src)
    quantized = src.quantized_names()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in quantized:
                p.copy_(p.to(float_dtype).float())
    return model


TRAIN_WINDOW = 20  # steps averaged for the report's training KL (one batch's varies by ~18% on tiny-moe)


def window_mean(entries: list[dict]) -> float | None:
    """Mean training KL over some log entries (None for none)."""
    return round(sum(e["kl"] for e in entries) / len(entries), 6) if entries else None


def _summary(rep: dict, out: Path, selection: list[str] = ()) -> str:
    from gemmaquant.eval.routing import routing_text

    lines = [f"QAT of {rep['model']} onto {rep['format']}: {rep['steps']} steps, training KL "
             f"{rep['kl_head']} -> {rep['kl_tail']} (mean of the first and last {TRAIN_WINDOW} steps), "
             f"{rep['seconds']:.0f} s"]
    if "qat" in rep:
        p, q = rep["ptq"], rep["qat"]
        lines.append(f"  held-out KL to the float model: GPTQ {p['kl_mean']:.5f} -> QAT {q['kl_mean']:.5f}; top-1 "
                     f"{100 * p['top1']:.1f}% -> {100 * q['top1']:.1f}%; perplexity {p['ppl_test']:.2f} -> "
                     f"{q['ppl_test']:.2f} (float {q['ppl_ref']:.2f})")
        for label, m in (("GPTQ", p), ("QAT", q)):
            if m.get("routing"):
                lines.append(f"  {label} {routing_text(m)}")
    lines += selection
    if "gap_removed" in rep:
        g = rep["gap_removed"]
        lines.append(f"  QAT removes {100 * g['share']:.1f}% of GPTQ's KL (95% CI {100 * g['ci95'][0]:.1f}-"
                     f"{100 * g['ci95'][1]:.1f}% over {g['windows']} held-out windows)")
    for kind, path in rep["files"].items():
        lines.append(f"  {kind:12s} {path}")
    lines.append(f"  report       {out / 'qat-report.json'} (.md, .html)")
    return "\n".join(lines)
