"""QAT checkpoints (Google's Gemma 4 QAT bf16 weights, or any checkpoint already on an int4 group-32 lattice):
detect them, read their lattice back instead of rounding it again, and say what was done.

    detect_lattice(src, plan)      layer 0's planned matrices, a few rows each: is this a QAT checkpoint?
    choose_lattice(src, recipe, from_qat)
                                   None (auto): the default int4 g32 recipe switches to the lattice grid
                                   (`int4_g32_lattice`) when detection finds >= DETECT_SHARE of the sampled
                                   groups on it; True forces it (error if the checkpoint is on no lattice);
                                   False never does
    scan_lattice(src, plan)        every planned matrix, layer by layer (streaming): recovered share per tensor
                                   (`quantize --dry-run`)

With the lattice grid the quantizer (layer_quant.py) keeps every recovered group's step and codes as they are and
re-rounds only the other groups with the recipe's method; each layer's record lists per tensor the recovered
groups, what re-rounded the rest, and the Q4_0 cost of steps fp16 cannot hold (see algorithms/lattice.py).
"""

from __future__ import annotations

import dataclasses

from gemmaquant.errors import GemmaquantError
from gemmaquant.progress import progress as progress_lines

LATTICE_FORMAT = "int4_g32_lattice"
LATTICE_BASES = ("int4_g32_sym", LATTICE_FORMAT)  # the recipes whose grid the lattice replaces exactly
DETECT_SHARE = 0.9  # sampled groups on the lattice for `quantize` to treat a checkpoint as QAT
FORCED_MIN_SHARE = 0.5  # --from-qat on a checkpoint whose first tensors are mostly off the lattice: an error
DETECT_ROWS = 16  # rows per matrix read by the detection


class LatticeError(GemmaquantError, ValueError):
    pass


def _matrices(state: dict, plan_layer: dict):
    """(name, [N, K] view) for every planned quantized matrix of one layer (experts: each expert)."""
    for name, p in plan_layer.items():
        t = state.get(name)
        if p.fmt is None or t is None or t.ndim < 2:
            continue
        yield name, t.reshape(-1, t.shape[-1])


def _layer_plan(plan: dict, i: int) -> dict:
    pre = f"layers.{i}."
    return {k[len(pre):]: v for k, v in plan.items() if k.startswith(pre)}


def detect_lattice(src, plan: dict) -> list[tuple[str, float]]:
    """[(tensor name, share of its sampled groups on the lattice)] for layer 0's planned matrices."""
    from gemmaquant.algorithms.lattice import lattice_share

    return [(f"layers.0.{n}", lattice_share(m, DETECT_ROWS)) for n, m in _matrices(src.layer_state(0),
                                                                                   _layer_plan(plan, 0))]


def lattice_recipe(recipe):
    from gemmaquant.recipe import Recipe

    return Recipe.from_dict({**recipe.to_dict(), "weight_format": LATTICE_FORMAT})


def choose_lattice(src, recipe, from_qat: bool | None) -> tuple[object, dict | None]:
    """-> (the recipe to run, the detection record or None when not looked at). See the module docstring."""
    from gemmaquant.plan import make_plan

    if from_qat is False:
        return recipe, None
    fits = recipe.gguf_type is None and recipe.weight_format in LATTICE_BASES
    if not fits:
        if from_qat:
            raise LatticeError(f"--from-qat reads an int4 group-32 lattice; the recipe quantizes onto "
                               f"{recipe.gguf_type or recipe.weight_format} (use the default 4-bit recipe)")
        return recipe, None
    shares = detect_lattice(src, make_plan(src.config, lattice_recipe(recipe)))
    total = sum(s for _, s in shares) / max(len(shares), 1)
    record = {"sampled_share": round(total, 6), "tensors": dict(shares), "forced": bool(from_qat)}
    if from_qat:
        if total < FORCED_MIN_SHARE:
            name, share = next((n, s) for n, s in shares if s < FORCED_MIN_SHARE) if shares else ("?", 0.0)
            raise LatticeError(f"--from-qat: the checkpoint is not on an int4 group-32 lattice: tensor {name!r} "
                               f"has {100 * share:.1f}% of its groups on one (sampled {DETECT_ROWS} rows)")
    elif total < DETECT_SHARE:
        return recipe, {**record, "detected": False}
    return lattice_recipe(recipe), {**record, "detected": True}


