"""compressed-tensors safetensors export for vLLM / SGLang / transformers: `export_compressed_tensors(source, out_dir)`.

Schemes (config_groups.group_0, format "pack-quantized", targets ["Linear"]):
    W4A16   int4 symmetric, group strategy (group_size 32 by default), bf16 scales   (vLLM: Marlin / machete WNA16)
    W8A16   int8 symmetric, channel strategy, bf16 scales
Quantized: every attention / MLP projection, the PLE gate and projection, and the experts. Kept in the model dtype
(and listed in `ignore`): router, embeddings, per_layer_model_projection, lm_head, the vision / audio towers.

Experts: the checkpoint's fused `experts.gate_up_proj [E, 2*Ie, H]` / `experts.down_proj [E, H, Ie]` are written
unfused, per expert, under the names vLLM's Gemma 4 loader maps onto FusedMoE (vllm/model_executor/models/gemma4.py
`expert_params_mapping`: `experts.{e}.gate_proj.` -> w1, `.up_proj.` -> w3, `.down_proj.` -> w2), e.g.
`model.language_model.layers.0.experts.3.gate_proj.weight_packed`. transformers needs a conversion mapping to
merge them back: `gemmaquant.export.load_transformers(dir)` (transformers_loader.py).

Values: a `Packed` in the scheme's own format (Int4Group symmetric with this group size / Int8Channel) is written
bit-for-bit; a float tensor is quantized by RTN with that format. Output: sharded safetensors + index (streamed, one
shard in memory at most), config.json with `quantization_config`, tokenizer / generation config and the towers
copied unchanged. The directory appears only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from gemmaquant.checkpoint import TOKENIZER_FILES, Checkpoint, atomic_dir, hf_config_dict
from gemmaquant.export.ct_pack import codes_from_packed, pack_int32
from gemmaquant.export.errors import ExportError
from gemmaquant.export.model_card import write_model_card
from gemmaquant.safetensors_write import save_file

SCHEMES = {"W4A16": 4, "W8A16": 8}
QUANTIZED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
             "per_layer_input_gate.weight", "per_layer_projection.weight")
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
IGNORE = ["lm_head", r"re:.*embed_tokens.*", r"re:.*router.*", r"re:.*per_layer_model_projection$",
          r"re:.*vision_tower.*", r"re:.*audio_tower.*", r"re:.*embed_vision.*", r"re:.*embed_audio.*"]
EXTRA_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
               "preprocessor_config.json")


def quantization_config(scheme: str, group_size: int) -> dict:
    bits = SCHEMES[scheme]
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False, "actorder": None,
               "block_structure": None, "observer": "minmax", "observer_kwargs": {},
               "strategy": "group" if bits == 4 else "channel", "group_size": group_size if bits == 4 else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": list(IGNORE), "kv_cache_scheme": None, "global_compression_ratio": None}


def scheme_format(scheme: str, group_size: int, dtype: torch.dtype):
    from gemmaquant.formats import Int4Group, Int8Channel

    if scheme == "W4A16":
        return Int4Group(group_size=group_size, symmetric=True, scale_dtype=dtype)
    return Int8Channel(scale_dtype=dtype)


def is_quantized(name: str) -> bool:
    return name.startswith("layers.") and name.split(".", 2)[2] in QUANTIZED + EXPERTS


class ShardWriter:
    """Streams tensors into model-0000k-of-0000n.safetensors shards of at most `max_bytes` (names fixed at close)."""

    def __init__(self, out: Path, max_bytes: int, metadata: dict[str, str]):
        self.out, self.max_bytes, self.metadata = out, max_bytes, {"format": "pt", **metadata}
        self.pending: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise ExportError(f"tensor name clash: {name!r} written twice")
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        save_file(self.pending, str(self.out / f".shard-{len(self.shards):05d}.safetensors"), metadata=self.metadata)
        self.shards.append(list(self.pending))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for k, names in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f".shard-{k:05d}.safetensors", self.out / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            (self.out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def _raw_config(source) -> tuple[dict, str]:
    """The source checkpoint's config.json (kept, for the towers' configs) and its text-weight prefix."""
    d = Path(source.source_dir) if source.source_dir else None
    if d is not None and (d / "config.json").is_file():
        raw = json.loads((d / "config.json").read_text())
        multimodal = raw.get("model_type") == "gemma4"
    else:
        raw, multimodal = hf_config_dict(source.config), False
    return raw, "model.language_model." if multimodal else "model."


def export_compressed_tensors(source, out_dir: str | os.PathLike, scheme: str = "W4A16", group_size: int = 32,
                              overwrite: bool = False, *, dtype: torch.dtype = torch.bfloat16,
                              max_shard_bytes: int = 4 << 30, schemes: dict[str, str] | None = None) -> Path:
    """Write `source` (a tensor source, see gemmaquant.export.source) as a compressed-tensors checkpoint directory.

    scheme: "W4A16" (int4 symmetric, `group_size` inputs per scale) or "W8A16" (int8 symmetric per output channel).
    dtype: the exported model's dtype: unquantized tensors and the scales are stored in it (vLLM loads scales in
        the model dtype, so scales that do not fit it exactly are refused rather than silently rounded).
    schemes: a per-layer mix, {tensor name: scheme} (gemmaquant.ct_mix: int4_g32_sym, int4_g64_sym, int4_g128_sym,
        int8, bf16; a tensor left out gets `scheme` / `group_size`), replacing `scheme` for those tensors: one
        config_group per scheme with `re:` targets naming its modules, bf16 ones in `ignore` (export/ct_targets.py).
    Returns out_dir. Raises ExportError for bad input (nothing is left at out_dir), FileExistsError when out_dir
    exists, is not empty and not `overwrite`.
    """
    if scheme not in SCHEMES:
        raise ExportError(f"unknown scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if schemes is not None:
        return _export_mix(source, out_dir, scheme, group_size, overwrite, dtype, max_shard_bytes, schemes)
    bits = SCHEMES[scheme]
    cfg = source.config
    per_word = 32 // bits
    unit = group_size if bits == 4 else per_word
    bad = sorted(k for k in _input_dims(cfg) if unit <= 0 or k % unit or k % per_word)
    if unit <= 0 or bad or (bits == 4 and group_size % per_word):
        raise ExportError(f"{scheme} with group_size {group_size} cannot hold rows of {bad[:3] or [group_size]} inputs "
                          f"(groups must divide every quantized matrix's input width, codes pack {per_word} per int32)")
    fmt = scheme_format(scheme, group_size, dtype)

    def tensors(n, value):
        return _quantized_tensors(n, value, fmt, bits, group_size if bits == 4 else None, dtype) \
            if is_quantized(n) else None

    return _write(source, out_dir, overwrite, dtype, max_shard_bytes, quantization_config(scheme, group_size), tensors)


def _write(source, out_dir, overwrite, dtype, max_shard_bytes, qc: dict, tensors) -> Path:
    """The export directory: every source tensor through `tensors(name, value)` (-> [(name relative to the text
    prefix, tensor)], or None for a tensor kept in `dtype`), the towers, config.json with `qc`, tokenizer files."""
    raw, prefix = _raw_config(source)
    names = list(source.names())
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ExportError(f"tensor name clash: the source lists {dup!r} twice")
    meta = {f"gemmaquant.{k}": str(v) for k, v in (source.metadata or {}).items()}
    with atomic_dir(out_dir, overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; the finished directory gets the usual permissions
        w = ShardWriter(tmp, max_shard_bytes, meta)
        for n in names:
            value = source.get(n)
            written = tensors(n, value)
            if written is not None:
                for key, t in written:
                    w.add(prefix + key, t)
            elif isinstance(value, torch.Tensor):
                w.add(n if n == "lm_head.weight" else prefix + n, value.to(dtype))
            else:
                raise ExportError(f"{n}: a {type(value).__name__} value, but this tensor is kept in float")
            del value
        _copy_towers(source, w)
        w.close()
        raw = dict(raw)
        if raw.get("model_type") == "gemma4":
            raw["text_config"] = {**raw.get("text_config", {}), "torch_dtype": str(dtype).removeprefix("torch.")}
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
        raw["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        write_model_card(tmp, raw, Path(source.source_dir).name if source.source_dir else Path(out_dir).name)
        if source.source_dir:
            for f in dict.fromkeys(TOKENIZER_FILES + EXTRA_FILES):
                if (Path(source.source_dir) / f).is_file():
                    shutil.copy2(Path(source.source_dir) / f, tmp / f)
    return Path(out_dir)


def _export_mix(source, out_dir, scheme, group_size, overwrite, dtype, max_shard_bytes, schemes) -> Path:
    """export_compressed_tensors with a scheme per tensor (see there)."""
    from gemmaquant.ct_mix import SCHEMES as MIX_SCHEMES, complete, unit_of
    from gemmaquant.export.ct_targets import mix_quantization_config
    from gemmaquant.export.gguf_mix import MixError

    cfg = source.config
    default = ("int8" if scheme == "W8A16" else f"int4_g{group_size}_sym")
    try:
        full = complete(cfg, schemes, default, "schemes", shared_experts=False)  # what vLLM loads
    except MixError as e:
        raise ExportError(str(e)) from None
    fmts = {}
    for t in set(full.values()) - {"bf16"}:
        bits, group = MIX_SCHEMES[t]
        fmts[t] = (scheme_format("W8A16" if bits == 8 else "W4A16", group or 0, dtype), bits, group)
    qc = mix_quantization_config({unit_of(n): t for n, t in full.items()}, IGNORE)

    def tensors(n, value):
        if not is_quantized(n):
            return None
        if full[n] == "bf16":
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"{n}: a {type(value).__name__} value, but the mix keeps it in bf16")
            # experts stay fused [E, N, K] as in the source checkpoint: vLLM's Gemma 4 loader explodes 3-D expert
            # tensors itself (_weight_iterator) and transformers reads them as its own parameters
            return [(n, value.to(dtype))]
        fmt, bits, group = fmts[full[n]]
        return _quantized_tensors(n, value, fmt, bits, group, dtype)

    return _write(source, out_dir, overwrite, dtype, max_shard_bytes, qc, tensors)


def _input_dims(cfg) -> set[int]:
    from gemmaquant.checkpoint import expected_shapes

    return {s[-1] for n, s in expected_shapes(cfg).items() if is_quantized(n)}


def _quantized_tensors(name: str, value, fmt, bits: int, group: int | None, dtype: torch.dtype):
    """-> [(name relative to the prefix, tensor)] for one quantized weight (experts: unfused per expert)."""
    base = name.removesuffix(".weight")
    if name.endswith(EXPERTS):
        layer = name.rsplit(".experts.", 1)[0]
        packs = value if isinstance(value, list) else list(value)  # a float [E, N, K] iterates over experts
        out = []
        for e, p in enumerate(packs):
            q, s = _codes(f"{name}[{e}]", p, fmt, bits, group, dtype)
            if name.endswith("gate_up_proj"):
                half = q.shape[0] // 2
                parts = (("gate_proj", q[:half], s[:half]), ("up_proj", q[half:], s[half:]))
            else:
                parts = (("down_proj", q, s),)
            for proj, qq, ss in parts:
                out += _module_tensors(f"{layer}.experts.{e}.{proj}", qq, ss, bits)
        return out
    if isinstance(value, list):
        raise ExportError(f"{name}: a list of Packed values for a 2-D weight")
    q, s = _codes(name, value, fmt, bits, group, dtype)
    return _module_tensors(base, q, s, bits)


def _codes(name, value, fmt, bits, group, dtype):
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.ndim != 2:
            raise ExportError(f"{name}: expected a float matrix, got {value.dtype} {list(value.shape)}")
        value = fmt.quantize(value.float())
    return codes_from_packed(value, bits, group, name, dtype)


def _module_tensors(base: str, q: torch.Tensor, scale: torch.Tensor, bits: int):
    return [(f"{base}.weight_packed", pack_int32(q, bits)), (f"{base}.weight_scale", scale),
            (f"{base}.weight_shape", torch.tensor(list(q.shape), dtype=torch.int64))]


def _copy_towers(source, w: ShardWriter) -> None:
    """Vision / audio tower tensors of the source checkpoint, byte-identical under their own names."""
    if not source.source_dir:
        return
    try:
        ckpt = source.checkpoint if hasattr(source, "checkpoint") else Checkpoint(source.source_dir)
    except ValueError:
        return
    for n in ckpt.tower_names():
        w.add(n, ckpt.get(n))
