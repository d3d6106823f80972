"""The quantized Gemma 4 at inference: weights stay packed as the quantizer wrote them, and every hot op goes
through the `gemmaquant.ops` dispatcher (a Triton kernel on CUDA, the pure-torch reference elsewhere).

    model = load_quantized("out/.gemmaquant-work", dtype=torch.bfloat16, device="cuda")
    logits = model(ids)                             # int4 / int8 matmuls, MoE grouped GEMM, fused attention
    with gemmaquant.ops.use("reference"): ...       # the same model on the torch references

It is the reference model (`gemmaquant.model.gemma4.Gemma4`) with three swaps:
    PackedLinear    every quantized matrix: ops.linear on its Packed data (int4 group / int8 channel kernels;
                    any other format, the GGUF grids included, is dequantized per call)
    PackedExperts   the fused expert tensors of an MoE block: ops.moe_experts when both are int4-group (same
                    group size) or both int8-channel; otherwise one routed expert at a time, dequantized per call
    Attention.attend  ops.attention (causal / sliding-window GQA) instead of the reference's masked softmax
Norms, router, embeddings and PLE tables stay float (in `dtype`), as the quantizer keeps them. The logits equal
those of the float model built from the dequantized weights up to the order of floating-point sums
(tests/runtime/).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from gemmaquant import ops
from gemmaquant.formats import Int8Channel, IntGroup
from gemmaquant.formats.base import Packed
from gemmaquant.model.gemma4 import Gemma4, rope_inv_freqs


class PackedLinear(nn.Module):
    """y = x W^T for one quantized [N, K] weight; its Packed tensors are buffers (so .to(device) moves them)."""

    def __init__(self, packed: Packed):
        super().__init__()
        self.fmt, self.shape, self.keys = packed.fmt, tuple(packed.shape), tuple(packed.data)
        for k, t in packed.data.items():
            self.register_buffer(k, t)

    @property
    def packed(self) -> Packed:
        return Packed(self.fmt, self.shape, {k: getattr(self, k) for k in self.keys})

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.packed)

    def extra_repr(self) -> str:
        return f"{self.shape[1]} -> {self.shape[0]}, {self.fmt.name}"


def _kernel_kind(packs: list[Packed]) -> str | None:
    """"int4" / "int8" when ops.moe_experts takes these expert weights packed as they are, else None."""
    fmt = packs[0].fmt
    if isinstance(fmt, IntGroup) and fmt.bits_per_code == 4:
        return "int4"
    if isinstance(fmt, Int8Channel):
        return "int8"
    return None


class PackedExperts(nn.Module):
    """The routed experts of one MoE block (GEMMA4_SPEC §2.6), quantized per expert: gate_up [E, 2*Ie, H] (gate rows
    first) and down [E, H, Ie], each a list of E Packed. Same call as model.gemma4.Experts: (x, weights, ids)."""

    def __init__(self, gate_up: list[Packed], down: list[Packed]):
        super().__init__()
        kinds = {_kernel_kind(gate_up), _kernel_kind(down)}
        groups = {p.fmt.group_size for p in (gate_up[0], down[0]) if isinstance(p.fmt, IntGroup)}
        self.kind = kinds.pop() if len(kinds) == 1 and len(groups) <= 1 else None
        self.group_size = groups.pop() if groups else 0
        self.num_experts = len(gate_up)
        self.layouts = {}  # name -> (format, [N, K] of one expert, data keys); the data are the stacked buffers
        for name, packs in (("gate_up", gate_up), ("down", down)):
            self.layouts[name] = (packs[0].fmt, packs[0].shape, tuple(packs[0].data))
            for k in packs[0].data:  # stacked over experts: qdata [E, N, ...], scale / zero [E, N, ...]
                self.register_buffer(f"{name}_{k}", torch.stack([p.data[k] for p in packs]))

    def _stacked(self, name: str, key: str) -> Tensor | None:
        return getattr(self, f"{name}_{key}", None)

    def _expert(self, name: str, e: int) -> Packed:
        fmt, shape, keys = self.layouts[name]
        return Packed(fmt, shape, {k: self._stacked(name, k)[e] for k in keys})

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:  # x [N, H], weights / ids [N, k]
        if self.kind is not None:  # the router's weights already carry per_expert_scale
            return ops.moe_experts(x, ids, weights, self._stacked("gate_up", "qdata"), self._stacked("down", "qdata"),
                                   gate_up_scale=self._stacked("gate_up", "scale"),
                                   down_scale=self._stacked("down", "scale"),
                                   gate_up_zero=self._stacked("gate_up", "zero"),
                                   down_zero=self._stacked("down", "zero"), group_size=self.group_size)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():  # experts with no tokens cost nothing
            tok, slot = torch.where(ids == e)
            gate, up = ops.linear(x[tok], self._expert("gate_up", e)).chunk(2, dim=-1)
            h = torch.nn.functional.gelu(gate, approximate="tanh") * up
            y = ops.linear(h, self._expert("down", e))
            out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, {self.layouts['gate_up'][0].name}, {self.kind or 'dequantized per expert'}"


def ops_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """model.gemma4.attention's call on ops.attention. In the model the keys always end at the last query (the whole
    sequence; or the cached keys, a sliding layer's last W-1, followed by this call's), so the first query sits
    S - L positions after the first key: ops.attention's default offset. Masks depend on q_pos - k_pos alone, so
    the position tensors are not read (no device sync per layer)."""
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"attention: {k.shape[2]} keys for {q.shape[2]} queries; the keys must end at the last query")
    return ops.attention(q, k, v, window=window, scale=1.0)


def _set_tensor(model: nn.Module, name: str, t: Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def load_quantized(work, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> Gemma4:
    """The model of a finished quantizer work directory (`out/.gemmaquant-work`), a `QuantizedSource` or a
    `CompressedTensorsSource`, with packed weights on `device` and float tensors in `dtype`. Memory: the packed
    model, read one layer at a time."""
    from gemmaquant.quantized import QuantizedSource

    src = work if hasattr(work, "names") else QuantizedSource(os.fspath(work))
    with torch.device("meta"):
        model = Gemma4(src.config)
    experts: dict[str, list[Packed]] = {}
    for name in src.names():  # in layer order: the source reads each layer file once
        try:
            v = src.get(name)
        except KeyError:
            from gemmaquant.checkpoint import CheckpointError

            raise CheckpointError(f"{src.work}: tensor {name!r} is missing") from None
        if isinstance(v, Tensor):
            _set_tensor(model, name, v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype))
        elif isinstance(v, Packed):
            _swap(model, name.removesuffix(".weight"), PackedLinear(_to(v, device)))
        else:  # a fused expert tensor: one Packed per expert
            experts[name] = [_to(e, device) for e in v]
            block = name.rpartition(".")[0]  # layers.i.experts
            pair = experts.get(block + ".gate_up_proj"), experts.get(block + ".down_proj")
            if all(pair):
                _swap(model, block, PackedExperts(*pair))
                del experts[block + ".gate_up_proj"], experts[block + ".down_proj"]
    if experts:
        raise ValueError(f"{src.work}: {next(iter(experts))!r} is quantized but its partner expert tensor is not")
    for layer in model.layers:
        layer.self_attn.attend = ops_attention
    for kind, inv in rope_inv_freqs(model.config).items():  # non-persistent buffers are not in the work dir
        model.register_buffer(f"inv_freq_{kind}", inv.to(device), persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{src.work}: tensor {left[0]!r} was not in the work directory ({len(left)} missing)")
    return model.eval()


class CompressedTensorsSource:
    """A pack-quantized compressed-tensors directory (export_compressed_tensors, W4A16 / W8A16) as load_quantized's
    source, its codes repacked without rounding into the formats the kernels read:
        W4A16: int32 words of 8 offset codes (ct_pack.py) -> IntGroup(4, g, symmetric) nibbles u = q + 8
        W8A16: int32 words of 4 offset codes -> Int8Channel int8 q, scale [N]
    Per-expert tensors (experts.{e}.{gate,up,down}_proj) are fused back: gate_up = gate rows, then up rows.
    A per-layer mix (gemmaquant.ct_mix) gives each module its own scheme; its bf16 modules come back as float."""

    def __init__(self, path: str | os.PathLike):
        from gemmaquant.checkpoint import Checkpoint
        from gemmaquant.export.compressed_tensors_reader import _check_groups, quantization_config

        self.work = Path(path)
        self.ckpt = Checkpoint(self.work)
        self.qc = quantization_config(self.ckpt.raw_config)
        _check_groups(self.qc, self.work)
        self.config = self.ckpt.config

    def names(self) -> list[str]:
        from gemmaquant.checkpoint import expected_shapes

        return list(expected_shapes(self.config))

    def _packed(self, base: str) -> Packed:
        from gemmaquant.export.compressed_tensors_reader import _module_bits, read_packed

        bits = _module_bits(self.qc, self.ckpt, base)
        q, scale = read_packed(self.ckpt, base, bits)  # checked: dtypes, shapes, finite scales
        shape = tuple(q.shape)
        if bits == 8:
            return Int8Channel(scale.dtype).pack(q, {"scale": scale[:, 0]})
        return IntGroup(4, shape[1] // scale.shape[1], True, scale.dtype).pack(q, {"scale": scale})  # u = q + 8

    def get(self, name: str):
        from gemmaquant.export.compressed_tensors import EXPERTS, is_quantized
        from gemmaquant.export.compressed_tensors_reader import _module_bits

        base = name.rsplit(".experts.", 1)[0] + ".experts.0.gate_proj" if name.endswith(EXPERTS) \
            else name.removesuffix(".weight")
        # a per-layer mix's bf16 modules (and every norm, embedding, router) are read as float, below
        packed = is_quantized(name) and _module_bits(self.qc, self.ckpt, base) is not None
        if packed and name.endswith(EXPERTS):
            layer = name.rsplit(".experts.", 1)[0]
            if name.endswith("down_proj"):
                return [self._packed(f"{layer}.experts.{e}.down_proj") for e in range(self.config.num_experts)]
            out = []
            for e in range(self.config.num_experts):
                g, u = (self._packed(f"{layer}.experts.{e}.{p}") for p in ("gate_proj", "up_proj"))
                out.append(Packed(g.fmt, (g.shape[0] + u.shape[0], g.shape[1]),
                                  {k: torch.cat([g.data[k], u.data[k]]) for k in g.data}))
            return out
        if packed:
            return self._packed(name.removesuffix(".weight"))
        from gemmaquant.checkpoint import CheckpointError
        from gemmaquant.validate import require_finite

        t = self.ckpt.get(name)
        require_finite(t, self.ckpt.full_name(name), self.work, CheckpointError)
        return t


def work_dir_of(path: str | os.PathLike) -> Path | None:
    """The quantizer work directory at `path` (a `gemmaquant quantize --out` directory or the work directory
    itself), or None."""
    from gemmaquant.quantize import WORK_DIR

    for d in (Path(path) / WORK_DIR, Path(path)):
        if (d / "state.json").is_file() and (d / "globals.safetensors").is_file():
            return d
    return None


def load_for_inference(model: str | os.PathLike, device: str | torch.device | None = None) -> Gemma4:
    """What `gemmaquant eval` and `bench` run: a quantizer work directory or a compressed-tensors export as the
    packed model (bf16 on CUDA, fp32 on CPU); anything else through `gemmaquant.load` (a GGUF comes back
    dequantized)."""
    import gemmaquant
    from gemmaquant.export.compressed_tensors_reader import is_compressed_tensors

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = work_dir_of(model) if Path(model).is_dir() else None
    if work is not None:
        return load_quantized(work, dtype, device)
    if Path(model).is_dir() and is_compressed_tensors(Path(model)):
        return load_quantized(CompressedTensorsSource(model), dtype, device)
    return gemmaquant.load(model, device=device)


def _to(p: Packed, device) -> Packed:
    return Packed(p.fmt, p.shape, {k: t.to(device) for k, t in p.data.items()})
