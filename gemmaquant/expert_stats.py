"""Per-expert calibration statistics for all experts at once: what `capture.record_expert` computes one expert
at a time, as a few batched operations per calibration batch (26B-A4B: 128 experts x 30 layers would otherwise
be 7,680 small problems, each a handful of kernel launches per batch).

For one batch: x [N, H] expert inputs, ids [N, k] the experts each token is routed to.

    flat   = ids.flatten()                      [N*k]  assignment a = (token a // k, slot a % k) -> expert
    order  = argsort(flat, stable)              assignments grouped by expert, tokens ascending within each
                                                (a token picks an expert at most once, so this is the order
                                                torch.where(ids == e) gives the loop)
    rank   = position of each assignment inside its expert's group
    Xp     [E, cap, H]  Xp[e, r] = x[token of the r-th assignment of e], zero rows beyond e's count
    X^T X  = Xp^T Xp                            [E, H, H]   one bmm (zero rows add nothing)
    D      = gelu(Xp Wg^T) * (Xp Wu^T)          [E, cap, Ie] one bmm against gate_up_proj; zero rows give
                                                gelu(0) * 0 = 0, so they add nothing to D^T D either
Experts are taken in chunks so that Xp and D stay under `chunk_elements` elements (cap is the largest count of
the batch). The sums equal the loop's up to the summation order inside the matrix products (last bits of the
accumulation dtype; the down_proj inputs, computed by bmm instead of one linear per expert, to fp32 rounding).
The AWQ sample rows are the loop's exactly: every `stride`-th routed row of each expert, up to max_samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemmaquant.capture import InputStats, LayerStats, no_autocast
from gemmaquant.model.gemma4 import gelu_tanh

CHUNK_ELEMENTS = 1 << 27  # 512 MiB of fp32 for the padded inputs of one chunk of experts


class ExpertAccumulator:
    """Running per-expert sums over the calibration batches of one layer (see the module docstring)."""

    def __init__(self, E: int, acc_dtype: torch.dtype, chunk_elements: int = CHUNK_ELEMENTS):
        self.E, self.acc, self.chunk_elements = E, acc_dtype, chunk_elements
        self.xtx = self.dtd = None  # [E, H, H], [E, Ie, Ie]
        self.n = None  # [E] routed tokens
        self.kept = None  # [E] sample rows kept so far
        self.samples: list[tuple[Tensor, Tensor, Tensor]] = []  # (expert [s], x rows [s, H], down rows [s, Ie])

    @torch.no_grad()
    def add(self, experts, x: Tensor, ids: Tensor, max_samples: int, stride: int) -> None:
        gu = experts.gate_up_proj  # [E, 2 Ie, H]
        E, H, Ie, dev = self.E, x.shape[-1], gu.shape[1] // 2, x.device
        if self.xtx is None:
            self.xtx = torch.zeros(E, H, H, dtype=self.acc, device=dev)
            self.dtd = torch.zeros(E, Ie, Ie, dtype=self.acc, device=dev)
            self.n = torch.zeros(E, dtype=torch.long, device=dev)
            self.kept = torch.zeros(E, dtype=torch.long, device=dev)
        k = ids.shape[-1]
        flat = ids.reshape(-1)  # [N k]
        order = torch.argsort(flat, stable=True)
        e_sorted, tok_sorted = flat[order], order // k  # [N k] each
        counts = torch.bincount(flat, minlength=E)  # [E]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=dev) - starts[e_sorted]  # [N k] position within its expert
        keep = (rank % stride == 0) & (self.kept[e_sorted] + rank // stride < max_samples)  # the loop's rows
        self.n += counts
        self.kept += torch.bincount(e_sorted[keep], minlength=E)
        counts_h = counts.tolist()  # one host read per batch: chunk bounds
        cap = max(counts_h)
        if cap == 0:
            return
        per_chunk = max(1, self.chunk_elements // (cap * max(H, 2 * Ie)))
        with no_autocast(dev.type):
            for e0 in range(0, E, per_chunk):
                e1 = min(E, e0 + per_chunk)
                a, b = sum(counts_h[:e0]), sum(counts_h[:e1])  # this chunk's assignments, contiguous in order
                if a == b:
                    continue
                ei, ri = e_sorted[a:b] - e0, rank[a:b]
                Xp = x.new_zeros(e1 - e0, cap, H)  # [e, cap, H]
                Xp[ei, ri] = x[tok_sorted[a:b]]
                Xa = Xp.to(self.acc)
                self.xtx[e0:e1].baddbmm_(Xa.transpose(1, 2), Xa)
                gate, up = torch.bmm(Xp, gu[e0:e1].transpose(1, 2)).chunk(2, dim=-1)  # [e, cap, Ie] each
                D = gelu_tanh(gate) * up
                Da = D.to(self.acc)
                self.dtd[e0:e1].baddbmm_(Da.transpose(1, 2), Da)
                sel = keep[a:b]
                if bool(sel.any()):
                    self.samples.append((e_sorted[a:b][sel], Xa[ei[sel], ri[sel]].float(),
                                         Da[ei[sel], ri[sel]].float()))

    def write_into(self, stats: LayerStats) -> None:
        """One InputStats per routed expert (expert_in.e, expert_down_in.e), as the loop leaves them."""
        if self.n is None:
            return
        n = self.n.tolist()
        if self.samples:
            labels = torch.cat([s[0] for s in self.samples])
            order = torch.argsort(labels, stable=True)  # by expert; batch order kept within an expert
            per_e = torch.bincount(labels, minlength=self.E).tolist()
            xs = torch.cat([s[1] for s in self.samples])[order].split(per_e)
            ds = torch.cat([s[2] for s in self.samples])[order].split(per_e)
        else:
            xs = ds = [None] * self.E
        for e in range(self.E):
            if n[e] == 0:
                continue  # the loop never creates statistics for an expert no token reached
            for kind, xtx, rows in (("expert_in", self.xtx[e], xs[e]), ("expert_down_in", self.dtd[e], ds[e])):
                has = rows is not None and rows.shape[0] > 0
                stats.inputs[f"{kind}.{e}"] = InputStats(xtx=xtx, n=n[e], samples=[rows] if has else [],
                                                         kept=rows.shape[0] if has else 0, acc_dtype=self.acc)


@torch.no_grad()
def force_route(experts, stats: LayerStats, rare: list[int], pool: Tensor, max_samples: int,
                chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """Forced routing for every expert in `rare` at once: each gets the statistics of the whole pool [n, H] sent
    through it. The pool's X^T X is the same for all of them (computed once: the loop's value, bit for bit);
    their down_proj inputs come from one bmm per chunk of experts."""
    gu = experts.gate_up_proj
    n, H = pool.shape
    Ie = gu.shape[1] // 2
    acc = stats.acc_dtype
    with no_autocast(pool.device.type):
        P = pool.to(acc)
        xtx = P.T @ P  # [H, H]
        x_rows = P[:max_samples].float()
        per_chunk = max(1, chunk_elements // (n * 2 * Ie))
        for c in range(0, len(rare), per_chunk):
            group = rare[c:c + per_chunk]
            idx = torch.tensor(group, device=pool.device)
            gate, up = torch.matmul(pool[None], gu[idx].transpose(1, 2)).chunk(2, dim=-1)  # [r, n, Ie]
            Da = (gelu_tanh(gate) * up).to(acc)
            dtd = torch.bmm(Da.transpose(1, 2), Da)  # [r, Ie, Ie]
            for j, e in enumerate(group):
                stats.inputs[f"expert_in.{e}"] = InputStats(xtx=xtx, n=n, samples=[x_rows] if max_samples else [],
                                                            kept=x_rows.shape[0], acc_dtype=acc)
                d_rows = Da[j, :max_samples].float()
                stats.inputs[f"expert_down_in.{e}"] = InputStats(xtx=dtd[j], n=n, samples=[d_rows] if max_samples
                                                                 else [], kept=d_rows.shape[0], acc_dtype=acc)
    stats.forced_experts.extend(rare)
