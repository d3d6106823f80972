"""Every hot op, deciding per call between the Triton kernel and its pure-torch reference.

The kernel runs on CUDA tensors (or everywhere when forced with `use("triton")`, e.g. under TRITON_INTERPRET=1);
the reference runs elsewhere. Nothing is decided at import time.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


@contextlib.contextmanager
def use(impl: str):
    """Force "triton" or "reference" inside the block."""
    if impl not in ("triton", "reference"):
        raise ValueError(f"impl must be 'triton' or 'reference', not {impl!r}")
    old = getattr(_state, "impl", None)
    _state.impl = impl
    try:
        yield
    finally:
        _state.impl = old


def _impl(x) -> str:
    forced = getattr(_state, "impl", None)
    return forced or ("triton" if x.is_cuda else "reference")


def int4_matmul(x, qdata, scale, zero, group_size: int):
    from gemmaquant.kernels import int4_matmul as k

    if _impl(x) == "triton":
        return k.int4_matmul(x, qdata, scale, zero, group_size)
    return k.int4_matmul_ref(x, qdata, scale, zero, group_size)
