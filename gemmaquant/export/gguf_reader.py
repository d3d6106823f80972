"""Read a Gemma 4 GGUF back: its config from the `gemma4.*` metadata, its tensors dequantized with gguf-py's own
numpy dequantizers (an implementation independent of gemmaquant.formats), as the reference `Gemma4` module.

    model = load_gguf("model-Q4_K_M.gguf")      # = gemmaquant.load("model-Q4_K_M.gguf")

The model's logits are those of the dequantized weights, which is what llama.cpp computes with (up to its
activation rounding, see docs/export.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from gemmaquant.config import FULL, SLIDING, Gemma4Config
from gemmaquant.export.errors import ExportError
from gemmaquant.export.gguf_names import ROPE_FREQS, text_name


class GGUFFormatError(ExportError):
    pass


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """gguf-py's reader on `path`, after checking what it does not: every tensor's bytes lie inside the file.
    GGUFFormatError naming the file for anything unreadable (never gguf-py's bare IndexError / struct.error)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"{path}: {'a directory' if path.is_dir() else 'no such file'}, expected a GGUF file")
    size = path.stat().st_size
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # a damaged header ends in whatever numpy or struct raised where parsing stopped
        raise GGUFFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})") from None
    for t in r.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFFormatError(f"{path}: tensor {t.name} ({int(t.n_bytes)} bytes at offset {t.data_offset}) lies "
                                  f"outside the {size}-byte file (truncated)")
    return r


def _field(r: gguf.GGUFReader, key: str, default=None, required: bool = True):
    f = r.fields.get(key)
    if f is None:
        if required and default is None:
            raise GGUFFormatError(f"{key}: missing from the GGUF metadata")
        return default
    return f.contents()


def read_config(r: gguf.GGUFReader, path: str = "gguf") -> Gemma4Config:
    """Gemma4Config from the metadata (and the few facts only the tensor table holds); GGUFFormatError naming
    `path` when they do not describe a Gemma 4 model."""
    try:
        return _read_config(r, path)
    except GGUFFormatError as e:
        raise GGUFFormatError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a key of the wrong type or shape; ConfigError
        raise GGUFFormatError(f"{path}: metadata is not a Gemma 4 model's ({type(e).__name__}: {e})") from None


