"""QAT's state across steps: the moving average that is exported, and the resumable checkpoint.

A checkpoint is one safetensors file (never pickle): the model's state dict under `model::`, the average under
`avg::`, AdamW's per-parameter tensors under `opt::<index>::<name>`, and in the metadata the step, the loss log,
the optimizer's param groups and a fingerprint of the run (recipe, model, data), so that a checkpoint of another
run is refused instead of resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gemmaquant.qat.prepare import QATError


def save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, fingerprint: str,
               log: list[dict], average: "WeightAverage | None" = None, skip: set[str] = frozenset(),
               extra: dict[str, str] | None = None) -> None:
    """skip: state-dict names left out (frozen tensors the model shares with the teacher: restored with it);
    extra: more metadata (the held-out selection's record, gemmaquant.qat.heldout)."""
    from gemmaquant.quantized import save_atomic

    tensors = {f"model::{k}": v.detach().contiguous() for k, v in model.state_dict().items() if k not in skip}
    if average is not None:
        tensors |= {f"avg::{k}": v.contiguous() for k, v in average.avg.items()}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt::{i}::{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
    meta = {"step": str(step), "fingerprint": fingerprint, "log": json.dumps(log),
            "param_groups": json.dumps([{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                                        for g in sd["param_groups"]]), **(extra or {})}
    save_atomic(tensors, path, meta)


def load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, fingerprint: str,
               average: "WeightAverage | None" = None, skip: set[str] = frozenset()) -> tuple[int, list]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if meta.get("fingerprint") != fingerprint:
            raise QATError(f"{path}: a QAT checkpoint of another run (model, recipe or data differ); remove it "
                           f"or choose another output directory")
        t = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len("model::"):]: v for k, v in t.items() if k.startswith("model::")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != skip or unexpected:
        raise QATError(f"{path}: the checkpoint does not match the model (missing {sorted(set(missing) - skip)}, "
                       f"unexpected {sorted(unexpected)})")
    state: dict[int, dict] = {}
    for k, v in t.items():
        if k.startswith("opt::"):
            _, i, name = k.split("::")
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    if average is not None:
        average.avg = {k: t[f"avg::{k}"] for k in average.avg}
    return int(meta["step"]), json.loads(meta["log"])



class WeightAverage:
    """Exponential moving average of the trained parameters (Polyak averaging), swapped in before `convert`.
    With a straight-through estimator, latent weights near a rounding threshold oscillate across it from step to
    step, and the last step's side is chance (Nagel et al. 2022, "Overcoming Oscillations in QAT"); the average
    rounds to the side where the weight spent its time, and averages out the gradient noise of the rest.
    Memory: one fp32 copy of every trained tensor (as much again as one of AdamW's two moment buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.avg = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.avg[n].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.avg[n].to(p.dtype))
