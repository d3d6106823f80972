"""Reading back the int4 lattice of a quantization-aware-trained (QAT) checkpoint, instead of rounding it again.

A QAT checkpoint published in bf16 (Google's Gemma 4 QAT weights) holds, in each group of 32 along a row,

    w[k] = bf16(d * q[k]),   q[k] integer in [-8, 7],   d > 0 the group's step (the Q4_0 / W4A16 g32 grid)

Recovery, per group (`recover_lattice`, vectorised over groups):
  1. An all-zero group is the lattice with d = 0, q = 0. A group with more than 9 distinct magnitudes |w| cannot
     be on the lattice (|q| takes the values 0..8): once m = 8 and 7 are tried (which find most lattice groups),
     such groups are dropped before the other m.
  2. The largest |w| belongs to the largest |q| (rounding is monotone), so |q_a| = m for some m in 8..1
     (m = 8 only when w_a < 0: the code +8 does not exist). Trying m from 8 down takes the finest step whose
     codes fit: when every code shares a factor (codes {-4, 2, 0}), the lattice with the larger codes is kept.
  3. For each m the codes are q = round(w / d0), d0 = bf16(|w_a| / m), clamped to [-8, 7] (m is ruled out at
     once when some w / d0 is far from its code: NEAR); the candidate steps are d0 and its two bf16 neighbours
     on each side (|w_a| is itself rounded, so d lies within about one bf16 ulp of |w_a| / m), and a step is
     accepted only if bf16(d * q) == w for all 32 weights (or d * q == w exactly: a copy held in fp32).
A group that passes is *recovered*: its step (bf16, what a compressed-tensors W4A16 scale stores) and codes
reproduce the checkpoint's weights bit for bit (up to the sign of a zero) in any consumer that rounds d * q to
bf16, and to within the checkpoint's own bf16 rounding in one that keeps d * q in fp32 (llama.cpp). Steps finer
than bf16 can hold (an fp32 step whose products no bf16 step reproduces) leave the group unrecovered.

Q4_0 stores d as fp16: a bf16 step is exactly an fp16 value unless it is below fp16's normal range and has
more significant bits than fp16's subnormals there (d < 2^-14 with bits below 2^-24). `fp16_inexact` counts
such groups; their Q4_0 values are fp16(d) * q and `fp16_max_error` is the largest |fp16(d) * q - w|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GROUP = 32
QMIN, QMAX = -8, 7
MAX_DISTINCT = 9  # distinct |w| in a lattice group: |q| in {0, 1, ..., 8}
NEIGHBOURS = (0, -1, 1, -2, 2)  # bf16 ulps around |w_a| / m, nearest first
# |w / d0 - q| on the lattice: w and d0 = bf16(|w_a| / m) each carry a relative error below 2^-8, so at |q| <= 8 it
# stays under 0.07; a larger one rules m out before its steps are tried (a wrong m puts codes 1/7 or more off)
NEAR = 0.125
CHUNK_GROUPS = 1 << 16  # groups per slice on the CPU (bounded temporaries)


@dataclass
class LatticeFit:
    """The lattice of one [N, K] matrix: step bf16 [N, K // 32] (0 where not recovered, or an all-zero group),
    codes int32 [N, K] in [-8, 7] (0 where not recovered), exact bool [N, K // 32] (the group is recovered)."""

    step: Tensor
    codes: Tensor
    exact: Tensor

    @property
    def groups(self) -> int:
        return self.exact.numel()

    @property
    def recovered(self) -> int:
        return int(self.exact.sum())

    @property
    def share(self) -> float:
        return self.recovered / max(self.groups, 1)

    def fp16_inexact(self) -> int:
        """Recovered groups whose bf16 step fp16 (Q4_0's d) cannot hold exactly."""
        s = self.step.float()
        return int(((s.to(torch.float16).float() != s) & self.exact).sum())

    def fp16_max_error(self, w: Tensor) -> float:
        """max |fp16(d) * q - w| over the recovered groups (0 when every step is an fp16 value)."""
        N, K = self.codes.shape
        d16 = self.step.to(torch.float16).float().repeat_interleave(GROUP, dim=1)
        err = (d16 * self.codes.float() - w.float()).abs().view(N, K // GROUP, GROUP).amax(-1)
        return float(err[self.exact].max()) if bool(self.exact.any()) else 0.0


def _bf16_neighbour(d: Tensor, k: int) -> Tensor:
    """The bf16 value k ulps away from positive bf16 d (bit pattern + k; d > 0 so the pattern is monotone)."""
    if k == 0:
        return d
    bits = d.view(torch.int16).to(torch.int32) + k
    return bits.clamp(1, 0x7F7F).to(torch.int16).view(torch.bfloat16)


def _recover_groups(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """b [B, 32] fp32 -> (step bf16 [B], codes int32 [B, 32], exact bool [B])."""
    B = b.shape[0]
    step = torch.zeros(B, dtype=torch.bfloat16, device=b.device)
    codes = torch.zeros(B, GROUP, dtype=torch.int32, device=b.device)
    mag = b.abs()
    a = b.gather(1, mag.argmax(1, keepdim=True))[:, 0]  # the signed extremum
    zero = mag.amax(1) == 0
    exact = zero.clone()
    todo = ~zero
    for m in range(8, 0, -1):
        if m == 6:  # most lattice groups are found by now; what is left of the rest is mostly off any lattice
            rest = todo.nonzero()[:, 0]
            srt = mag[rest].sort(1).values
            todo[rest[(srt[:, 1:] != srt[:, :-1]).sum(1) + 1 > MAX_DISTINCT]] = False
        idx = (todo & ((a < 0) if m == 8 else True)).nonzero()[:, 0]
        if idx.numel() == 0:
            continue
        d0 = (a[idx].abs() / m).to(torch.bfloat16)
        bi = b[idx]
        x = bi / d0.float()[:, None]
        q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp(QMIN, QMAX)
        near = (x - q).abs().amax(1) <= NEAR  # the codes of this m, if any, are these (see NEAR)
        idx, d0, bi, q = idx[near], d0[near], bi[near], q[near]
        left = torch.ones(idx.numel(), dtype=torch.bool, device=b.device)
        for k in NEIGHBOURS:
            d = _bf16_neighbour(d0, k)
            y = d.float()[:, None] * q  # exact in fp32: an 8-bit step times a 4-bit code
            ok = left & ((y == bi) | (y.to(torch.bfloat16).float() == bi)).all(1)
            hit = idx[ok]
            step[hit], codes[hit], exact[hit] = d[ok], q[ok].to(torch.int32), True
            todo[hit] = False
            left &= ~ok
    return step, codes, exact


@torch.no_grad()
def recover_lattice(w: Tensor) -> LatticeFit:
    """w [N, K] (K a multiple of 32), any float dtype -> its LatticeFit. `w` is not modified.

    A weight counts as reproduced when d * q equals it exactly (an fp32 or fp16 copy of the lattice) or when
    bf16(d * q) does (the bf16 checkpoint, also once widened to fp32 by a caller)."""
    if w.ndim != 2 or w.shape[1] % GROUP:
        raise ValueError(f"recover_lattice: expected [N, K] with K a multiple of {GROUP}, got {list(w.shape)}")
    N, K = w.shape
    b = w.detach().float().reshape(-1, GROUP)
    chunk = CHUNK_GROUPS if b.device.type == "cpu" else b.shape[0]
    parts = [_recover_groups(b[s:s + chunk]) for s in range(0, b.shape[0], chunk)]
    step = torch.cat([p[0] for p in parts]).view(N, K // GROUP)
    codes = torch.cat([p[1] for p in parts]).view(N, K)
    exact = torch.cat([p[2] for p in parts]).view(N, K // GROUP)
    return LatticeFit(step, codes, exact)


def lattice_share(w: Tensor, max_rows: int | None = None) -> float:
    """The share of w's groups of 32 on the lattice (of its first `max_rows` rows when given). w: [..., K]."""
    m = w.reshape(-1, w.shape[-1])
    if max_rows is not None:
        m = m[:max_rows]
    return recover_lattice(m).share
