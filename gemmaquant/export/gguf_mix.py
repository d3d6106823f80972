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
  * rows that do not fit a type's block fall back: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, IQ4_XS->IQ4_NL, then
    F16 (26B-A4B: ffn_down ne0 = 2112 and ffn_down_exps ne0 = 704);
  * Q2_K: Q2_K by default (Q4_0 on rows not a multiple of 256), attn_v Q3_K (Q4_K at n_gqa >= 4), ffn_down and
    attn_output Q3_K;
  * Q3_K_S / Q3_K_M / Q3_K_L: Q3_K by default (Q4_0 where a row is not a multiple of 256); Q3_K_M gives attn_v
    Q5_K (first two) / Q4_K, ffn_down Q5_K (first n_layer / 16 layers) / Q4_K, attn_output Q4_K; Q3_K_L gives
    attn_v, ffn_down and attn_output Q5_K;
  * IQ4_NL / IQ4_XS: attn_v gets Q5_K when n_gqa (heads / KV heads of layer 0) >= 4, and without an imatrix
    the ffn_down of the first n_layer / 8 layers gets Q5_K.
`gguf_mix_choices` gives the same types with the reason of each (the rule, the fallback).
"""

from __future__ import annotations

from gemmaquant.config import Gemma4Config
from gemmaquant.errors import GemmaquantError
from gemmaquant.export.gguf_names import always_f32, gguf_name, layer_of, never_requantized

FLOAT_TYPES = ("F32", "F16", "BF16")
# ggml block type -> weights per block (the row length ne0 must be a multiple of it). One line per type: a type
# added here (with its format in gemmaquant.formats) is usable in mixes, --gguf-type and the size estimates.
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1,
              "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "IQ4_NL": 32,
              "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
BLOCK_TYPES = tuple(t for t in BLOCK_SIZE if t not in FLOAT_TYPES)

# file type name -> (llama_ftype value written as general.file_type, default tensor type)
FILE_TYPES = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"), "IQ4_NL": (25, "IQ4_NL"), "IQ4_XS": (30, "IQ4_XS"),
    "Q2_K": (10, "Q2_K"), "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"), "Q3_K_L": (13, "Q3_K"),
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as in llama-quantize's list of types
# tensor_type_fallback (a 256-block type on a row that is not a multiple of 256 -> a 32-block type)
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


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
    return fallback_reason(type_name, ne0)[0]


def fallback_reason(type_name: str, ne0: int) -> tuple[str, str]:
    """(`fallback(type_name, ne0)`, why: "" when type_name fits, else e.g. "row of 704: 704 % 256 = 192, Q4_K
    impossible -> Q5_0")."""
    if fits(type_name, ne0):
        return type_name, ""
    demoted = _FALLBACK.get(type_name, type_name)
    if not fits(demoted, ne0):
        demoted = "F16"
    block = BLOCK_SIZE[type_name]
    return demoted, f"row of {ne0}: {ne0} % {block} = {ne0 % block}, {type_name} impossible -> {demoted}"


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
    Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S, Q3_K_M (= Q3_K), Q3_K_L, Q4_K_S, Q4_K_M (= Q4_K), Q5_K_S, Q5_K_M (= Q5_K),
    Q6_K, IQ4_NL, IQ4_XS), as llama-quantize
    chooses it without an imatrix.

    keep_type: the float type of tensors llama-quantize never requantizes (`per_layer_model_proj`); llama.cpp's
        converter writes them in the checkpoint's dtype (bf16 for the released models).
    pure: llama-quantize `--pure` (no mix rules; every quantizable tensor gets the default type, with fallbacks).
    token_embd_type: llama-quantize `--token-embedding-type` (also applies to `per_layer_token_embd`).
    shapes: our name -> PyTorch shape; defaults to the shapes the config implies.
    tensor_types: {our name: type} chosen per tensor (a `--target-bpw` search or a `--gguf-mix` file), replacing
        the mix's choice for those tensors (checked by `check_tensor_types`).
    Returns {our_name: type_name}, type names as in ggml (`Q4_K`, `F32`, ...).
    """
    choices = gguf_mix_choices(config, mix, keep_type, pure, token_embd_type, shapes, tensor_types)
    return {n: t for n, (t, _) in choices.items()}


def gguf_mix_choices(config: Gemma4Config, mix: str, keep_type: str = "BF16", pure: bool = False,
                     token_embd_type: str | None = None, shapes: dict[str, tuple[int, ...]] | None = None,
                     tensor_types: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """`gguf_mix_plan` with the reason of each choice: {our_name: (type_name, why)}; why is "" for the file
    type's default type, else the llama.cpp rule that chose it and / or the fallback taken ("row of 704:
    704 % 256 = 192, Q4_K impossible -> Q5_0")."""
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
    n_gqa = config.num_attention_heads // config.layer_kv_heads(0)  # llama_hparams::n_gqa(il = 0)
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
            plan[name] = ("F32", "norms, scalars and the router stay F32 in every llama.cpp file type")
            continue
        if token_embd_type is not None and cat == "token_embd":
            if not fits(token_embd_type, ne0):
                raise MixError(f"token_embd_type {token_embd_type} needs rows that are a multiple of "
                               f"{BLOCK_SIZE[token_embd_type]}; {g} has ne0 = {ne0}")
            plan[name] = (token_embd_type, "--token-embedding-type")
            continue
        if mix in FLOAT_TYPES:
            plan[name] = (default, "")
            continue
        if not _allows_quantization(g, ndim):
            plan[name] = (keep_type, "llama-quantize never requantizes it (keeps the converter's type)")
            continue
        t, why = default, ""
        if not pure:
            t, why = _impl(t, mix, cat, g, ne0, tied, n_expert, n_gqa, n_layer, i_attn_v, n_attn_v, i_ffn_down)
            i_attn_v += cat == "attn_v"
            i_ffn_down += cat == "ffn_down"
        t, fell = fallback_reason(t, ne0)
        plan[name] = (t, "; ".join(r for r in (why, fell) if r))
    if tensor_types:  # chosen per tensor: they replace the mix's choice
        for name, t in check_tensor_types(config, tensor_types, shapes).items():
            plan[name] = (t, "chosen per tensor (--target-bpw / --gguf-mix)")
    return plan


