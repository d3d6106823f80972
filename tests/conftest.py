import os

import torch

# Triton kernels run in the interpreter where there is no GPU; set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
