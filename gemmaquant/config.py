"""Gemma 4 text-decoder configuration: one frozen dataclass and the named variants.

Field names are the Hugging Face `Gemma4TextConfig` names, so a checkpoint's config.json maps onto this
class field by field. `from_hf_dict` reads the *raw* JSON (see GEMMA4_SPEC.md §3.5 P1: transformers >= 5.23
hides `global_head_dim` / `num_global_key_value_heads` from `to_dict()`), and fills the defaults
transformers would (P2: `hidden_size_per_layer_input` defaults to 256, softcap to None).

Real values: GEMMA4_SPEC.md §1.2 (corroborated against the public config.json copies of
google/gemma-4-E2B-it, -E4B-it, -26B-A4B-it, -31B-it and the parameter-count cross-check).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gemmaquant.errors import GemmaquantError

SLIDING, FULL = "sliding_attention", "full_attention"


class ConfigError(GemmaquantError, ValueError):
    """A config.json that does not describe a Gemma 4 text decoder we can run."""


@dataclass(frozen=True)
class Gemma4Config:
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256  # sliding layers
    global_head_dim: int = 512  # full-attention layers
    num_global_key_value_heads: int | None = None  # full layers, only used when attention_k_eq_v
    attention_k_eq_v: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 512
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25  # "proportional" RoPE on full layers
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    hidden_size_per_layer_input: int = 256  # PLE width P; 0 disables PLE
    vocab_size_per_layer_input: int = 262144
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    max_position_embeddings: int = 131072
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    hidden_activation: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        from gemmaquant.validate import check_fields

        check_fields(self, ConfigError, config_ranges(self))
        L = self.num_hidden_layers
        types = tuple(self.layer_types) or tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(L))
        if len(types) != L:
            raise ConfigError(f"layer_types has {len(types)} entries for {L} layers")
        if types[-1] != FULL:  # transformers forces the last layer to full attention
            types = types[:-1] + (FULL,)
        bad = set(types) - {SLIDING, FULL}
        if bad:
            raise ConfigError(f"unknown layer types {sorted(bad)}")
        object.__setattr__(self, "layer_types", types)
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_kv_shared_layers:
            first = L - self.num_kv_shared_layers
            if first <= 0 or set(types[first:]) - set(types[:first]):
                raise ConfigError(f"num_kv_shared_layers = {self.num_kv_shared_layers}: every KV-shared layer type "
                                  f"needs an unshared producer layer of that type")

    # ---- per-layer geometry (GEMMA4_SPEC.md §1.1 "Derived per layer") ----
    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == SLIDING

    def layer_head_dim(self, i: int) -> int:
        return self.head_dim if self.is_sliding(i) else self.global_head_dim

    def layer_k_eq_v(self, i: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(i)

    def layer_kv_heads(self, i: int) -> int:
        if self.layer_k_eq_v(i) and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_kv_shared(self, i: int) -> bool:
        return self.num_kv_shared_layers > 0 and i >= self.first_kv_shared_layer

    def kv_producer(self, i: int) -> int:
        """The layer whose K/V layer i attends over: itself, or for a KV-shared layer the last unshared
        layer of the same type (transformers `kv_sharing_modes`, "store")."""
        if not self.is_kv_shared(i):
            return i
        first = self.first_kv_shared_layer
        return max(j for j in range(first) if self.layer_types[j] == self.layer_types[i])

    def layer_intermediate_size(self, i: int) -> int:
        return self.intermediate_size * (2 if self.use_double_wide_mlp and self.is_kv_shared(i) else 1)

    @property
    def has_ple(self) -> bool:
        return bool(self.hidden_size_per_layer_input)

    # ---- (de)serialization ----
    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "Gemma4Config":
        """Build from a raw config.json dict: a `gemma4` (multimodal, with `text_config`) or `gemma4_text` one.
        ConfigError, naming `source` and the key, for anything else."""
        try:
            return cls._from_hf_dict(raw, source)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
        except (AttributeError, TypeError, ValueError) as e:  # a value of the wrong JSON type where a table is read
            raise ConfigError(f"{source}: malformed config ({e})") from None

    @classmethod
    def _from_hf_dict(cls, raw: dict, source: str) -> "Gemma4Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type == "gemma4":
            raw = raw.get("text_config") or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: text_config is {type(raw).__name__}, expected a JSON object")
            model_type = raw.get("model_type", "gemma4_text")
        if model_type != "gemma4_text":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gemma4' or 'gemma4_text'")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in raw.items() if k in names}
        if raw.get("layer_types"):
            kw["layer_types"] = tuple(raw["layer_types"])
        rope = raw.get("rope_parameters") or {}
        if not isinstance(rope, dict) or not all(isinstance(v, dict) for v in rope.values()):
            raise ConfigError(f"{source}: rope_parameters must map layer types to tables, got {rope!r}")
        for kind, key in ((SLIDING, "rope_theta_sliding"), (FULL, "rope_theta_full")):
            params = rope.get(kind)
            if params:
                kw[key] = params.get("rope_theta", getattr(cls, key))
                want = "default" if kind == SLIDING else "proportional"
                got = params.get("rope_type", want)
                if got != want:
                    raise ConfigError(f"{source}: rope_type {got!r} for {kind} is not supported (expected {want!r})")
        if rope.get(FULL) and "partial_rotary_factor" in rope[FULL]:
            kw["partial_rotary_factor_full"] = rope[FULL]["partial_rotary_factor"]
        # transformers >= 5.23 writes these into per_layer_config instead (spec §3.5 P1)
        for k in ("global_head_dim", "num_global_key_value_heads"):
            if kw.get(k) is None:
                kw.pop(k, None)
        plc = raw.get("per_layer_config") or {}
        for entry in plc.values():
            if isinstance(entry, dict):
                kw.setdefault("global_head_dim", entry.get("head_dim", cls.global_head_dim))
                if "num_key_value_heads" in entry:
                    kw.setdefault("num_global_key_value_heads", entry["num_key_value_heads"])
        if kw.get("hidden_size_per_layer_input") is None:
            kw["hidden_size_per_layer_input"] = 0
        if raw.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{source}: use_bidirectional_attention='all' is not a causal decoder")
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """The `text_config` of a config.json that transformers and llama.cpp both read."""
        d = dataclasses.asdict(self)
        for k in ("rope_theta_sliding", "rope_theta_full", "partial_rotary_factor_full"):
            d.pop(k)
        d["layer_types"] = list(self.layer_types)
        d["rope_parameters"] = {
            SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": self.partial_rotary_factor_full,
                   "rope_theta": self.rope_theta_full},
        }
        d["model_type"] = "gemma4_text"
        d["attention_bias"] = False
        return d


def config_ranges(cfg: Gemma4Config) -> dict:
    """What each config value may be beyond its annotated type (gemmaquant.validate.check_fields)."""
    from gemmaquant.validate import at_least, between, one_of, positive

    even = (lambda v: v > 0 and v % 2 == 0, "a positive even number (RoPE rotates pairs)")
    token = (lambda v: all(0 <= t < cfg.vocab_size for t in (v if isinstance(v, list) else [v])),
             f"a token id in [0, vocab_size = {cfg.vocab_size})")
    return {
        **{k: positive() for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "num_global_key_value_heads",
                                   "sliding_window", "rope_theta_sliding", "rope_theta_full", "rms_norm_eps",
                                   "final_logit_softcapping", "vocab_size_per_layer_input", "num_experts",
                                   "top_k_experts", "moe_intermediate_size", "max_position_embeddings")},
        "head_dim": even, "global_head_dim": even,
        "partial_rotary_factor_full": between(0.0, 1.0),
        "hidden_size_per_layer_input": at_least(0), "num_kv_shared_layers": at_least(0),
        "pad_token_id": token, "eos_token_id": token, "bos_token_id": token,
        "hidden_activation": one_of(("gelu_pytorch_tanh",), "'gelu_pytorch_tanh' (the only activation Gemma 4 uses)"),
        **({"top_k_experts": (lambda v: 0 < v <= (cfg.num_experts or 0), f"in 1..num_experts = {cfg.num_experts}")}
           if cfg.enable_moe_block and cfg.num_experts is not None else {}),
    }


def _pattern(n_layers: int, period: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers))


# The four released variants (GEMMA4_SPEC.md §1.2). Hugging Face repositories: google/gemma-4-E2B-it,
# google/gemma-4-E4B-it, google/gemma-4-26B-A4B-it, google/gemma-4-31B-it.
_COMMON = dict(vocab_size=262144, head_dim=256, global_head_dim=512, final_logit_softcapping=30.0, rms_norm_eps=1e-6)
VARIANTS: dict[str, Gemma4Config] = {
    "e2b": Gemma4Config(**_COMMON, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                        num_attention_heads=8, num_key_value_heads=1, layer_types=_pattern(35, 5),
                        sliding_window=512, hidden_size_per_layer_input=256, num_kv_shared_layers=20,
                        use_double_wide_mlp=True),
    "e4b": Gemma4Config(**_COMMON, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
                        num_attention_heads=8, num_key_value_heads=2, layer_types=_pattern(42, 6),
                        sliding_window=512, hidden_size_per_layer_input=256, num_kv_shared_layers=18),
    "26b-a4b": Gemma4Config(**_COMMON, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                            num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
                            attention_k_eq_v=True, layer_types=_pattern(30, 6), sliding_window=1024,
                            hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128,
                            top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262144),
    "31b": Gemma4Config(**_COMMON, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
                        num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4,
                        attention_k_eq_v=True, layer_types=_pattern(60, 6), sliding_window=1024,
                        hidden_size_per_layer_input=0, max_position_embeddings=262144),
}

HF_REPOS = {"e2b": "google/gemma-4-E2B-it", "e4b": "google/gemma-4-E4B-it",
            "26b-a4b": "google/gemma-4-26B-A4B-it", "31b": "google/gemma-4-31B-it"}

# Tiny variants that mirror each real one's features (layer pattern, k_eq_v, KV sharing with a
# (sliding, full) producer pair as llama.cpp requires, PLE, double-wide MLP, MoE beside the dense MLP).
_TINY = dict(head_dim=32, global_head_dim=64, final_logit_softcapping=30.0, max_position_embeddings=4096)
TINY_VARIANTS: dict[str, Gemma4Config] = {
    "tiny-e2b": Gemma4Config(**_TINY, vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=1,
                             layer_types=(SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL), sliding_window=32,
                             hidden_size_per_layer_input=16, vocab_size_per_layer_input=4096,
                             num_kv_shared_layers=2, use_double_wide_mlp=True),
    "tiny-e4b": Gemma4Config(**_TINY, vocab_size=4096, hidden_size=128, intermediate_size=320, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2,
                             layer_types=(SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL), sliding_window=32,
                             hidden_size_per_layer_input=16, vocab_size_per_layer_input=4096,
                             num_kv_shared_layers=2),
    "tiny-26b-a4b": Gemma4Config(**_TINY, vocab_size=4096, hidden_size=128, intermediate_size=96,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 num_global_key_value_heads=1, attention_k_eq_v=True,
                                 layer_types=(SLIDING, SLIDING, SLIDING, FULL), sliding_window=32,
                                 hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8,
                                 top_k_experts=2, moe_intermediate_size=64),
    "tiny-31b": Gemma4Config(**_TINY, vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                             attention_k_eq_v=True, layer_types=(SLIDING, SLIDING, SLIDING, FULL),
                             sliding_window=32, hidden_size_per_layer_input=0),
}


def get_variant(name: str) -> Gemma4Config:
    table = {**VARIANTS, **TINY_VARIANTS}
    if name not in table:
        raise KeyError(f"unknown Gemma 4 variant {name!r}; valid: {', '.join(table)}")
    return table[name]
