"""Triton kernels for quantized Gemma 4, imported as `gemmaquant.kernels`.

Each kernel file reads top to bottom: the Triton kernel, its Python wrapper (check, allocate, launch), and the
pure-torch reference (`*_ref`) that defines its semantics. Kernel files import nothing from the rest of
gemmaquant; `gemmaquant.ops` decides per call whether a kernel or its reference runs.
"""
