"""A GGUF type per tensor that minimises the measured loss under a size budget (`--target-bpw`, `--target-size`).

Each *unit* (one GGUF tensor: a matrix of one layer, one layer's expert tensor family, an embedding table) has a
list of options {ggml type: (file bytes, loss)}: every registered block type whose block divides the row length
(gguf_mix.BLOCK_TYPES / BLOCK_SIZE: a type added there joins the choice), plus F16 (loss 0). The losses come from
gemmaquant.sensitivity; bytes are the exact tensor bytes the exporter writes (gguf_pack.tensor_nbytes, scales
included), so the budget is the file's bits per weight as `gemmaquant inspect` reports it.

The allocation is a multiple-choice knapsack, solved by the Lagrangian relaxation (Everett 1963; Shoham & Gersho
1988, "Efficient bit allocation for an arbitrary set of quantizers"): on each unit's lower convex hull of
(bytes, loss) every step is an upgrade with a price (loss saved per byte); upgrades are taken in order of price
while they fit, which is the optimum of the relaxation at every budget the steps reach exactly; then single-unit
switches to any option (hull or not) are taken while one lowers the loss and fits.

Zero-padding (gemmaquant.padding) couples units: padding a kind ("mlp", "experts") changes the options of all its
units in every layer at once (ffn_down gets the 256-block types, all three matrices cost I'/I more bytes), so
`solve_padded` solves the allocation once per subset of the paddable kinds (at most 4) and keeps the subset with
the least loss at the budget; the unpadded model wins ties.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from itertools import combinations

from gemmaquant.errors import GemmaquantError


class TargetError(GemmaquantError, ValueError):
    pass


FLOAT_CANDIDATE = "F16"  # the lossless end of every unit's choice


def candidate_types(ne0: int) -> list[str]:
    """Every registered GGUF block type whose block divides a row of `ne0`, plus F16."""
    from gemmaquant.export.gguf_mix import BLOCK_SIZE, BLOCK_TYPES

    return [t for t in BLOCK_TYPES if ne0 % BLOCK_SIZE[t] == 0] + [FLOAT_CANDIDATE]


@dataclass
class Unit:
    name: str  # our tensor name (gemmaquant.export.gguf_names maps it to the GGUF name)
    shape: tuple[int, ...]
    options: dict[str, tuple[int, float]] = field(default_factory=dict)  # type -> (bytes, loss)

    def hull(self) -> list[str]:
        """The types on the lower convex hull of (bytes, loss), cheapest first (dominated ones dropped)."""
        pts = sorted(self.options.items(), key=lambda kv: (kv[1][0], kv[1][1]))
        frontier = []
        for t, (b, loss) in pts:  # Pareto: strictly less loss for more bytes
            if not frontier or loss < self.options[frontier[-1]][1]:
                frontier.append(t)
        hull: list[str] = []
        for t in frontier:
            while len(hull) >= 2:
                (b1, l1), (b2, l2), (b3, l3) = (self.options[hull[-2]], self.options[hull[-1]], self.options[t])
                # drop the middle point when it lies on or above the chord from hull[-2] to t
                if (l2 - l1) * (b3 - b1) >= (l3 - l1) * (b2 - b1):
                    hull.pop()
                else:
                    break
            hull.append(t)
        return hull


def solve(units: list[Unit], budget: int, fixed_bytes: int = 0) -> dict[str, str]:
    """{unit name: type} with sum(bytes) + fixed_bytes <= budget and the total loss as small as the Lagrangian
    allocation plus single switches find. TargetError when even the cheapest option of every unit is over budget."""
    room = budget - fixed_bytes - sum(min(b for b, _ in u.options.values()) for u in units)
    if room < 0:
        smallest = budget - room
        raise TargetError(f"a budget of {budget} bytes is below the smallest mix these grids allow "
                          f"({smallest} bytes: every tensor on its cheapest type)")
    hulls = {u.name: u.hull() for u in units}
    by_name = {u.name: u for u in units}
    choice = {u.name: hulls[u.name][0] for u in units}
    # the price of the next hull step of each unit: loss saved per byte (a max-heap on price)
    heap = []

    def push(name: str, i: int) -> None:
        h = hulls[name]
        if i + 1 < len(h):
            (b0, l0), (b1, l1) = by_name[name].options[h[i]], by_name[name].options[h[i + 1]]
            heapq.heappush(heap, (-(l0 - l1) / max(b1 - b0, 1), name, i + 1))

    for u in units:
        push(u.name, 0)
    while heap:
        _, name, i = heapq.heappop(heap)
        opts = by_name[name].options
        extra = opts[hulls[name][i]][0] - opts[choice[name]][0]
        if extra <= room:  # a step that does not fit blocks that unit's later (cheaper per byte) steps
            room -= extra
            choice[name] = hulls[name][i]
            push(name, i)
    return _improve(by_name, choice, room)


def _improve(by_name: dict[str, Unit], choice: dict[str, str], room: int) -> dict[str, str]:
    """Single-unit switches (any option) that lower the loss within the room left, best saving first."""
    while True:
        best = None
        for name, u in by_name.items():
            b0, l0 = u.options[choice[name]]
            for t, (b, loss) in u.options.items():
                if b - b0 <= room and loss < l0 and (best is None or l0 - loss > best[0]):
                    best = (l0 - loss, name, t, b - b0)
        if best is None:
            return choice
        _, name, t, extra = best
        choice[name] = t
        room -= extra


def with_padding(units: list[Unit], padded: dict[str, dict[str, tuple[int, float]]], kind_of: dict[str, str],
                 kinds: tuple[str, ...]) -> list[Unit]:
    """The units with those of `kinds` on their padded options (new Unit objects; `units` are not changed)."""
    return [Unit(u.name, u.shape, dict(padded[u.name])) if kind_of.get(u.name) in kinds else u for u in units]


def padding_subsets(kind_of: dict[str, str]) -> list[tuple[str, ...]]:
    """Every subset of the paddable kinds, the unpadded model first."""
    kinds = sorted(set(kind_of.values()))
    return [c for r in range(len(kinds) + 1) for c in combinations(kinds, r)]


def solve_least_loss(variants, budget: int, fixed_bytes: int = 0):
    """(choice, key) of the least total loss over `variants`, (key, units) pairs each solved by `solve`; the first
    among equals; None when no variant fits the budget."""
    best = None
    for key, us in variants:
        try:
            choice = solve(us, budget, fixed_bytes)
        except TargetError:
            continue
        loss = total(us, choice)[1]
        if best is None or loss < best[0]:
            best = (loss, choice, key)
    return None if best is None else best[1:]


def solve_padded(units: list[Unit], padded: dict[str, dict[str, tuple[int, float]]], kind_of: dict[str, str],
                 budget: int, fixed_bytes: int = 0) -> tuple[dict[str, str], tuple[str, ...]]:
    """(choice, padded kinds): `solve` for every subset of the kinds in `kind_of` (unit name -> kind, for the
    units that have `padded` options), the subset whose choice has the least loss; the first subset (fewer kinds
    padded) among equals. TargetError when no subset fits the budget."""
    best = solve_least_loss(((kinds, with_padding(units, padded, kind_of, kinds))
                             for kinds in padding_subsets(kind_of)), budget, fixed_bytes)
    if best is None:
        return solve(units, budget, fixed_bytes), ()  # raises the unpadded model's TargetError
    return best


def total(units: list[Unit], choice: dict[str, str]) -> tuple[int, float]:
    """(bytes, loss) of a choice."""
    by_name = {u.name: u for u in units}
    b = sum(by_name[n].options[t][0] for n, t in choice.items())
    return b, sum(by_name[n].options[t][1] for n, t in choice.items())
