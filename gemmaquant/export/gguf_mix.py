"""Which GGUF type each Gemma 4 tensor gets for a file type or mix: llama-quantize's choices, reproduced.

`gguf_mix_plan(config, "Q4_K_M")` returns `{our_name: ggml_type_name}` for every text tensor, exactly what
`llama-quantize model-bf16.gguf out.gguf Q4_K_M` picks for the same model (checked against the real binary in
tests/export/test_gguf_mix.py). The PTQ pipeline calls it before GPTQ runs, so each matrix is optimised
directly on the block grid it will be stored in.

Source: ggml-org/llama.cpp `src/llama-quant.cpp` (`tensor_allows_quantization`, `tensor_get_category`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`), restricted to the file types gemmaquant writes. Facts
that matter for Gemma 4 (GEMMA4_SPEC.md §3.4):
  * tensors are visited in llama.cpp's loader order (by layer, then by GGUF name); the attn_v and ffn_down
    counters behind the "use more bits" layers count in that order (attn_v is absent on k_eq_v full layers
    and on KV-shared layers, so the counter is not the layer index);
  * embeddings are tied, so `token_embd` *and* `per_layer_token_embd` (category TOKEN_EMBD) get the output
    tensor rule: Q6_K, or Q8_0 when ne0 is not a multiple of the file type's block;
  * `per_layer_model_proj` is never requantized (it stays in the converter's float type, `keep_type`);
  * models with exactly 8 experts get attn_k / attn_v in Q8_0 and attn_output in Q5_K (Q4_K_S/M);
  * rows that do not fit a type's block fall back: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, then F16
    (26B-A4B: ffn_down ne0 = 2112 and ffn_down_exps ne0 = 704).
"""

from __future__ import annotations

from gemmaquant.config import Gemma4Config
from gemmaquant.errors import GemmaquantError
from gemmaquant.export.gguf_names import always_f32, gguf_name, layer_of, never_requantized

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
              "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}

# file type name -> (llama_ftype value written as general.file_type, default tensor type)
FILE_TYPES = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as in llama-quantize's list of types
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # tensor_type_fallback (256-block -> 32-block)


class MixError(GemmaquantError, ValueError):
    pass


def file_type(mix: str) -> tuple[str, int, str]:
    """Normalise a type/mix name: -> (canonical mix, general.file_type value, default tensor type)."""
    key = mix.upper()
    key = ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise MixError(f"unknown GGUF type or mix {mix!r}; valid: {', '.join([*FILE_TYPES, *ALIASES])}")
    return (key, *FILE_TYPES[key])


def fits(type_name: str, ne0: int) -> bool:
    return ne0 % BLOCK_SIZE[type_name] == 0


def fallback(type_name: str, ne0: int) -> str:
    """`tensor_type_fallback`: a type whose block does not divide the row length ne0 is demoted."""
    if fits(type_name, ne0):
        return type_name
    demoted = _FALLBACK.get(type_name, type_name)
    return demoted if fits(demoted, ne0) else "F16"


