"""Hugging Face Gemma 4 checkpoints on disk: a lazy reader and an atomic sharded writer.

Reading never loads more than the tensors asked for: `Checkpoint` keeps a name -> (shard, byte range) index
from the safetensors headers and reads each tensor with a plain positioned read (no memory map, whose touched
pages would stay resident), so `layer_state(i)` costs one layer's bytes and a 31B checkpoint never has to fit
in RAM. Pickle checkpoints (`*.bin`, `*.pt`) are refused, never unpickled.

Both layouts released for Gemma 4 are understood (GEMMA4_SPEC.md §3.1):
  Gemma4ForConditionalGeneration  model.language_model.<name>, towers under model.vision_tower / audio_tower /
                                   embed_vision / embed_audio (kept readable for pass-through export)
  Gemma4ForCausalLM               model.<name> (+ lm_head.weight when untied)
Text names returned here have the prefix stripped: `layers.3.self_attn.q_proj.weight`, `embed_tokens.weight`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from gemmaquant.config import ConfigError, Gemma4Config
from gemmaquant.errors import GemmaquantError
from gemmaquant.safetensors_write import save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOWER_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
TEXT_PREFIXES = ("model.language_model.", "model.")  # longest first
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "processor_config.json")


class CheckpointError(GemmaquantError, ValueError):
    """A checkpoint that cannot be read as a Gemma 4 model; the message names the file and tensor."""


class Checkpoint:
    """Lazy view of a local checkpoint directory (config.json + one or many safetensors shards)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face checkpoint directory)")
        cfg_file = self.path / "config.json"
        self.raw_config = read_config_json(self.path)
        try:
            self.config = Gemma4Config.from_hf_dict(self.raw_config, source=str(cfg_file))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self._files: dict[str, object] = {}
        self.weight_map = self._index()  # full checkpoint name -> shard file name
        self.prefix = next((p for p in TEXT_PREFIXES
                            if any(k.startswith(p + "layers.") or k == p + "embed_tokens.weight"
                                   for k in self.weight_map)), None)
        if self.prefix is None:
            raise CheckpointError(f"{self.path}: no Gemma 4 text weights found "
                                  f"(expected names like 'model.language_model.embed_tokens.weight')")

    # ---- index ----
    def _index(self) -> dict[str, str]:
        index_file = self.path / "model.safetensors.index.json"
        shards = sorted(self.path.glob("*.safetensors"))
        if index_file.is_file():
            weight_map = read_json(index_file, "index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_file}: unreadable index (no weight_map of tensor name -> shard file)")
            for name, shard in weight_map.items():
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{self.path / shard}: shard missing (listed in {index_file.name} "
                                          f"for tensor {name!r})")
            return weight_map
        if not shards:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CheckpointError(f"{self.path / pickles[0]}: pickle checkpoints are never loaded (unpickling "
                                      f"runs arbitrary code); convert it to safetensors first")
            raise CheckpointError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
        weight_map = {}
        for shard in shards:
            for name in self._open(shard.name)["tensors"]:
                weight_map[name] = shard.name
        return weight_map

    def _open(self, shard: str) -> dict:
        """The parsed safetensors header of `shard`: name -> {dtype, shape, data_offsets}, plus the data start."""
        if shard not in self._files:
            self._files[shard] = read_safetensors_header(self.path / shard)
        return self._files[shard]

    # ---- names ----
    def text_names(self) -> list[str]:
        """Text-decoder tensor names (prefix stripped), excluding dead K/V weights of KV-shared layers."""
        out = []
        for full in self.weight_map:
            if full.startswith(TOWER_PREFIXES) or not (full.startswith(self.prefix) or full == "lm_head.weight"):
                continue
            name = full if full == "lm_head.weight" else full[len(self.prefix):]
            if not self._is_dead(name):
                out.append(name)
        return out

    def tower_names(self) -> list[str]:
        """Vision/audio tower tensors (full names), skipped by the text model, copied through by exporters."""
        return [n for n in self.weight_map if n.startswith(TOWER_PREFIXES)]

    def _is_dead(self, name: str) -> bool:
        # Released E2B/E4B checkpoints still hold k_proj/v_proj/k_norm for KV-shared layers (spec §2.4)
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "self_attn":
            i = int(parts[1])
            return self.config.is_kv_shared(i) and parts[3] in ("k_proj", "v_proj", "k_norm", "v_norm")
        return False

    def full_name(self, name: str) -> str:
        return name if name == "lm_head.weight" else self.prefix + name

    # ---- tensors ----
    def _entry(self, name: str) -> tuple[str, dict]:
        full = name if name.startswith(TOWER_PREFIXES) else self.full_name(name)
        shard = self.weight_map.get(full)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {full!r} missing from the checkpoint")
        entry = self._open(shard)["tensors"].get(full)
        if entry is None:
            raise CheckpointError(f"{self.path / shard}: tensor {full!r} listed in the index but not in the shard")
        return shard, entry

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        shard, e = self._entry(name)
        begin, end = e["data_offsets"]
        t = torch.empty(e["shape"], dtype=e["dtype"])
        nbytes = t.numel() * t.element_size()
        if end - begin != nbytes:
            raise CheckpointError(f"{self.path / shard}: tensor {name!r} has {end - begin} bytes for shape "
                                  f"{e['shape']} ({nbytes} expected)")
        with open(self.path / shard, "rb") as f:
            f.seek(self._open(shard)["data_start"] + begin)
            got = f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()) if nbytes else bytearray())
        if got != nbytes:
            raise CheckpointError(f"{self.path / shard}: truncated file, tensor {name!r} incomplete")
        return t if dtype is None else t.to(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[1]["dtype"]

    def layer_state(self, i: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Layer i's tensors with names relative to the layer (`self_attn.q_proj.weight`, ...)."""
        pre = f"layers.{i}."
        return {n[len(pre):]: self.get(n, dtype) for n in self.text_names() if n.startswith(pre)}

    def global_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {n: self.get(n, dtype) for n in self.text_names() if not n.startswith("layers.")}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from `path` (UTF-8); CheckpointError naming the file for anything else."""
    from gemmaquant.validate import read_utf8

    try:
        d = json.loads(read_utf8(path, CheckpointError, what, missing="missing"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_config_json(directory: Path) -> dict:
    """A checkpoint directory's config.json as a dict; CheckpointError naming the file when it is missing or bad."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory)")
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (every Hugging Face checkpoint has a config.json)")
    return read_json(cfg_file, "config")


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header (8-byte little-endian length, then JSON); validate it against the file as the
    safetensors library does (every tensor's bytes match its dtype and shape, the tensors tile the data exactly,
    which is the rest of the file); read no tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    tensors, spans = {}, []
    data_len = size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[e["dtype"]]
            begin, end = (int(x) for x in e["data_offsets"])
            shape = [int(d) for d in e["shape"]]
            if any(d < 0 for d in shape) or not isinstance(e["shape"], list):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} ({str(e)[:200]})") from None
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of "
                                  f"{data_len}: truncated or corrupt)")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * DTYPE_BYTES[e["dtype"]]:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} "
                                  f"{e['dtype']} ({numel * DTYPE_BYTES[e['dtype']]} expected)")
        tensors[name] = {"dtype": dtype, "dtype_name": e["dtype"], "shape": shape, "data_offsets": (begin, end)}
        spans.append((begin, end, name))
    at, before = 0, None
    for begin, end, name in sorted(spans):
        if begin != at:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {at} "
                                  f"{f'where {before!r} ends ' if before else ''}(overlapping or corrupt offsets)")
        at, before = end, name
    if at != data_len:
        raise CheckpointError(f"{path}: the tensors end at byte {at} of {data_len} bytes of data (corrupt header "
                              f"or a file with trailing bytes)")
    metadata = header.get("__metadata__") or {}
    return {"tensors": tensors, "data_start": 8 + n, "metadata": metadata if isinstance(metadata, dict) else {}}


