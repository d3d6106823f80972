"""GGUF export for llama.cpp: `export_gguf(source, "model.gguf", type="Q4_K_M")`.

What is written (GEMMA4_SPEC.md §3): `general.architecture = gemma4`, every `gemma4.*` hyperparameter llama.cpp's
`llama_model_gemma4::load_arch_hparams` reads, the tokenizer (gguf_vocab.py), the generated `rope_freqs` tensor
and every text tensor under its llama.cpp name (gguf_names.py) with its shape unchanged. Types: norms, scalars,
router tensors and per-expert scales are F32; a float value gets the type `gguf_mix_plan` picks for the file
type / mix and is cast or RTN-quantized; a `Packed` value (what PTQ or QAT chose) is written bit-for-bit in its
own block type. The source's metadata (recipe, calibration hash) goes into `gemmaquant.*` keys.

Streaming: the header (metadata + tensor table) has a size that does not depend on the tensor types, so it is
measured first, the tensor data is then written tensor by tensor (each value fetched, encoded in row chunks and
dropped) behind a reserved gap, and the real header, built by gguf's `GGUFWriter`, fills the gap at the end. The
file appears at `out_path` only when complete (temporary sibling + rename); on any error or interrupt it is
removed and nothing is left at the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from gemmaquant.config import Gemma4Config
from gemmaquant.export.errors import ExportError
from gemmaquant.export.gguf_mix import FLOAT_TYPES, MixError, file_type, gguf_mix_plan
from gemmaquant.export.gguf_names import ROPE_FREQS, gguf_name
from gemmaquant.export.gguf_pack import PackError, float_chunks, packed_chunks, packed_type, tensor_nbytes
from gemmaquant.export.gguf_vocab import VocabError, add_vocab, check_tokenization, read_vocab

ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT


def rope_freqs(cfg: Gemma4Config) -> torch.Tensor:
    """llama.cpp's encoding of "proportional" RoPE (full layers): NEOX rotation over the whole head with
    frequency factors 1 for the rotated pairs and 1e30 (frequency ~ 0) for the rest. [global_head_dim / 2]"""
    half = cfg.global_head_dim // 2
    rotated = int(cfg.global_head_dim * cfg.partial_rotary_factor_full / 2)
    return torch.tensor([1.0] * rotated + [1e30] * (half - rotated), dtype=torch.float32)


def check_llamacpp_compatible(cfg: Gemma4Config) -> None:
    """Configs llama.cpp would load but run wrongly, or refuse."""
    if cfg.num_kv_shared_layers:
        n = cfg.first_kv_shared_layer
        # llama.cpp reuses layer n-2 for sliding and n-1 for full layers (spec §2.4, pitfall P4)
        if n < 2 or (cfg.is_sliding(n - 2), cfg.is_sliding(n - 1)) != (True, False):
            raise ExportError(f"llama.cpp assumes the last two KV-producing layers are (sliding, full); this config "
                              f"has {cfg.layer_types[max(n - 2, 0):n]} and would run wrongly there")
    if cfg.has_ple and cfg.vocab_size_per_layer_input != cfg.vocab_size:
        raise ExportError(f"llama.cpp needs vocab_size_per_layer_input == vocab_size "
                          f"({cfg.vocab_size_per_layer_input} != {cfg.vocab_size})")
    if cfg.hidden_activation != "gelu_pytorch_tanh":
        raise ExportError(f"llama.cpp's gemma4 graph uses gelu_tanh, not {cfg.hidden_activation}")


def add_hparams(w: gguf.GGUFWriter, cfg: Gemma4Config, ftype: int) -> None:
    """`gemma4.*` keys as llama.cpp's converter writes them (spec §3.3), from the per-layer geometry the model
    actually uses (so a `num_global_key_value_heads` that transformers ignores is not written)."""
    L = cfg.num_hidden_layers
    w.add_block_count(L)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    ff = [cfg.layer_intermediate_size(i) for i in range(L)]
    w.add_feed_forward_length(ff if len(set(ff)) > 1 else ff[0])
    w.add_head_count(cfg.num_attention_heads)
    kv = [cfg.layer_kv_heads(i) for i in range(L)]
    w.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
    w.add_key_length(cfg.global_head_dim)
    w.add_value_length(cfg.global_head_dim)
    w.add_key_length_swa(cfg.head_dim)
    w.add_value_length_swa(cfg.head_dim)
    w.add_rope_dimension_count(cfg.global_head_dim)  # "proportional" RoPE is expressed through rope_freqs
    w.add_rope_dimension_count_swa(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta_full)
    w.add_rope_freq_base_swa(cfg.rope_theta_sliding)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([cfg.is_sliding(i) for i in range(L)])
    w.add_shared_kv_layers(cfg.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input or 0)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if cfg.enable_moe_block:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _header_bytes(kv_data, infos: list[tuple[str, tuple[int, ...], str, int]], scratch: Path) -> bytes:
    """Header + metadata + tensor table exactly as GGUFWriter writes them (written to a scratch file)."""
    w = gguf.GGUFWriter(None, "gemma4")
    w.kv_data = kv_data
    for name, shape, type_name, nbytes in infos:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType[type_name])
    try:
        w.write_header_to_file(scratch)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return scratch.read_bytes()
    finally:
        w.close()
        scratch.unlink(missing_ok=True)


def export_gguf(source, out_path: str | os.PathLike, type: str = "Q4_K_M", overwrite: bool = False, *,
                pure: bool = False, token_embd_type: str | None = None, keep_type: str | None = None,
                name: str | None = None, tensor_types: dict[str, str] | None = None,
                device: str | torch.device | None = None) -> Path:
    """Write `source` (a tensor source, see gemmaquant.export.source) as a llama.cpp GGUF file.

    type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K (= Q4_K_M), Q4_K_S, Q4_K_M, Q5_K (= Q5_K_M), Q5_K_S,
        Q5_K_M or Q6_K: the file type; it decides the type of every *float* value as llama-quantize would
        (`gguf_mix_plan`, with `pure`, `token_embd_type` as llama-quantize's --pure / --token-embedding-type).
        `Packed` values keep the block type they were quantized to.
    tensor_types: {our name: GGUF type} for float values chosen per tensor (a `--target-bpw` mix), instead of the
        file type's rule.
    keep_type: float type of tensors llama-quantize never requantizes (per_layer_model_proj); default: BF16 when
        the value is bf16, else F16 (llama.cpp's converter `--outtype auto`).
    device: where float values are RTN-quantized ('cpu', 'cuda', 'cuda:N', 'auto'); None: where each value lies
        (the CPU for a checkpoint). The bytes are the same on every device (gemmaquant.formats.ggml_ref).
    Returns the path written. Raises ExportError (nothing written) for bad input, FileExistsError when
    `out_path` exists and not `overwrite`.
    """
    out = Path(out_path)
    if device is not None:
        from gemmaquant.device import resolve_device

        device = resolve_device(device)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass overwrite=True to replace it)")
    if out.is_dir():
        raise ExportError(f"{out}: is a directory, expected a .gguf file path")
    cfg: Gemma4Config = source.config
    try:
        mix, ftype, _ = file_type(type)
        plan = gguf_mix_plan(cfg, mix, keep_type=keep_type or "BF16", pure=pure, token_embd_type=token_embd_type,
                             tensor_types=tensor_types)
    except MixError as e:
        raise ExportError(str(e)) from None
    check_llamacpp_compatible(cfg)
    names = list(source.names())
    _check_names(names, plan)
    from gemmaquant.checkpoint import expected_shapes

    shapes = expected_shapes(cfg)
    entries = [(n, gguf_name(n), tuple(shapes[n])) for n in names]
    keep_auto = keep_type is None and mix not in FLOAT_TYPES  # kept tensors follow their dtype (converter "auto")

    w = gguf.GGUFWriter(None, "gemma4")
    w.add_type(gguf.GGUFType.MODEL)
    default_name = Path(source.source_dir).name if source.source_dir else f"gemma4-{cfg.num_hidden_layers}L"
    w.add_name(name or default_name)
    add_hparams(w, cfg, ftype)
    for k, v in sorted((source.metadata or {}).items()):
        w.add_string(f"gemmaquant.{k}", str(v))
    if source.source_dir is None:
        raise ExportError("the source has no source_dir, so there is no tokenizer to put in the GGUF")
    try:
        vocab = read_vocab(Path(source.source_dir), cfg.vocab_size)
        check_tokenization(Path(source.source_dir), vocab)
    except VocabError as e:
        raise ExportError(str(e)) from None
    add_vocab(w, vocab)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a written file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            rope = rope_freqs(cfg)
            infos = [(ROPE_FREQS, tuple(rope.shape), "F32", 0)] + [(g, shape, "F32", 0) for _, g, shape in entries]
            reserved = _header_bytes(w.kv_data, infos, tmp.with_name(tmp.name + ".hdr"))
            start = _pad(len(reserved))
            f.seek(start)
            infos = [(ROPE_FREQS, tuple(rope.shape), "F32", _write(f, [rope.numpy()]))]
            for n, g, shape in entries:
                value = source.get(n)
                type_name, chunks = _encode(n, value, plan[n], shape, keep_auto, device)
                nbytes = _write(f, chunks)
                if nbytes != tensor_nbytes(type_name, shape):
                    raise ExportError(f"{n}: wrote {nbytes} bytes for {type_name} {list(shape)}, expected "
                                      f"{tensor_nbytes(type_name, shape)}")
                infos.append((g, shape, type_name, nbytes))
                del value, chunks
            header = _header_bytes(w.kv_data, infos, tmp.with_name(tmp.name + ".hdr"))
            if len(header) != len(reserved):
                raise ExportError(f"internal: GGUF header is {len(header)} bytes, {len(reserved)} were reserved")
            f.seek(0)
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except PackError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(str(e)) from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{out}: writing failed ({e.strerror or e}); nothing was written at the target") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _check_names(names: list[str], plan: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for n in names:
        try:
            g = gguf_name(n)
        except KeyError as e:
            raise ExportError(str(e.args[0])) from None
        if g in seen:
            raise ExportError(f"tensor name clash: {seen[g]!r} and {n!r} both map to GGUF tensor {g!r}")
        if n not in plan:
            raise ExportError(f"tensor {n!r} is not part of this config's model")
        seen[g] = n
    missing = sorted(set(plan) - set(names))
    if missing:
        raise ExportError(f"the source lacks tensor {missing[0]!r} ({len(missing)} missing in all); llama.cpp "
                          f"cannot load a model without it")


def _encode(name: str, value, planned: str, shape: tuple[int, ...], keep_auto: bool, device=None):
    """-> (ggml type name, chunk iterator) for one source value."""
    if isinstance(value, torch.Tensor):
        if tuple(value.shape) != tuple(shape):
            raise ExportError(f"{name}: shape {list(value.shape)}, expected {list(shape)} for this config")
        if not value.is_floating_point():
            raise ExportError(f"{name}: dtype {value.dtype} is not a float tensor")
        t = planned
        if keep_auto and _is_kept(name):
            t = "BF16" if value.dtype == torch.bfloat16 else "F16"
        return t, float_chunks(value, t, name, device)
    packs = value if isinstance(value, list) else [value]
    if planned == "F32":
        raise ExportError(f"{name}: a quantized value, but llama.cpp reads this tensor as F32")
    if not packs or not all(hasattr(p, "fmt") for p in packs):
        raise ExportError(f"{name}: value of type {type(value).__name__} is neither a tensor nor Packed")
    t = packed_type(packs[0])
    if t is None:
        from gemmaquant.export.gguf_repack import to_block_type

        packs = [to_block_type(p, name) for p in packs]
        t = packed_type(packs[0])
    got = (len(packs), *packs[0].shape) if isinstance(value, list) else tuple(packs[0].shape)
    if got != tuple(shape):
        raise ExportError(f"{name}: packed shape {list(got)}, expected {list(shape)} for this config")
    return t, packed_chunks(packs, t, name)


def _is_kept(name: str) -> bool:
    return name == "per_layer_model_projection.weight"


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _write(f, chunks) -> int:
    """Write one tensor's chunks at the current position (already aligned); pad to the alignment."""
    n = 0
    for c in chunks:
        c = np.ascontiguousarray(c)
        f.write(memoryview(c).cast("B"))
        n += c.nbytes
    pad = _pad(n) - n
    if pad:
        f.write(b"\0" * pad)
    return n