def _read_config(r: gguf.GGUFReader, path: str) -> Gemma4Config:
    arch = _field(r, "general.architecture")
    if arch != "gemma4":
        raise GGUFFormatError(f"{path}: general.architecture is {arch!r}, expected 'gemma4'")
    k = lambda key, default=None, required=True: _field(r, f"gemma4.{key}", default, required)  # noqa: E731
    tensors = {t.name: t for t in r.tensors}
    L = int(k("block_count"))
    swa = [bool(x) for x in k("attention.sliding_window_pattern")]
    types = tuple(SLIDING if s else FULL for s in swa)
    n_shared = int(k("attention.shared_kv_layers", 0, required=False))
    ff = k("feed_forward_length")
    ff = [int(x) for x in ff] if isinstance(ff, list) else [int(ff)] * L
    kv = k("attention.head_count_kv")
    kv = [int(x) for x in kv] if isinstance(kv, list) else [int(kv)] * L
    first_shared = L - n_shared
    # k_eq_v: full layers that produce K/V but have no attn_v
    full_kv = [i for i in range(first_shared) if types[i] == FULL]
    k_eq_v = bool(full_kv) and all(f"blk.{i}.attn_v.weight" not in tensors for i in full_kv)
    nkv = next((kv[i] for i in range(L) if types[i] == SLIDING), kv[0])
    nkv_full = {kv[i] for i in range(L) if types[i] == FULL}
    if len(nkv_full) > 1 or len({kv[i] for i in range(L) if types[i] == SLIDING}) > 1:
        raise GGUFFormatError(f"{path}: per-layer head_count_kv {kv} is not a Gemma 4 layout")
    nkv_g = nkv_full.pop() if nkv_full else None
    if nkv_g != nkv and not k_eq_v:
        raise GGUFFormatError(f"{path}: full layers have {nkv_g} KV heads, sliding {nkv}, without k_eq_v")
    I = ff[0]
    double = any(ff[i] == 2 * I for i in range(first_shared, L)) and n_shared > 0
    want_ff = [I * (2 if double and i >= first_shared else 1) for i in range(L)]
    if ff != want_ff:
        raise GGUFFormatError(f"{path}: feed_forward_length {ff} is not a Gemma 4 layout")
    d_full = int(k("attention.key_length"))
    rope = tensors.get(ROPE_FREQS)
    if rope is None:
        raise GGUFFormatError(f"{path}: {ROPE_FREQS} missing (full layers' proportional RoPE)")
    rf = np.asarray(rope.data, dtype=np.float32)
    rotated = int((rf == 1.0).sum())
    if rf.shape[0] != d_full // 2 or not np.all(rf[rotated:] >= 1e29):
        raise GGUFFormatError(f"{path}: {ROPE_FREQS} is not [1]*r + [1e30]*rest of length {d_full // 2}")
    embd = tensors["token_embd.weight"]
    P = int(k("embedding_length_per_layer_input", 0, required=False))
    moe = "gemma4.expert_count" in r.fields
    tok = lambda key: _field(r, f"tokenizer.ggml.{key}", -1, required=False)  # noqa: E731
    kw = dict(
        vocab_size=int(embd.shape[1]), hidden_size=int(k("embedding_length")), intermediate_size=I,
        num_hidden_layers=L, num_attention_heads=int(k("attention.head_count")), num_key_value_heads=nkv,
        head_dim=int(k("attention.key_length_swa")), global_head_dim=d_full,
        num_global_key_value_heads=nkv_g if k_eq_v else None, attention_k_eq_v=k_eq_v, layer_types=types,
        sliding_window=int(k("attention.sliding_window")), rope_theta_sliding=float(k("rope.freq_base_swa")),
        rope_theta_full=float(k("rope.freq_base")), partial_rotary_factor_full=2 * rotated / d_full,
        rms_norm_eps=float(f'{k("attention.layer_norm_rms_epsilon"):.7g}'),  # stored as f32: 1e-6 -> 9.99e-7
        final_logit_softcapping=k("final_logit_softcapping", None, required=False),
        tie_word_embeddings="output.weight" not in tensors, hidden_size_per_layer_input=P,
        num_kv_shared_layers=n_shared, use_double_wide_mlp=double, enable_moe_block=moe,
        max_position_embeddings=int(k("context_length")),
    )
    if P:
        kw["vocab_size_per_layer_input"] = int(tensors["per_layer_token_embd.weight"].shape[1])
    if moe:
        kw.update(num_experts=int(k("expert_count")), top_k_experts=int(k("expert_used_count")),
                  moe_intermediate_size=int(k("expert_feed_forward_length")))
    for key, field in (("pad_token_id", "padding_token_id"), ("eos_token_id", "eos_token_id"),
                       ("bos_token_id", "bos_token_id")):
        if tok(field) != -1:
            kw[key] = int(tok(field))
    return Gemma4Config(**kw)


def dequantize(t) -> np.ndarray:
    """One GGUF tensor as float32 numpy in PyTorch orientation (reversed ne)."""
    shape = tuple(int(x) for x in reversed(t.shape))
    return np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)  # a copy


def gguf_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `gemmaquant.*` keys (recipe, calibration hash, ...) a GGUF was written with."""
    from gemmaquant.export.gguf_header import read_header  # the header only: no 262k-token vocabulary parsed

    return {k.removeprefix("gemmaquant."): v for k, v in read_header(path)[0].items() if k.startswith("gemmaquant.")}


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A GGUF written for llama.cpp's gemma4 architecture as a reference `Gemma4` with dequantized weights."""
    from gemmaquant.model.gemma4 import Gemma4, rope_inv_freqs

    path = Path(path)
    r = open_gguf(path)
    cfg = read_config(r, str(path))
    with torch.device("meta"):
        model = Gemma4(cfg)
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    state = {}
    for t in r.tensors:
        name = text_name(t.name)
        if name is None:
            continue
        if name not in want:
            raise GGUFFormatError(f"{path}: tensor {t.name} does not belong to this config")
        w = torch.from_numpy(dequantize(t))
        if not bool(torch.isfinite(w).all()):
            raise GGUFFormatError(f"{path}: tensor {t.name} contains NaN or Inf")
        if tuple(w.shape) != want[name]:
            raise GGUFFormatError(f"{path}: tensor {t.name} has shape {list(w.shape)}, expected {list(want[name])}")
        state[name] = w.to(device=device, dtype=dtype)
    missing = sorted(set(want) - set(state))
    if missing:
        raise GGUFFormatError(f"{path}: tensor for {missing[0]!r} missing ({len(missing)} in all)")
    model.load_state_dict(state, strict=True, assign=True)
    for kind, inv in rope_inv_freqs(cfg).items():
        model.register_buffer(f"inv_freq_{kind}", inv.to(device), persistent=False)
    return model.eval()
