"""How to choose the bits: algorithms are functions `(w, statistics, fmt) -> Packed` (or scales for AWQ).

    rtn(w, fmt, importance=None)       round-to-nearest; with importance, imatrix-style block parameters
    gptq(w, H, fmt, ...)               GPTQ with static groups (any format, K-quants included); H may be a
                                       HessianFactor shared by the matrices that read the same inputs
    awq_scales(weights, x, fmts)       AWQ per-input-channel scales for linears that share the input x
    awq_clip(w, H, fmt)                AWQ's per-block clipping search (output-error weighted)

See docs/algorithms.md for the knobs, defaults and measured errors.
"""

from gemmaquant.algorithms.awq import AWQSearch, awq_clip, awq_scales, awq_search
from gemmaquant.algorithms.gptq import HessianFactor, gptq
from gemmaquant.algorithms.rtn import rtn

__all__ = ["rtn", "gptq", "HessianFactor", "awq_scales", "awq_search", "awq_clip", "AWQSearch"]
