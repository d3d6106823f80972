"""Where the quantizer works: choosing the device, moving one layer onto it, and keeping the calibration
activations there while they fit.

    resolve_device("auto")      -> cuda:0 when CUDA is there, else cpu;  "cpu", "cuda", "cuda:N" as named
    forward_dtype(recipe, dev)  -> the precision of the layer forward (recipe.forward_dtype; "auto": fp32 on the
                                   CPU, bf16 on a GPU). Hessians, GPTQ and AWQ always run in fp32 (fp64 sums on
                                   the CPU, as before) on the device.
    host_copy(state, dev)       -> a layer's tensors ready for the copy: pinned host memory when the target is
                                   CUDA, so `to_device` copies without blocking (and a prefetch thread can stage
                                   layer i+1 while layer i runs)
    ActivationBudget            -> calibration activations stay on the device while they fit the budget (default:
                                   half the free device memory at the start), else they live in host memory and
                                   each batch visits the device for its layer forward

On the CPU every function here returns its input unchanged (`Tensor.to` of a tensor already in place returns
the same tensor), so the CPU path computes exactly what it did before devices existed.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from gemmaquant.workflow import UsageError

FORWARD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(UsageError):
    """A device that is not there (`--device cuda` without CUDA, an index past the last GPU): the user's to fix."""


class DeviceMemoryError(DeviceError, MemoryError):
    """The device ran out of memory mid-run: a setting the user can lower (the CLI exits 2 with one line)."""


def out_of_memory(dev: torch.device, where: str, resume: str) -> DeviceMemoryError:
    """The one-line error for a torch.OutOfMemoryError on `dev` during `where`: which option lowers the memory,
    and what rerunning the same command does (`resume`)."""
    return DeviceMemoryError(
        f"out of memory on {device_name(dev)} in {where}; rerun with --activation-budget 0 (calibration "
        f"activations in host memory, the same result) and it {resume}; if that is not enough, start over with a "
        f"recipe of smaller batch_size, n_samples or seq_len")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' | None -> the first CUDA device when there is one, else the CPU; 'cpu'; 'cuda'; 'cuda:N'."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"--device {spec}: choose auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DeviceError(f"--device {spec}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec}: no CUDA device on this machine (use --device cpu or auto)")
    n = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= n:
        raise DeviceError(f"--device {spec}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                          f"(cuda:0{f' ... cuda:{n - 1}' if n > 1 else ''})")
    return torch.device("cuda", index)


def device_name(dev: torch.device) -> str:
    """What a report prints: 'cpu' or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model object's parameters (the CPU for a model without any, or on the meta device)."""
    for p in model.parameters():
        return torch.device("cpu") if p.device.type == "meta" else p.device
    return torch.device("cpu")


def forward_dtype(name: str, dev: torch.device) -> torch.dtype:
    """The layer forward's precision: `name` from the recipe ('auto', 'float32', 'bfloat16', 'float16')."""
    if name == "auto":
        return torch.float32 if dev.type == "cpu" else torch.bfloat16
    return FORWARD_DTYPES[name]


def autocast(dev: torch.device, dtype: torch.dtype):
    """The forward in `dtype` with fp32 weights kept as they are (norms and softmax stay fp32 under autocast);
    fp32 is no autocast at all, so the CPU default runs the exact fp32 forward."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(dev.type, dtype=dtype)


def host_copy(state: dict[str, Tensor], dev: torch.device) -> dict[str, Tensor]:
    """A layer's checkpoint tensors staged for the copy to `dev`: pinned when `dev` is CUDA (page-locked memory
    is what lets `non_blocking` copies overlap), unchanged otherwise (and so are the tensors of a model object
    already on the GPU: only CPU tensors can be pinned)."""
    if dev.type != "cuda" or not torch.cuda.is_available():
        return state
    return {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in state.items()}  # a model on the GPU


def to_device(t: Tensor, dev: torch.device) -> Tensor:
    """t on `dev` (the same tensor when it is already there); the copy does not block the host when t is pinned."""
    return t.to(dev, non_blocking=t.device.type == "cpu" and dev.type == "cuda")


def to_host(x):
    """Tensors (in a Packed, a list or a dict, any nesting) copied to the CPU; CPU tensors returned as they are."""
    from gemmaquant.formats.base import Packed

    if isinstance(x, Tensor):
        return x.cpu()
    if isinstance(x, Packed):
        return Packed(x.fmt, x.shape, {k: v.cpu() for k, v in x.data.items()})
    if isinstance(x, list):
        return [to_host(v) for v in x]
    if isinstance(x, dict):
        return {k: to_host(v) for k, v in x.items()}
    return x


def free_device_bytes(dev: torch.device) -> int | None:
    """Free memory on a CUDA device (None on the CPU)."""
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


@dataclass
class ActivationBudget:
    """Where the calibration activations live between layers: on the compute device while their bytes fit
    `budget_bytes`, else in host memory (each batch then goes to the device for its forward and comes back).

    budget_bytes None: half the device memory free when the run starts (the other half is for one layer's weights,
    its Hessians and the forward's temporaries); on the CPU there is one memory and nothing to decide."""

    device: torch.device
    budget_bytes: int | None = None

    def home(self, act_bytes: int) -> torch.device:
        if self.device.type == "cpu":
            return self.device
        budget = self.budget_bytes
        if budget is None:
            free = free_device_bytes(self.device)
            budget = free // 2 if free is not None else 0
        return self.device if act_bytes <= budget else torch.device("cpu")