def _use_more_bits(i: int, n: int) -> bool:
    # C integer semantics: the modulo of a negative number never equals 2 (the first test catches i < n/8)
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8 >= 0 and (i - n // 8) % 3 == 2)


def _category(g: str) -> str:
    """`tensor_get_category` (the substring tests, in llama.cpp's order)."""
    if g == "output.weight":
        return "output"
    if g in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
                     ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in g:
            return cat
    return "other"


def _allows_quantization(g: str, ndim: int) -> bool:
    """`tensor_allows_quantization` for the names Gemma 4 has."""
    return (ndim >= 2 and g.endswith("weight") and "_norm.weight" not in g and "ffn_gate_inp.weight" not in g
            and not never_requantized(g))


def _loader_order(g: str) -> tuple[int, str]:
    """llama_model_loader's `weight_name_comparer`: by layer (non-layer tensors first), then by name."""
    layer = layer_of(g)
    return (-1 if layer is None else layer, g)


def gguf_mix_plan(config: Gemma4Config, mix: str, keep_type: str = "BF16", pure: bool = False,
                  token_embd_type: str | None = None, shapes: dict[str, tuple[int, ...]] | None = None,
                  tensor_types: dict[str, str] | None = None) -> dict[str, str]:
    """The GGUF type of every text tensor of `config` under file type / mix `mix` (F32, F16, BF16, Q8_0, Q4_0,
    Q4_1, Q5_0, Q5_1, Q4_K_S, Q4_K_M (= Q4_K), Q5_K_S, Q5_K_M (= Q5_K), Q6_K).

    keep_type: the float type of tensors llama-quantize never requantizes (`per_layer_model_proj`); llama.cpp's
        converter writes them in the checkpoint's dtype (bf16 for the released models).
    pure: llama-quantize `--pure` (no mix rules; every quantizable tensor gets the default type, with fallbacks).
    token_embd_type: llama-quantize `--token-embedding-type` (also applies to `per_layer_token_embd`).
    shapes: our name -> PyTorch shape; defaults to the shapes the config implies.
    tensor_types: {our name: type} chosen per tensor (a `--target-bpw` search or a `--gguf-mix` file), replacing
        the mix's choice for those tensors (checked by `check_tensor_types`).
    Returns {our_name: type_name}, type names as in ggml (`Q4_K`, `F32`, ...).
    """
    mix, _, default = file_type(mix)
    if keep_type not in FLOAT_TYPES:
        raise MixError(f"keep_type must be one of {FLOAT_TYPES}, got {keep_type!r}")
    if token_embd_type is not None and token_embd_type not in (*FLOAT_TYPES, *BLOCK_TYPES):
        raise MixError(f"unknown token_embd_type {token_embd_type!r}; valid: {', '.join((*FLOAT_TYPES, *BLOCK_TYPES))}")
    if shapes is None:
        from gemmaquant.checkpoint import expected_shapes

        shapes = expected_shapes(config)
    g2name = {gguf_name(n): n for n in shapes}
    order = sorted(g2name, key=_loader_order)
    n_layer = config.num_hidden_layers
    n_expert = config.num_experts if config.enable_moe_block else 0
    tied = "output.weight" not in g2name
    n_attn_v = sum(1 for g in order if _category(g) == "attn_v")
    i_attn_v = i_ffn_down = 0
    plan = {}
    for g in order:
        name = g2name[g]
        shape = shapes[name]
        ne0, ndim = shape[-1], len(shape)
        cat = _category(g)
        if always_f32(g, ndim):
            plan[name] = "F32"
            continue
        if token_embd_type is not None and cat == "token_embd":
            if not fits(token_embd_type, ne0):
                raise MixError(f"token_embd_type {token_embd_type} needs rows that are a multiple of "
                               f"{BLOCK_SIZE[token_embd_type]}; {g} has ne0 = {ne0}")
            plan[name] = token_embd_type
            continue
        if mix in FLOAT_TYPES:
            plan[name] = default
            continue
        if not _allows_quantization(g, ndim):
            plan[name] = keep_type
            continue
        t = default
        if not pure:
            t = _impl(t, mix, cat, g, ne0, tied, n_expert, n_layer, i_attn_v, n_attn_v, i_ffn_down)
            i_attn_v += cat == "attn_v"
            i_ffn_down += cat == "ffn_down"
        plan[name] = fallback(t, ne0)
    if tensor_types:
        check_tensor_types(tensor_types, shapes)
        plan.update(tensor_types)
    return plan


def check_tensor_types(tensor_types: dict[str, str], shapes: dict[str, tuple[int, ...]], source: str = "mix") -> None:
    """A per-tensor choice must name a tensor of the model that gemmaquant may store quantized, a known type, and
    a type whose block divides the tensor's rows: MixError naming the first that does not."""
    from gemmaquant.sensitivity import searchable

    for name, t in tensor_types.items():
        if t not in (*BLOCK_TYPES, *FLOAT_TYPES):
            raise MixError(f"{source}: unknown GGUF type {t!r} for {name}; valid: "
                           f"{', '.join((*BLOCK_TYPES, *FLOAT_TYPES))}")
        if name not in shapes:
            raise MixError(f"{source}: no tensor {name!r} in this model")
        if not searchable(name, shapes[name]):
            raise MixError(f"{source}: {name} is not a tensor gemmaquant quantizes (norms, routers, scalars and "
                           f"per_layer_model_projection keep llama.cpp's float types)")
        if not fits(t, shapes[name][-1]):
            raise MixError(f"{source}: {name} has rows of {shapes[name][-1]}, not a multiple of {t}'s "
                           f"{BLOCK_SIZE[t]}-element blocks")


def _impl(t: str, mix: str, cat: str, g: str, ne0: int, tied: bool, n_expert: int, n_layer: int,
          i_attn_v: int, n_attn_v: int, i_ffn_down: int) -> str:
    """`llama_tensor_get_type_impl`, the branches reachable for gemmaquant's file types."""
    if cat == "output" or (tied and cat == "token_embd"):
        if not fits(t, ne0):
            return "Q8_0"
        return t if t == "Q8_0" else "Q6_K"
    if cat == "attn_v":
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attn_v, n_attn_v):
            t = "Q6_K"
        elif mix == "Q4_K_S" and i_attn_v < 4:
            t = "Q5_K"
        return "Q8_0" if n_expert == 8 else t  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    if cat == "attn_k":
        return "Q8_0" if n_expert == 8 else t
    if cat == "ffn_down":
        # with experts, the layer comes from the name; otherwise from the running counter (== layer here)
        i = layer_of(g) if max(1, n_expert) > 1 else i_ffn_down
        if mix == "Q4_K_M" and _use_more_bits(i, n_layer):
            return "Q6_K"
        if mix == "Q5_K_M" and _use_more_bits(i, n_layer):
            return "Q6_K"
        if mix == "Q4_K_S" and i < n_layer // 8:
            return "Q5_K"
        return t
    if cat == "attn_output" and n_expert == 8 and mix in ("Q4_K_S", "Q4_K_M"):
        return "Q5_K"
    return t
