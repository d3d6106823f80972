"""Fake quantization onto a gemmaquant format's exact grid, with straight-through gradients.

Forward: the value is *computed by the format itself*, so it is bit-identical to what the format stores,

    w_hat = fmt.dequantize(fmt.quantize(w, params))      params: None (fit on w: the format's RTN) or given

Backward: a surrogate g of the same value carries the gradients, added as `w_hat + (g - g.detach())`, which is
exactly w_hat (x - x == 0.0), so the custom gradient costs no accuracy in the forward pass:

    x  = (w - offset) / scale             scale, offset [N, K]: fmt.grid(params), expanded per column
    q  = the codes fmt chose (round half away from zero, clamped to [qmin, qmax])
    g  = scale * (x + (q - x).detach()) + offset     where qmin - 1/2 <= x <= qmax + 1/2   (STE: dg/dw = 1)
    g  = scale * q + offset                          elsewhere (clipped: no gradient to w)

With `params` given as float tensors that require grad, the block parameters learn too (learned step size).
Two gradients for them: with x as written above, g yields LSQ's (Esser et al., "Learned Step Size
Quantization", arXiv:1902.08153): dg/dscale = q - x in range, q when clipped; dg/doffset = 0 in range, 1 when
clipped. LSQ's q - x is 0 for a weight on a grid point, so a model started from PTQ (every weight on its grid)
would get no gradient for its scales. The default, "codes", holds x fixed as the grid moves (x computed with
detached scale and offset): dg/dscale = q, dg/doffset = 1, the step-size gradient of PEQA (Kim et al.,
arXiv:2305.14152) and EfficientQAT's end-to-end phase (Chen et al., arXiv:2407.11062).
Learned parameters are rounded to their stored precision (bf16, fp16, ...) in the forward pass, again with a
straight-through gradient, so the grid trained on is one the format can store. Integer block parameters stay
fixed, except, with `learn_ints`, those the format lists in `trainable_ints` (the K-quants' 6-bit sub-block
scales and mins, of which one unit is a small step of the grid): they train as floats, rounded to the nearest
integer and clamped to their stored range in the forward pass (straight-through). Zero points stay fixed: one
unit of a zero point moves the whole block by a grid step.

How far one unit of each block parameter moves the grid (`grid_sensitivity`) sets its learning rate in QAT, so
that every format's grid moves at the same rate in grid steps: a Q4_K super-block scale `d` multiplies 6-bit
sub-scales of about 50, so one unit of `d` moves the grid 50 times as far as one unit of an int4 group scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gemmaquant.formats.base import Packed


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """`value` in the forward pass, the gradient of `surrogate` in the backward pass (value exactly kept)."""
    return value.detach() + (surrogate - surrogate.detach())


def _needs_cpu(fmt) -> bool:
    # GGUF legacy RTN runs ggml's reference quantizer through the gguf package's numpy code
    return type(fmt).__name__ == "GGUFLegacy"


def quantize_rows(w: Tensor, fmt, params: dict | None = None) -> Packed:
    """fmt.quantize(w, params) for w [R, K] on any device (formats that fit with numpy run on the CPU)."""
    w = w.detach().float()
    if params is None and _needs_cpu(fmt) and w.device.type != "cpu":
        p = fmt.quantize(w.cpu())
        return Packed(p.fmt, p.shape, {k: v.to(w.device) for k, v in p.data.items()})
    return fmt.quantize(w, params=params)


def stored(params: dict[str, Tensor], storage: dict[str, torch.dtype],
           ranges: dict[str, tuple[int, int]] | None = None) -> dict[str, Tensor]:
    """Learnable block parameters -> their stored values in their stored dtypes (detached). A float standing for
    an integer parameter is rounded half away from zero and clamped to ranges[k] (default: its dtype's range)."""
    out = {}
    for k, v in params.items():
        dt = storage.get(k, v.dtype)
        v = v.detach()
        if not dt.is_floating_point and v.is_floating_point():
            lo, hi = (ranges or {}).get(k, (torch.iinfo(dt).min, torch.iinfo(dt).max))
            v = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(lo, hi)
        out[k] = v.to(dt)
    return out


def grid_sensitivity(fmt, params: dict[str, Tensor]) -> dict[str, float]:
    """{key: how far one unit of block parameter `key` moves the grid}: the mean |d scale / d p| over the grid's
    scales, or of its offsets for a parameter that moves no scale (a min), at the current parameters. 1 for a
    scale or offset stored as itself (int4 groups, Q4_0, Q4_1's d and m); about 50 for a Q4_K super-block scale
    d (it multiplies the 6-bit sub-scales); the super-block scale for a Q4_K sub-scale."""
    leaves = {k: v.detach().float().requires_grad_(True) for k, v in params.items()}
    scale, offset, _, _ = fmt.grid(leaves)
    out = {}
    for k, v in leaves.items():
        for t in (scale, offset):
            if not t.requires_grad:
                continue
            # |t| summed (a zero entry counted +): each grid entry depends on one element of v, linearly, so this
            # is the sum of |d t / d v| over the entries
            sign = torch.where(t.detach() < 0, -1.0, 1.0)
            (g,) = torch.autograd.grad((t * sign).sum(), v, retain_graph=True, allow_unused=True)
            if g is not None and bool((g != 0).any()):
                out[k] = float(g.abs().sum()) / t.numel()
                break
        else:
            out[k] = 0.0
    return out


def fake_quantize(w: Tensor, fmt, params: dict[str, Tensor] | None = None,
                  storage: dict[str, torch.dtype] | None = None, scale_grad: str = "codes",
                  ranges: dict[str, tuple[int, int]] | None = None) -> Tensor:
    """w [N, K] -> its value on `fmt`'s grid, differentiable (see the module docstring). Returns w's dtype.

    params: None (the format fits the block parameters on w, as round-to-nearest does; no gradient to them),
        or the block parameters (fmt.params layout, rows = N): tensors of their stored dtypes, or float tensors
        that may require grad, rounded to `storage[k]` (default: their own dtype) in the forward pass (an
        integer one also clamped to `ranges[k]`, see `stored`).
    scale_grad: the gradient given to learnable parameters. "codes": d w_hat / d scale = q, the codes held fixed
        (PEQA, EfficientQAT's end-to-end step): right for a PTQ start, whose weights sit on grid points.
        "lsq": d w_hat / d scale = q - x (LSQ), which vanishes on weights that sit on grid points.
    The forward value equals fmt.dequantize(fmt.quantize(w, stored params)) bit for bit.
    """
    if scale_grad not in ("codes", "lsq"):
        raise ValueError(f"scale_grad must be 'codes' or 'lsq', not {scale_grad!r}")
    if w.ndim != 2:
        raise ValueError(f"fake_quantize: expected a 2-D [N, K] weight, got shape {list(w.shape)}")
    if getattr(fmt, "levels", None) is not None:  # the straight-through gradients below assume v(q) = q
        raise ValueError(f"fake_quantize: {fmt.name} has a non-uniform codebook grid; QAT supports uniform grids")
    storage = storage or {}
    wf = w.float()
    exact = None if params is None else stored(params, storage, ranges)  # what the format stores (detached)
    with torch.no_grad():
        p = quantize_rows(wf, fmt, exact)
        w_hat = fmt.dequantize(p).to(wf.device)
        q = fmt.codes(p).to(wf.device).float()
    if params is None:
        grid_params = {k: v.float() for k, v in fmt.params(p).items()}
    else:
        grid_params = {k: straight_through(exact[k].float(), v.float()) if v.requires_grad else exact[k].float()
                       for k, v in params.items()}
    scale, offset, qmin, qmax = fmt.grid(grid_params)
    K = wf.shape[1]
    s, o = fmt.expand(scale, K).to(wf.device), fmt.expand(offset, K).to(wf.device)
    zero = s.detach() == 0
    x = (wf - o) / torch.where(zero, torch.ones_like(s), s)  # [N, K] the unrounded code
    if scale_grad == "codes":  # the codes do not move with the grid
        x = (wf - o.detach()) / torch.where(zero, torch.ones_like(s), s).detach()
    with torch.no_grad():
        inside = (x >= qmin - 0.5) & (x <= qmax + 0.5) & ~zero
    g = s * torch.where(inside, x + (q - x).detach(), q) + o
    g = torch.where(zero, wf, g)  # an all-zero block (scale 0): let the weights leave zero
    return straight_through(w_hat, g).to(w.dtype)


def _is_dtensor(t: Tensor) -> bool:
    """An FSDP2 shard (torch.distributed.tensor.DTensor), told by name: no torch.distributed import needed."""
    return type(t).__name__ == "DTensor"


class FakeQuant(nn.Module):
    """The parametrization `prepare_qat` puts on one weight: latent weight [..., N, K] -> its fake-quantized value.

    A 3-D weight (the fused experts [E, N, K]) is quantized as E*N rows, which is per expert: every format's blocks
    run along K within a row. `learnable=True` holds the block parameters as trainable tensors (float ones as fp32
    `nn.Parameter`s, integer ones as buffers), initialised from `params` (a fit, or the PTQ result);
    `learn_ints=True` also makes the format's `trainable_ints` (K-quant sub-scales and mins) fp32 parameters,
    rounded and clamped to their stored range in the forward pass.
    """

    def __init__(self, fmt, name: str, shape: tuple[int, ...], params: dict[str, Tensor] | None, learnable: bool,
                 scale_grad: str = "codes", learn_ints: bool = False):
        super().__init__()
        self.fmt, self.name, self.shape, self.learnable = fmt, name, tuple(shape), learnable
        self.scale_grad = scale_grad
        self.storage: dict[str, torch.dtype] = {}
        self.ranges: dict[str, tuple[int, int]] = dict(fmt.trainable_ints) if learnable and learn_ints else {}
        if learnable:
            for k, v in params.items():
                self.storage[k] = v.dtype
                if v.is_floating_point() or k in self.ranges:
                    self.register_parameter(k, nn.Parameter(v.detach().float().clone()))
                else:
                    self.register_buffer(k, v.detach().clone())
        self.caching = False  # set by the owner's forward hooks: one fake quantization per owner forward
        self._cache: Tensor | None = None
        self.lora = None  # callable -> the LoRA delta of the weight, when a PEFT adapter wraps the owner

    def block_params(self) -> dict[str, Tensor] | None:
        return {k: getattr(self, k) for k in self.storage} if self.learnable else None

    def stored_params(self) -> dict[str, Tensor] | None:
        """The block parameters as the format stores them (rounded, clamped, in their dtypes); None in fit mode."""
        return stored(self.block_params(), self.storage, self.ranges) if self.learnable else None

    def forward(self, w: Tensor) -> Tensor:
        if self.caching and self._cache is not None:
            return self._cache
        if _is_dtensor(w):  # sharded by FSDP2 and read outside its forward (e.g. by get_model_state_dict)
            return self._sharded(w)
        out = self._quantized(w, self.block_params(), self.lora() if self.lora is not None else None)
        if self.caching:
            self._cache = out
        return out

    def right_inverse(self, w: Tensor) -> Tensor:  # assigning `module.weight = t` sets the latent weight
        return w

    @torch.no_grad()
    def _sharded(self, w: Tensor) -> Tensor:
        """The fake-quantized value of an FSDP2-sharded latent weight, sharded alike. Inside FSDP's forward the
        parameters are whole; outside it they are DTensor shards, whose rows need not line up with the shards of
        the block parameters: gather both (every rank reads them together, as distributed state-dict calls do),
        quantize the whole tensor and hand each rank its shard."""
        from torch.distributed.tensor import distribute_tensor

        full = lambda t: t.full_tensor() if _is_dtensor(t) else t  # noqa: E731
        params = None if not self.learnable else {k: full(v) for k, v in self.block_params().items()}
        out = self._quantized(full(w), params, full(self.lora()) if self.lora is not None else None)
        return distribute_tensor(out, w.device_mesh, w.placements, src_data_rank=None)

    def _quantized(self, w: Tensor, params: dict[str, Tensor] | None, delta: Tensor | None) -> Tensor:
        """fake_quantize of latent weight w (+ the LoRA delta, if any) on the block parameters `params`, as rows."""
        x = w if delta is None else w + delta.to(w.dtype)
        out = fake_quantize(x.reshape(-1, self.shape[-1]), self.fmt, params, self.storage, self.scale_grad,
                            self.ranges).reshape(w.shape)
        if delta is not None:  # the adapter adds x @ delta^T itself: the sum is the quantized merged weight
            out = out - delta.to(out.dtype)
        return out

    @torch.no_grad()
    def pack(self, w: Tensor) -> Packed | list[Packed]:
        """The format's Packed value of latent weight `w` on the current grid: one Packed, or one per expert."""
        params = self.stored_params()
        if w.ndim == 2:
            return quantize_rows(w, self.fmt, params)
        E, N = w.shape[0], w.shape[-2]
        rows = lambda t, e: t[e * N:(e + 1) * N]  # noqa: E731  (params are [E*N, ...])
        return [quantize_rows(w[e], self.fmt, None if params is None else {k: rows(v, e) for k, v in params.items()})
                for e in range(E)]

    def extra_repr(self) -> str:
        ints = f" (integers: {', '.join(self.ranges)})" if self.ranges else ""
        return f"{self.name}: {self.fmt.name}, {'learnable' if self.learnable else 'fit'} block parameters{ints}"


class FloatOnGrid(nn.Module):
    """A parametrization keeping a tensor that is exported as a float *on* a format's grid (round-to-nearest fit,
    straight-through gradient): the embedding tables, which llama.cpp's GGUF stores as Q6_K (or Q8_0) however
    they were trained. Not a FakeQuant: `convert` leaves it alone (remove it with leave_parametrized=True), and the
    exporter's own round-to-nearest reproduces the value, since rounding a value already on the grid is exact."""

    def __init__(self, fmt, name: str):
        super().__init__()
        self.fmt, self.name = fmt, name

    def forward(self, w: Tensor) -> Tensor:
        return fake_quantize(w, self.fmt)

    def right_inverse(self, w: Tensor) -> Tensor:
        return w

    def extra_repr(self) -> str:
        return f"{self.name}: on {self.fmt.name}'s grid (round-to-nearest)"
