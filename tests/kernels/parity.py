"""The parity rule for kernels (flash-attention's): against an fp64 ground truth of the same semantics, the kernel's
max abs error is at most 2x the max abs error of the torch reference run in the same precision. Where the reference
is exact (error 0) the kernel may differ by at most EXACT_EPS.

Set GQ_PARITY_LOG=<file> to append every checked (case, kernel error, reference error) as a JSON line.
"""

import json
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT_EPS = 1e-6


def assert_parity(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, case: str) -> tuple[float, float]:
    assert out.shape == ref.shape == exact.shape, f"{case}: shapes {out.shape} / {ref.shape} / {exact.shape}"
    assert out.dtype == ref.dtype, f"{case}: kernel dtype {out.dtype} != reference dtype {ref.dtype}"
    assert torch.isfinite(out).all(), f"{case}: the kernel output has non-finite values"
    ek = (out.double() - exact).abs().max().item()
    er = (ref.double() - exact).abs().max().item()
    if os.environ.get("GQ_PARITY_LOG"):
        with open(os.environ["GQ_PARITY_LOG"], "a") as f:
            f.write(json.dumps({"case": case, "kernel_err": ek, "ref_err": er}) + "\n")
    bound = 2 * er if er > 0 else EXACT_EPS
    assert ek <= bound, f"{case}: kernel error {ek:.3g} > bound {bound:.3g} (reference error {er:.3g})"
    return ek, er
