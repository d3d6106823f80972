"""Zero-padding an MLP's intermediate width to the 256-element block: the same function, new GGUF types.

Gemma 4 26B-A4B's expert width 704 and dense width 2112 are not multiples of 256, so no K-quant or IQ4_XS fits a
row of `ffn_down` (ne0 = the intermediate width) and llama.cpp falls back to Q5_0 / Q8_0. Padding the width I to
I' = ceil(I / 256) * 256 makes every type possible there:

    gate_proj, up_proj [I, H]  -> [I', H]   I' - I zero output rows
    down_proj          [H, I]  -> [H, I']   I' - I zero input columns
    experts.gate_up_proj [E, 2I, H] -> [E, 2I', H] (the gate half and the up half each padded; gate rows first)
    experts.down_proj    [E, H, I]  -> [E, H, I']

Why the function is unchanged exactly: the padded units compute gelu_tanh(0 . x) * (0 . x) = gelu_tanh(0) * 0 = 0,
and down_proj's padded columns multiply those zeros. Quantization keeps it exact: a zero row of gate/up (and a zero
sub-block of down) quantizes to exactly zero on every GGUF grid (every block scale is 0), and whatever value
down's padded columns dequantize to, they meet activations that are exactly zero (llama.cpp quantizes the
activations to Q8_0 / Q8_K blocks, where a zero is exactly zero, and the K-quants' min term uses the block sums
of those activations, zero too). GPTQ sees the padded columns of down as dead (zero Hessian rows and columns:
their weights are set to 0 and carry no error, gemmaquant.algorithms.gptq).

The cost: I' / I more bytes in all three matrices (704 -> 768 and 2112 -> 2304: +9%). The `--target-bpw` solver
weighs it (mix_search.solve_padded); `--pad-to-block` asks for it with a fixed mix.

Padding is per kind, across all layers: "mlp" (the dense MLP) and "experts". llama.cpp reads the expert width as
one value for the whole model (`n_ff_exp()`), and gemmaquant's config holds one dense width, so a kind is padded
in every layer or in none. The GGUF metadata then says the padded width (feed_forward_length,
expert_feed_forward_length), and stock llama.cpp loads the file as a model of that width.
"""

from __future__ import annotations

import dataclasses

import torch

from gemmaquant.config import Gemma4Config
from gemmaquant.errors import GemmaquantError

PAD_BLOCK = 256  # the K-quants' and IQ4_XS's super-block (QK_K)
KINDS = ("mlp", "experts")
_DENSE = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_EXPERT = ("experts.gate_up_proj", "experts.down_proj")


class PaddingError(GemmaquantError, ValueError):
    pass