def scan_lattice(src, plan: dict, progress: bool | None = None) -> list[dict]:
    """Every planned matrix of every layer, read one layer at a time: [{tensor, groups, recovered, share,
    fp16_inexact}]."""
    from gemmaquant.algorithms.lattice import recover_lattice

    rows = []
    layers = src.config.num_hidden_layers
    for i in progress_lines(range(layers), desc="lattice", unit="layer", total=layers, enabled=progress):
        state = src.layer_state(i)
        for name, m in _matrices(state, _layer_plan(plan, i)):
            fit = recover_lattice(m)
            rows.append({"tensor": f"layers.{i}.{name}", "groups": fit.groups, "recovered": fit.recovered,
                         "share": round(fit.share, 6), "fp16_inexact": fit.fp16_inexact()})
        del state
    return rows


def scan_text(rows: list[dict]) -> str:
    """The dry run's lines: totals, then every tensor that is not wholly on the lattice."""
    groups = sum(r["groups"] for r in rows)
    rec = sum(r["recovered"] for r in rows)
    whole = sum(r["recovered"] == r["groups"] for r in rows)
    lines = [f"lattice: {rec}/{groups} groups of 32 ({100 * rec / max(groups, 1):.2f}%) read back exactly; "
             f"{whole}/{len(rows)} tensors wholly on the lattice; "
             f"{sum(r['fp16_inexact'] for r in rows)} steps not exact in fp16 (Q4_0's d)"]
    for r in rows:
        if r["recovered"] != r["groups"]:
            lines.append(f"  {r['tensor']}: {100 * r['share']:.2f}% on the lattice; "
                         f"{r['groups'] - r['recovered']} groups re-rounded by the recipe's method")
    return "\n".join(lines)


@dataclasses.dataclass
class LatticeLog:
    """What the quantizer did with each lattice-format tensor of one layer (layer_quant fills it)."""

    tensors: dict = dataclasses.field(default_factory=dict)

    def add(self, name: str, fit, method: str, w) -> None:
        e = self.tensors.setdefault(name, {"groups": 0, "recovered": 0, "fp16_inexact": 0, "fp16_max_error": 0.0,
                                           "rerounded_by": None})
        e["groups"] += fit.groups
        e["recovered"] += fit.recovered
        e["fp16_inexact"] += fit.fp16_inexact()
        if fit.fp16_inexact():
            e["fp16_max_error"] = max(e["fp16_max_error"], fit.fp16_max_error(w))
        if fit.recovered != fit.groups:
            e["rerounded_by"] = method


def lattice_summary(layers: list[dict]) -> dict | None:
    """The run's lattice record from its layer records: totals and the re-rounded tensors (None: no lattice)."""
    entries = {f"layers.{info['layer']}.{n}": e for info in layers for n, e in (info.get("lattice") or {}).items()}
    if not entries:
        return None
    groups = sum(e["groups"] for e in entries.values())
    rec = sum(e["recovered"] for e in entries.values())
    return {"groups": groups, "recovered": rec, "share": rec / max(groups, 1),
            "fp16_inexact": sum(e["fp16_inexact"] for e in entries.values()),
            "fp16_max_error": max(e["fp16_max_error"] for e in entries.values()),
            "rerounded": {n: {"groups": e["groups"] - e["recovered"], "by": e["rerounded_by"]}
                          for n, e in entries.items() if e["recovered"] != e["groups"]}}


def summary_text(s: dict) -> str:
    lines = [f"  QAT lattice read back: {s['recovered']}/{s['groups']} groups ({100 * s['share']:.2f}%) keep the "
             f"checkpoint's own step and codes"]
    if s["fp16_inexact"]:
        lines.append(f"  {s['fp16_inexact']} steps are not fp16 values: Q4_0 stores fp16(d), max error "
                     f"{s['fp16_max_error']:.3g}")
    for n, r in s["rerounded"].items():
        lines.append(f"  re-rounded by {r['by']}: {n} ({r['groups']} groups off the lattice)")
    return "\n".join(lines)