def _impl(t: str, mix: str, cat: str, g: str, ne0: int, tied: bool, n_expert: int, n_gqa: int, n_layer: int,
          i_attn_v: int, n_attn_v: int, i_ffn_down: int) -> tuple[str, str]:
    """`llama_tensor_get_type_impl` (no imatrix), the branches reachable for gemmaquant's file types -> (type,
    the rule that chose it, "" when none did)."""
    iq4 = mix in ("IQ4_NL", "IQ4_XS")
    if cat == "output" or (tied and cat == "token_embd"):
        if not fits(t, ne0):
            return "Q8_0", (f"tied embedding/output: row of {ne0}: {ne0} % {BLOCK_SIZE[t]} = {ne0 % BLOCK_SIZE[t]}, "
                            f"{t} impossible -> Q8_0")
        return (t, "") if t == "Q8_0" else ("Q6_K", "tied embedding/output tensor -> Q6_K")
    if cat == "attn_v":
        why = ""
        if iq4 and n_gqa >= 4:
            t, why = "Q5_K", f"attn_v with n_gqa = {n_gqa} >= 4 -> Q5_K"
        elif mix == "Q2_K":
            t, why = ("Q4_K", f"attn_v with n_gqa = {n_gqa} >= 4 -> Q4_K") if n_gqa >= 4 else ("Q3_K", "attn_v -> Q3_K")
        elif mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attn_v, n_attn_v):
            t, why = "Q6_K", f"attn_v at a use_more_bits position (of {n_attn_v}) -> Q6_K"
        elif mix == "Q4_K_S" and i_attn_v < 4:
            t, why = "Q5_K", "one of the first 4 attn_v -> Q5_K"
        elif mix == "Q3_K_M":
            t, why = ("Q5_K", "one of the first 2 attn_v -> Q5_K") if i_attn_v < 2 else ("Q4_K", "attn_v -> Q4_K")
        elif mix == "Q3_K_L":
            t, why = "Q5_K", "attn_v -> Q5_K"
        if n_expert == 8:  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
            return "Q8_0", "8-expert model: attn_v -> Q8_0"
        return t, why
    if cat == "attn_k":
        return ("Q8_0", "8-expert model: attn_k -> Q8_0") if n_expert == 8 else (t, "")
    if cat == "ffn_down":
        # with experts, the layer comes from the name; otherwise from the running counter (== layer here)
        i = layer_of(g) if max(1, n_expert) > 1 else i_ffn_down
        if mix == "Q2_K":
            return "Q3_K", "ffn_down -> Q3_K"
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n_layer):
            return "Q6_K", "ffn_down of a use_more_bits layer -> Q6_K"
        if iq4 and i < n_layer // 8:
            return "Q5_K", f"ffn_down of the first n_layer/8 = {n_layer // 8} layers (no imatrix) -> Q5_K"
        if mix == "Q4_K_S" and i < n_layer // 8:
            return "Q5_K", f"ffn_down of the first n_layer/8 = {n_layer // 8} layers -> Q5_K"
        if mix == "Q3_K_M":
            if i < n_layer // 16:
                return "Q5_K", f"ffn_down of the first n_layer/16 = {n_layer // 16} layers -> Q5_K"
            return "Q4_K", "ffn_down -> Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K", "ffn_down -> Q5_K"
        return t, ""
    if cat == "attn_output":
        if n_expert == 8:
            if mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS"):
                return "Q5_K", "8-expert model: attn_output -> Q5_K"
        elif mix in ("Q2_K", "Q3_K_M", "Q3_K_L"):
            return {"Q2_K": ("Q3_K", "attn_output -> Q3_K"), "Q3_K_M": ("Q4_K", "attn_output -> Q4_K"),
                    "Q3_K_L": ("Q5_K", "attn_output -> Q5_K")}[mix]
    return t, ""