def padded_width(n: int) -> int:
    return -(-n // PAD_BLOCK) * PAD_BLOCK


def width(cfg: Gemma4Config, kind: str) -> int | None:
    """The intermediate width of `kind` in `cfg` (None: the model has no such MLP)."""
    if kind == "mlp":
        return cfg.intermediate_size
    return cfg.moe_intermediate_size if cfg.enable_moe_block else None


def paddable(cfg: Gemma4Config) -> tuple[str, ...]:
    """The kinds whose width is not a multiple of the 256-block (where padding changes which types fit)."""
    out = []
    for k in KINDS:
        w = width(cfg, k)
        if w and (w % PAD_BLOCK or (k == "mlp" and any(cfg.layer_intermediate_size(i) % PAD_BLOCK
                                                       for i in range(cfg.num_hidden_layers)))):
            out.append(k)
    return tuple(out)


def check_kinds(kinds, cfg: Gemma4Config | None = None, source: str = "pad_to_block") -> tuple[str, ...]:
    """Normalised kinds (sorted as KINDS); PaddingError naming `source` for an unknown kind or, given `cfg`, a kind
    the model lacks."""
    kinds = tuple(kinds or ())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise PaddingError(f"{source}: unknown MLP kind {bad[0]!r}; valid: {', '.join(KINDS)}")
    if cfg is not None:
        for k in kinds:
            if not width(cfg, k):
                raise PaddingError(f"{source}: this model has no {k} MLP to pad")
    return tuple(k for k in KINDS if k in kinds)


def padded_config(cfg: Gemma4Config, kinds) -> Gemma4Config:
    """`cfg` with the widths of `kinds` padded to the block (a new config; `cfg` is not changed). A width that is
    a multiple of 256 already stays as it is."""
    kinds = check_kinds(kinds, cfg)
    changes = {}
    if "mlp" in kinds:
        changes["intermediate_size"] = padded_width(cfg.intermediate_size)
    if "experts" in kinds:
        changes["moe_intermediate_size"] = padded_width(cfg.moe_intermediate_size)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _pad_dim(t: torch.Tensor, dim: int, new: int) -> torch.Tensor:
    if t.shape[dim] == new:
        return t
    shape = list(t.shape)
    shape[dim] = new - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def pad_tensor(rel: str, t: torch.Tensor, cfg: Gemma4Config, padded: Gemma4Config, layer: int) -> torch.Tensor:
    """Layer `layer`'s tensor `rel` (relative to `layers.{i}.`) of `cfg`, as the padded config holds it (a new
    tensor where it changes, `t` itself where it does not)."""
    if rel in _DENSE:
        old, new = cfg.layer_intermediate_size(layer), padded.layer_intermediate_size(layer)
        return t if old == new else _pad_dim(t, -1 if rel == "mlp.down_proj.weight" else 0, new)
    if rel in _EXPERT:
        old, new = cfg.moe_intermediate_size, padded.moe_intermediate_size
        if old == new:
            return t
        if rel == "experts.down_proj":
            return _pad_dim(t, -1, new)
        gate, up = t[:, :old], t[:, old:]  # [E, 2I, H]: gate rows first, then up rows
        return torch.cat([_pad_dim(gate, 1, new), _pad_dim(up, 1, new)], dim=1)
    return t


class PaddedSource:
    """A tensor source (gemmaquant.checkpoint.Checkpoint, the quantizer's ModuleSource) seen with the MLP widths of
    `kinds` padded: `config` is the padded config, layer tensors come back padded (new tensors: the source is
    never written to); everything else is the source's own."""

    def __init__(self, src, kinds):
        self._src = src
        self.kinds = check_kinds(kinds, src.config)
        self.original_config = src.config
        self.config = padded_config(src.config, self.kinds)

    def __getattr__(self, name):  # path, weight_map, full_name, ...
        return getattr(self._src, name)

    def layer_state(self, i: int, dtype=None):
        return {k: pad_tensor(k, v, self.original_config, self.config, i)
                for k, v in self._src.layer_state(i, dtype).items()}

    def global_state(self, dtype=None):
        return self._src.global_state(dtype)

    def get(self, name: str) -> torch.Tensor:
        t = self._src.get(name)
        if name.startswith("layers."):
            _, i, rel = name.split(".", 2)
            return pad_tensor(rel, t, self.original_config, self.config, int(i))
        return t


def kind_of(name: str) -> str | None:
    """The padded kind a tensor (our name) belongs to, or None."""
    if not name.startswith("layers."):
        return None
    rel = name.split(".", 2)[2]
    return "mlp" if rel in _DENSE else "experts" if rel in _EXPERT else None


def padded_shape(name: str, shape: tuple[int, ...], cfg: Gemma4Config, padded: Gemma4Config) -> tuple[int, ...]:
    """The shape `name` has under the padded config (meta tensors: nothing is allocated)."""
    if kind_of(name) is None:
        return tuple(shape)
    _, i, rel = name.split(".", 2)
    return tuple(pad_tensor(rel, torch.empty(shape, device="meta"), cfg, padded, int(i)).shape)


def padding_lines(cfg: Gemma4Config, kinds) -> list[str]:
    """What padding does to the model, one line per kind ("experts: intermediate width 704 -> 768 (+9.1%) ...")."""
    padded = padded_config(cfg, kinds)
    out = []
    for k in check_kinds(kinds, cfg):
        old, new = width(cfg, k), width(padded, k)
        what = "gate/up rows and down columns"
        out.append(f"{k}: intermediate width {old} -> {new} (+{100 * (new / old - 1):.1f}% {what}, zeros; the "
                   f"same function exactly)" if new != old else f"{k}: width {old} is a multiple of {PAD_BLOCK} "
                                                                 f"already; nothing padded")
    return out


def pad_note(name: str, shape: tuple[int, ...], cfg: Gemma4Config) -> str:
    """"zero-padded 704 -> 768" when `shape` (what the file holds) is `name` padded from its shape under `cfg`
    (the unpadded config), else ""."""
    kind = kind_of(name)
    if kind is None:
        return ""
    rel = name.split(".", 2)[2]
    old = cfg.layer_intermediate_size(int(name.split(".")[1])) if kind == "mlp" else cfg.moe_intermediate_size
    if rel.endswith("down_proj") or rel.endswith("down_proj.weight"):
        new = shape[-1]
    else:
        new = shape[-2] // (2 if rel == "experts.gate_up_proj" else 1)
    return f"zero-padded {old} -> {new}" if new != old else ""


def size_comparison(cfg: Gemma4Config, recipe) -> dict | None:
    """The GGUF bytes of a recipe's fixed mix (`gguf_type`, no per-tensor types) unpadded and with every paddable
    kind padded, for the dry run; bits per weight over the model's own (unpadded) weights for both. None where
    padding changes nothing (no paddable width, no GGUF mix, or a per-tensor mix, which the solver padded or not)."""
    kinds = paddable(cfg)
    if not kinds or not recipe.gguf_type or recipe.tensor_types:
        return None
    from gemmaquant.export.sizes import gguf_size
    from gemmaquant.plan import make_plan
    from gemmaquant.recipe import Recipe

    out, weights = {}, None
    for label, pad in (("unpadded", None), ("padded", kinds)):
        r = Recipe.from_dict({**recipe.to_dict(), "pad_to_block": pad})
        g = gguf_size(cfg, make_plan(padded_config(cfg, pad), r), r)
        weights = weights or g["weights"]  # the unpadded model's
        downs = sorted({f["type"] for f in g["families"] if "ffn_down" in f["family"] and f["type"] != "F32"})
        out[label] = {"pad_to_block": list(pad or ()), "bytes": g["bytes"], "bits_per_weight": 8 * g["bytes"] / weights,
                      "ffn_down_types": downs}
    return out


def comparison_text(comp: dict, current: tuple[str, ...] | None) -> list[str]:
    u, p = comp["unpadded"], comp["padded"]
    gib = 2**30
    return [f"zero-padding {', '.join(p['pad_to_block'])} to the 256-block (--pad-to-block"
            f"{' all' if not current else ''}): {p['bytes'] / gib:.2f} GiB, {p['bits_per_weight']:.3f} bits per "
            f"(unpadded) weight, ffn_down {'/'.join(p['ffn_down_types'])}; unpadded: {u['bytes'] / gib:.2f} GiB, "
            f"{u['bits_per_weight']:.3f} bits/weight, ffn_down {'/'.join(u['ffn_down_types'])}"
            + (" (this run pads)" if current else "")]
