"""Run device code on a CPU-only machine with every tensor a FakeTensor on 'cuda': shapes, dtypes and devices are
computed, values are not. A tensor left on the CPU meets a 'cuda' tensor in some op and FakeTensorMode raises
(FakeTensorDeviceMismatchError), which is what these tests are for.

Fake tensors have no values, so the few questions the pipeline asks of values (`.item()`, `.tolist()`,
`bool(t)`, `unique`, `nonzero`, boolean masks) get fixed answers from `HostAnswers`: `t.all()` True, `t.any()`
False, other bools False, int32 0 (so a Cholesky's `info` reads success), other ints 1, floats 1.0, and
data-dependent shapes take their largest size.
Numbers computed under it mean nothing; only the devices and the control flow are real.

Two more stand-ins: in a CPU-only build, Python indexing (`t[i]`, `t[a:b] = x`) of a fake CUDA tensor and
`Tensor.to('cuda')` fail before dispatch (the bindings take a CUDA device guard or initialise CUDA), so inside
`fake_cuda()` FakeTensor's __getitem__ / __setitem__ are the same indexing written with aten ops (select, slice,
unsqueeze, index, index_put_), `float(t)` / `int(t)` read the answers above, and Tensor.to onto CUDA is
aten._to_copy.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostAnswers(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (aten.any, aten.all):  # bool(t.any()) reads False, bool(t.all()) True:
            out = func(*args, **kwargs)                  # "all finite", "none negative", ... the normal case
            out._host_answer = func.overloadpacket is aten.all
            return out
        if func is aten._local_scalar_dense.default:
            t = args[0]
            if t.dtype == torch.bool:
                return getattr(t, "_host_answer", False)
            if t.dtype == torch.int32:
                return 0
            return 1 if not t.is_floating_point() else 1.0
        if func is aten.nonzero.default:
            t = args[0]
            return torch.zeros(t.numel(), t.dim(), dtype=torch.long, device=t.device)
        if func in (aten._unique2.default, aten.unique_consecutive.default, aten._unique.default):
            t = args[0]
            flat = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
            outs = (flat, torch.zeros(t.shape, dtype=torch.long, device=t.device),
                    torch.ones(t.numel(), dtype=torch.long, device=t.device))
            return outs[:2] if func is aten._unique.default else outs
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            return func(args[0], _long_indices(args[1]), *args[2:], **kwargs)
        if func is aten.bincount.default:  # values taken to be below minlength (expert ids are)
            t, n = args[0], kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            return torch.zeros(max(int(n), 1), dtype=torch.long, device=t.device)
        if func is aten.split_with_sizes.default:  # sizes read from answered counts need not add up
            t, sizes, dim = args[0], list(args[1]), (args[2] if len(args) > 2 else kwargs.get("dim", 0))
            n = t.shape[dim]
            if sum(sizes) != n and sizes:
                sizes = [n // len(sizes)] * (len(sizes) - 1) + [n - n // len(sizes) * (len(sizes) - 1)]
            return func(t, sizes, dim)
        if func is aten.masked_select.default:
            t = args[0]
            return torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        return func(*args, **kwargs)


def _long_indices(indices):
    """Boolean masks -> the long indices of their True entries (a mask over d dims is d index tensors), as
    aten.index does it, but with this mode's nonzero (all positions)."""
    out = []
    for i in indices:
        if i is not None and i.dtype == torch.bool:
            out.extend(torch.zeros(i.numel(), dtype=torch.long, device=i.device) for _ in range(i.dim()))
        else:
            out.append(i)
    return out


