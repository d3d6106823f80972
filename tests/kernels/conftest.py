"""Kernel tests run the Triton kernels on CUDA when there is one, else in Triton's interpreter on CPU.

TRITON_INTERPRET must be in the environment before triton is first imported (triton.jit reads it when a kernel is
defined), so it is set here, at collection, when no GPU is present. Parity helpers are in tests/kernels/parity.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