def check_tensor_types(config: Gemma4Config, types: dict[str, str], shapes: dict[str, tuple[int, ...]] | None = None,
                       source: str = "mix") -> dict[str, str]:
    """Validate a per-tensor type mapping (a mix file, a solver's choice): keys are our tensor names or their
    GGUF names, values ggml type names (any case). Returns {our_name: TYPE}. MixError, naming `source`, the tensor
    and the type, for an unknown type, a tensor the model does not have, or a row the type's block cannot hold."""
    from gemmaquant.sensitivity import searchable

    if shapes is None:
        from gemmaquant.checkpoint import expected_shapes

        shapes = expected_shapes(config)
    by_gguf = {gguf_name(n): n for n in shapes}
    out = {}
    for key, t in types.items():
        name = key if key in shapes else by_gguf.get(key)
        if name is None:
            raise MixError(f"{source}: tensor {key!r} does not exist in this model (names as in the checkpoint, "
                           f"e.g. {next(iter(shapes))!r}, or as in the GGUF, e.g. {next(iter(by_gguf))!r})")
        tu = str(t).upper()
        if tu not in BLOCK_SIZE:
            raise MixError(f"{source}: unknown type {t!r} for tensor {key!r}; valid: {', '.join(BLOCK_SIZE)}")
        if not searchable(name, shapes[name]):
            raise MixError(f"{source}: {key} is not a tensor gemmaquant quantizes (norms, routers, scalars and "
                           f"per_layer_model_projection keep llama.cpp's float types)")
        ne0 = shapes[name][-1]
        if not fits(tu, ne0):
            raise MixError(f"{source}: tensor {key!r} has rows of {ne0}, not a multiple of {tu}'s "
                           f"{BLOCK_SIZE[tu]}-element block ({ne0} % {BLOCK_SIZE[tu]} = {ne0 % BLOCK_SIZE[tu]})")
        out[name] = tu
    return out