def expected_shapes(cfg: Gemma4Config) -> dict[str, tuple[int, ...]]:
    """Every text tensor's shape for a config, from the reference model built on the meta device (once per
    config: a fresh dict each call)."""
    key = repr(cfg)  # every field's value (a config may hold a list, e.g. eos_token_id, so it is not hashable)
    if key not in _SHAPES:
        from gemmaquant.model.gemma4 import Gemma4

        with torch.device("meta"), _NoInit():
            m = Gemma4(cfg)
        if len(_SHAPES) >= 16:
            _SHAPES.clear()
        _SHAPES[key] = {n: tuple(t.shape) for n, t in m.state_dict().items()}
    return dict(_SHAPES[key])


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


class _NoInit(torch.overrides.TorchFunctionMode):
    """Skips torch.nn.init's random fills while a model is built on the meta device, where they fill nothing:
    on meta, normal_ runs a Python reference whose first call imports torch._dynamo (about a second)."""

    SKIPPED = {torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.trunc_normal_,
               torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def load_state_into(model: torch.nn.Module, ckpt: Checkpoint, dtype: torch.dtype, device="cpu",
                    check_finite: bool = True) -> torch.nn.Module:
    """Materialise a meta-device model tensor by tensor from `ckpt`, checking names, shapes, dtypes and values."""
    from gemmaquant.validate import check_float_checkpoint, require_finite

    check_float_checkpoint(ckpt)
    state = {}
    for name in model.state_dict():
        t = ckpt.get(name).to(device=device, dtype=dtype)
        if check_finite:
            require_finite(t, ckpt.full_name(name), ckpt.path / ckpt.weight_map[ckpt.full_name(name)],
                           CheckpointError)
        state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model


# ---------------------------------------------------------------------------------------------------------
# writing


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; on success rename it to `out` (replacing it only if overwrite)."""
    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = 4 << 30,
                  metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as model.safetensors, or as model-0000i-of-0000n.safetensors + index when large."""
    groups, size, total = [[]], 0, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
        total += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(groups) == 1:
        save_file({n: tensors[n].contiguous() for n in groups[0]}, str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(out / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def hf_config_dict(cfg: Gemma4Config, multimodal: bool = False, dtype: torch.dtype = torch.bfloat16,
                   extra: dict | None = None) -> dict:
    text = cfg.to_hf_dict()
    dtype_name = str(dtype).removeprefix("torch.")
    if not multimodal:
        return {**text, "architectures": ["Gemma4ForCausalLM"], "torch_dtype": dtype_name, **(extra or {})}
    return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text,
            "torch_dtype": dtype_name, "tie_word_embeddings": cfg.tie_word_embeddings, **(extra or {})}


def save_checkpoint(model: torch.nn.Module, out: str | os.PathLike, *, multimodal: bool = False,
                    dtype: torch.dtype = torch.bfloat16, tokenizer_dir: str | os.PathLike | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None, extra_config: dict | None = None,
                    max_shard_bytes: int = 4 << 30, overwrite: bool = False) -> Path:
    """Save a reference `Gemma4` as a Hugging Face checkpoint (CausalLM or multimodal naming), atomically.

    `extra_tensors` (full names, e.g. vision tower weights) are written as they are.
    """
    cfg = model.config
    prefix = "model.language_model." if multimodal else "model."
    tensors = {prefix + n: t.detach().to(dtype) for n, t in model.state_dict().items()}
    tensors.update(extra_tensors or {})
    with atomic_dir(out, overwrite) as tmp:
        write_sharded(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, multimodal, dtype, extra_config), indent=2))
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / f).is_file():
                    shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
    return Path(out)
