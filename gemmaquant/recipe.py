"""A quantization recipe: what grid every weight goes onto, how it is chosen, and on what calibration data.

Recipes are data (TOML files in `recipes/`, loadable by name from a wheel), read into this frozen dataclass;
unknown keys are rejected. The default 4-bit recipe puts every matrix on int4 symmetric group-32 with bf16
scales: that grid *is* GGUF Q4_0 (d = scale, q - 8) and compressed-tensors W4A16 g32, so one quantization
exports to both with no requantization. A GGUF mix (`gguf_type = "Q4_K_M"`) instead decides each tensor's
block type the way llama-quantize does, and the algorithm quantizes onto those grids directly.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gemmaquant.errors import GemmaquantError

METHODS = ("rtn", "imatrix", "gptq", "awq")


class RecipeError(GemmaquantError, ValueError):
    pass


# Keys added after work directories were first written, with the value that matches what runs did before them.
ADDED_KEYS = {"importance_params": False}
# Keys only the exporters read: a work directory's values do not depend on them, so a run resumes whatever they are.
EXPORT_ONLY_KEYS = ("embedding_gguf_type",)
# Keys left out of `to_dict` (and so of every output file's recipe metadata) while they hold this value.
OMITTED_AT_DEFAULT = {"forward_dtype": "auto", "tensor_types": None, "pad_to_block": None, "ct_schemes": None}
FORWARD_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    method: str = "gptq"  # rtn | imatrix (importance-weighted RTN) | gptq | awq
    weight_format: str = "int4_g32_sym"  # a gemmaquant.formats name for every quantized matrix ...
    gguf_type: str | None = None  # ... unless a GGUF type or mix (Q4_K_M, Q6_K, ...) decides per tensor
    # token_embd / per_layer_token_embd in GGUF (llama-quantize's --token-embedding-type); None: llama.cpp's rule,
    # Q6_K, or Q8_0 where a row does not fit Q6_K's 256-blocks (and Q8_0 in a Q8_0 file)
    embedding_gguf_type: str | None = None
    # {tensor name: GGUF type}: per-tensor choices over the gguf_type mix (what `--target-bpw` finds, a mix file)
    tensor_types: dict | None = None
    # MLP kinds ("mlp", "experts") whose intermediate width is zero-padded to the 256-block before quantizing
    # (gemmaquant.padding: the same function; every GGUF type fits ffn_down); None: none
    pad_to_block: tuple[str, ...] | None = None
    # {tensor name: compressed-tensors scheme} (int4_g32_sym, int4_g128_sym, int8, bf16, ...): a per-layer mix for
    # vLLM (`--format safetensors --target-bpw`, `--ct-mix`), replacing weight_format for those tensors
    ct_schemes: dict | None = None
    calibration: str = "default"  # "default" (bundled set) or a file path
    n_samples: int = 32
    seq_len: int = 256
    batch_size: int = 4  # calibration sequences per forward
    damp: float = 0.01  # GPTQ
    block_size: int = 128
    act_order: bool = True
    importance_params: bool = True  # GPTQ: fit each block's scale imatrix-style, weighted by diag(H), not by absmax
    awq_grid: int = 20  # AWQ
    moe_min_tokens: int = 32  # experts routed fewer calibration tokens get forced-routing statistics
    # precision of the calibration forward: auto (fp32 on the CPU, bf16 on a GPU), float32, bfloat16, float16.
    # Hessians, GPTQ and AWQ run in fp32 whatever this says (gemmaquant.device).
    forward_dtype: str = "auto"

    def __post_init__(self):
        from gemmaquant.validate import check_fields

        if self.method not in METHODS:
            raise RecipeError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        check_fields(self, RecipeError, recipe_ranges())
        if self.tensor_types is not None:
            _check_tensor_types(self.tensor_types)
        if self.pad_to_block is not None:
            from gemmaquant.padding import PaddingError, check_kinds

            try:
                object.__setattr__(self, "pad_to_block", check_kinds(self.pad_to_block) or None)
            except PaddingError as e:
                raise RecipeError(str(e)) from None
        if self.ct_schemes is not None:
            _check_ct_schemes(self.ct_schemes, self.gguf_type)
        if self.forward_dtype not in FORWARD_DTYPES:
            raise RecipeError(f"forward_dtype {self.forward_dtype!r}; valid: {', '.join(FORWARD_DTYPES)}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecipeError(f"{source}: unknown keys {unknown}; valid: {sorted(names)}")
        try:
            return cls(**d)
        except RecipeError as e:
            raise RecipeError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        from gemmaquant.validate import read_utf8

        path = Path(path)
        try:
            d = tomllib.loads(read_utf8(path, RecipeError, "recipe", missing="recipe file not found"))
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: not valid TOML ({e})") from None
        return cls.from_dict(d, str(path))

    @classmethod
    def from_name(cls, name: str) -> "Recipe":
        """A bundled recipe, e.g. `26b-a4b/int4-gptq`."""
        root = resources.files("gemmaquant.recipes")
        f = root.joinpath(*f"{name}.toml".split("/"))
        if not f.is_file():
            raise RecipeError(f"no bundled recipe {name!r}; available: {', '.join(bundled_recipes())}")
        return cls.from_dict(tomllib.loads(f.read_text()), name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in OMITTED_AT_DEFAULT.items():  # so files written before the key existed keep their bytes
            if d[k] == v:
                del d[k]
        return d

    def same_as(self, saved: dict | None) -> bool:
        """Whether a recipe saved by `to_dict` (a work directory's state.json) is this one. A key added to Recipe
        after the file was written reads as the behaviour the file was written under (ADDED_KEYS), so such a
        work directory still resumes, and is refused if a later default would change its result."""
        try:
            if saved is None:
                return False
            old = Recipe.from_dict({**ADDED_KEYS, **saved}).to_dict()
            return {k: v for k, v in old.items() if k not in EXPORT_ONLY_KEYS} == \
                {k: v for k, v in self.to_dict().items() if k not in EXPORT_ONLY_KEYS}
        except (RecipeError, TypeError):
            return False


def recipe_ranges() -> dict:
    """What each Recipe value may be (gemmaquant.validate.check_fields), beyond its annotated type."""
    from gemmaquant.algorithms.gptq import MAX_DAMP
    from gemmaquant.export.gguf_mix import BLOCK_TYPES, FILE_TYPES, FLOAT_TYPES, MixError, file_type
    from gemmaquant.formats import FORMATS
    from gemmaquant.validate import at_least, between, one_of, positive

    def is_mix(v: str) -> bool:
        try:
            return bool(file_type(v))
        except MixError:
            return False

    return {
        "weight_format": (lambda v: v.lower() in FORMATS, f"one of {', '.join(FORMATS)}"),
        "gguf_type": (is_mix, f"a GGUF type or mix: {', '.join(FILE_TYPES)}"),
        "embedding_gguf_type": one_of(BLOCK_TYPES + FLOAT_TYPES),
        "n_samples": positive(), "seq_len": positive(), "batch_size": positive(), "block_size": positive(),
        "damp": between(0.0, MAX_DAMP, f"in [0, {MAX_DAMP}] (a fraction of the Hessian's mean diagonal)"),
        "awq_grid": positive(), "moe_min_tokens": at_least(0),
    }


def _check_tensor_types(types) -> None:
    from gemmaquant.export.gguf_mix import BLOCK_TYPES, FLOAT_TYPES

    if not isinstance(types, dict):
        raise RecipeError(f"tensor_types must be a table of tensor name -> GGUF type, got {type(types).__name__}")
    for name, t in types.items():
        if not isinstance(name, str) or t not in BLOCK_TYPES + FLOAT_TYPES:
            raise RecipeError(f"tensor_types: unknown GGUF type {t!r} for {name}; valid: "
                              f"{', '.join(BLOCK_TYPES + FLOAT_TYPES)}")


def _check_ct_schemes(schemes, gguf_type) -> None:
    from gemmaquant.ct_mix import SCHEMES

    if not isinstance(schemes, dict):
        raise RecipeError(f"ct_schemes must be a table of tensor name -> scheme, got {type(schemes).__name__}")
    if gguf_type is not None:
        raise RecipeError(f"ct_schemes (a compressed-tensors mix) excludes gguf_type {gguf_type!r}")
    for name, t in schemes.items():
        if not isinstance(name, str) or t not in SCHEMES:
            raise RecipeError(f"ct_schemes: unknown compressed-tensors scheme {t!r} for {name}; valid: "
                              f"{', '.join(SCHEMES)}")


def bundled_recipes() -> list[str]:
    root = Path(str(resources.files("gemmaquant.recipes")))
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.toml"))


def default_recipe(model_alias: str | None, bits: int, method: str | None = None) -> Recipe:
    """`gemmaquant quantize MODEL --bits N`: the bundled recipe for that variant and width when there is one."""
    variant = (model_alias or "").removeprefix("tiny-")
    method = method or "gptq"
    for name in (f"{variant}/int{bits}-{method}", f"default/int{bits}-{method}"):
        if name in bundled_recipes():
            return Recipe.from_name(name)
    raise RecipeError(f"no bundled recipe for {bits}-bit {method}; available: {', '.join(bundled_recipes())}")