def _basic(t, idx):
    """Python index `idx` -> (the view its ints, slices, None and Ellipsis select; the per-dim list of advanced
    index tensors for aten.index over that view, or None when there are none)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    used = sum(i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
               for i in idx if i is not None and i is not Ellipsis)
    v, d, adv = t, 0, []
    for i in idx:
        if i is Ellipsis:
            k = t.dim() - used
            adv.extend([None] * k)
            d += k
        elif i is None:
            v = v.unsqueeze(d)
            adv.append(None)
            d += 1
        elif isinstance(i, bool) or not isinstance(i, (int, slice, torch.Tensor)):
            raise NotImplementedError(f"fake_cuda indexing: {type(i).__name__}")
        elif isinstance(i, int):
            v = v.select(d, i)
        elif isinstance(i, slice):
            v = aten.slice.Tensor(v, d, i.start, i.stop, 1 if i.step is None else i.step)
            adv.append(None)
            d += 1
        elif i.dtype == torch.bool:
            adv.extend(_long_indices([i]))
            d += i.dim()
        else:
            adv.append(i)
            d += 1
    if not any(isinstance(a, torch.Tensor) for a in adv):
        return v, None
    while adv and adv[-1] is None:
        adv.pop()
    return v, adv


def _getitem(t, idx):
    v, adv = _basic(t, idx)
    return v if adv is None else aten.index.Tensor(v, adv)


def _setitem(t, idx, value):
    v, adv = _basic(t, idx)
    if adv is None:
        if isinstance(value, torch.Tensor):
            aten.copy_.default(v, value)
        else:
            aten.fill_.Scalar(v, value)
        return
    if not isinstance(value, torch.Tensor):
        value = torch.full((), value, dtype=v.dtype, device=v.device)
    aten.index_put_(v, adv, value.to(v.dtype))


_real_to = torch.Tensor.to


def _to(self, *args, **kwargs):
    """Tensor.to, with a move onto CUDA done by aten._to_copy (same result as the real `to`: self when nothing
    changes, else a copy)."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device)):
            device = torch.device(a)
        elif isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
    if device is None or torch.device(device).type != "cuda":
        return _real_to(self, *args, **kwargs)
    device = torch.device("cuda", torch.device(device).index or 0)
    if self.device == device and dtype in (None, self.dtype):
        return self
    return aten._to_copy.default(self, dtype=dtype or self.dtype, device=device)


# FakeTensor methods whose hand-written bindings take a device guard, as the aten ops they stand for
METHODS = {
    "__getitem__": _getitem,
    "__setitem__": _setitem,
    "__invert__": lambda t: aten.bitwise_not.default(t),
    "__float__": lambda t: float(aten._local_scalar_dense.default(t)),
    "__int__": lambda t: int(aten._local_scalar_dense.default(t)),
    "nonzero": lambda t: aten.nonzero.default(t),
    "contiguous": lambda t, memory_format=torch.contiguous_format: (
        t if t.is_contiguous(memory_format=memory_format) else aten.clone.default(t, memory_format=memory_format)),
    "copy_": lambda t, src, non_blocking=False: aten.copy_.default(t, src, non_blocking),
    "new_zeros": lambda t, *size, **kw: torch.zeros(*size, **{"dtype": t.dtype, "device": t.device, **kw}),
    "new_ones": lambda t, *size, **kw: torch.ones(*size, **{"dtype": t.dtype, "device": t.device, **kw}),
    "new_empty": lambda t, *size, **kw: torch.empty(*size, **{"dtype": t.dtype, "device": t.device, **kw}),
    "new_full": lambda t, size, v, **kw: torch.full(size, v, **{"dtype": t.dtype, "device": t.device, **kw}),
}


@contextmanager
def fake_cuda():
    """Inside: factory calls with device='cuda' make fake CUDA tensors; real tensors passed in become fake
    (on their own device, the CPU)."""
    saved = {name: FakeTensor.__dict__.get(name) for name in METHODS}
    for name, fn in METHODS.items():
        setattr(FakeTensor, name, fn)
    torch.Tensor.to = _to
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), HostAnswers():
            yield
    finally:
        torch.Tensor.to = _real_to
        for name, fn in saved.items():
            if fn is None:
                delattr(FakeTensor, name)
            else:
                setattr(FakeTensor, name, fn)