# ---- a compressed-tensors W4A16 checkpoint, repacked to Q4_0 GGUF ---------------------------------------------
class CompressedTensorsSource:
    """A pack-quantized int4 group-32 compressed-tensors checkpoint (Google's W4A16 release, or gemmaquant's own)
    as a tensor source for `export_gguf`: each quantized weight is the Packed `Int4Lattice` of its stored codes
    and scales, so the GGUF exporter writes them as Q4_0 blocks (d = the scale, u = q + 8) with no rounding.
    Float tensors are the stored ones. Scales must be bf16 or fp16 values (Q4_0's d is fp16: a scale fp16 cannot
    hold is an error naming the tensor, never a silent rounding)."""

    def __init__(self, path):
        from pathlib import Path

        from gemmaquant.checkpoint import Checkpoint
        from gemmaquant.export.compressed_tensors_reader import _bits, quantization_config

        self.checkpoint = Checkpoint(path)
        self.path = Path(path)
        bits = _bits(quantization_config(self.checkpoint.raw_config), self.path)
        if bits != 4:
            raise LatticeError(f"{self.path}: a {bits}-bit compressed-tensors checkpoint; Q4_0 repacking needs int4")
        self.config = self.checkpoint.config
        self.source_dir = self.path
        self.metadata = {"repacked_from": "compressed-tensors W4A16"}

    def names(self) -> list[str]:
        from gemmaquant.checkpoint import expected_shapes

        return list(expected_shapes(self.config))

    def _packed(self, base: str):
        import torch

        from gemmaquant.export.compressed_tensors_reader import read_packed
        from gemmaquant.formats.int4_lattice import INT4_LATTICE

        codes, scale = read_packed(self.checkpoint, base, 4)
        n, k = codes.shape
        if scale.shape[1] * 32 != k:
            raise LatticeError(f"{self.path}: {base} has groups of {k // scale.shape[1]}; Q4_0 blocks are 32")
        half = scale.to(torch.float16)
        if not torch.equal(half.double(), scale.double()):
            raise LatticeError(f"{self.path}: {base}.weight_scale holds a value fp16 cannot store exactly, so it "
                               f"cannot be Q4_0's d without rounding")
        return INT4_LATTICE.pack(codes.to(torch.int32), {"scale": scale.to(torch.bfloat16)}) \
            if torch.equal(scale.to(torch.bfloat16).double(), scale.double()) else _fp16_packed(codes, half)

    def get(self, name: str):
        from gemmaquant.export.compressed_tensors import EXPERTS, is_quantized

        if name.endswith(EXPERTS):
            layer = name.rsplit(".experts.", 1)[0]
            projs = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            return [_concat([self._packed(f"{layer}.experts.{e}.{p}") for p in projs])
                    for e in range(self.config.num_experts)]
        if is_quantized(name):
            return self._packed(name.removesuffix(".weight"))
        return self.checkpoint.get(name)


def _fp16_packed(codes, scale16):
    """Codes with fp16 scales that bf16 cannot hold: GGUFLegacy Q4_0 directly (d = scale, u = q + 8)."""
    import torch

    from gemmaquant.formats import Q4_0

    return Q4_0.pack((codes.to(torch.int32) + 8), {"d": scale16})


def _concat(packs: list):
    import torch

    from gemmaquant.formats.base import Packed

    if len(packs) == 1:
        return packs[0]
    fmt = packs[0].fmt
    if any(type(p.fmt) is not type(fmt) for p in packs):
        raise LatticeError("gate and up projections of one expert hold scales of different precisions")
    data = {k: torch.cat([p.data[k] for p in packs]) for k in packs[0].data}
    return Packed(fmt, (sum(p.shape[0] for p in packs), packs[0].shape[1]), data)


def run_repack(model, *, out=None, overwrite: bool = False, dry_run: bool = False,
               progress: bool | None = None) -> dict:
    """`gemmaquant quantize CT_DIR`: a compressed-tensors W4A16 g32 checkpoint -> `<name>-Q4_0.gguf` in out,
    its codes and scales repacked (no rounding, no calibration)."""
    from pathlib import Path

    from gemmaquant.export import export_gguf
    from gemmaquant.lock import hold
    from gemmaquant.outputs import removed_if_left_empty
    from gemmaquant.progress import stage
    from gemmaquant.workflow import prepare_out

    src = CompressedTensorsSource(model)
    name = Path(str(model)).name
    out = Path(out) if out is not None else Path(f"{name}-q4_0")
    target = out / f"{name}-Q4_0.gguf"
    if dry_run:
        return {"dry_run": True, "model": str(model), "repack": str(target),
                "text": f"{model}: compressed-tensors W4A16 g32; would repack its codes and scales into {target} "
                        f"(Q4_0, no rounding)"}
    with removed_if_left_empty(out), hold(out):
        prepare_out(out, overwrite, (target.name,))
        stage(f"repacking {model} (compressed-tensors W4A16) into {target}", progress)
        export_gguf(src, target, type="Q4_0", overwrite=True)
    return {"model": str(model), "out": str(out), "files": {"gguf": str(target)},
            "text": f"repacked {model} (compressed-tensors W4A16 g32) into {target}: Q4_0 blocks hold its codes "
                    f"and scales as they are (no rounding)"}
