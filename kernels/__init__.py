"""Triton kernels for quantized Gemma 4, imported as `gemmaquant.kernels` (pyproject maps it onto kernels/).

    int4_matmul.py       int4 group-wise weight-only matmul (decode split-K GEMV and prefill GEMM)
    int8_matmul.py       int8 per-channel weights: W8A16, and W8A8 with per-token activation quantization fused in
    moe_grouped_gemm.py  MoE experts as two grouped GEMMs (sorted / block-aligned tokens, fused GELU-tanh * up,
                         routing weights and per-expert scale in the epilogue); float, int8 and int4 experts
    moe_decode.py        the same MoE experts at decode (T <= 16): one program per (token, expert) pair and N tile
    swa_attention.py     causal sliding-window / full GQA attention: prefill (flash-attention online softmax,
                         O(L * W) work) and decode over a ring-buffer KV cache (split-KV)
    _common.py           shared @triton.jit helpers (dots and rounding that also hold under TRITON_INTERPRET=1)
    _moe_tiles.py        the GELU and expert weight tile both MoE kernel families use

Each kernel file reads top to bottom: the Triton kernel, its Python wrapper (check, allocate, launch), and the
pure-torch reference (`*_ref`) that defines its semantics. Kernel files import nothing from the rest of
gemmaquant; `gemmaquant.ops` decides per call whether a kernel or its reference runs. See docs/kernels.md.
"""

if __name__ == "kernels":
    # Imported as a top-level `kernels`, not as `gemmaquant.kernels`: Python found this folder because the
    # repository root is on sys.path (`python -m ...` or pytest run from a clone). That name belongs to Hugging
    # Face's `kernels` package on PyPI, which transformers >= 5.25 installs and imports (`from kernels import
    # CUDAProperties`). Hand the import over to the installed package, if there is one: Python returns whatever
    # sys.modules holds under the name once this file has run, so the import gets the real package.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
