"""The GGUF block fits (llama.cpp's RTN and imatrix searches, gemmaquant.formats.ggml_ref) on a device: a fit on a
CUDA tensor keeps every tensor there (fake CUDA, on any machine) and, on a real GPU, gives the CPU's bytes.

What keeps the bytes equal on a GPU: every step is one elementwise op (CUDA's add / sub / mul / div are IEEE
correctly rounded, and separate kernels cannot be contracted into an FMA), divisions are tensor / tensor (CUDA
turns `t / python_scalar` into a multiplication by the reciprocal), square roots go through float64, the
ordered sums are a Python loop of adds there (CUDA's index_add_ adds in any order), min / max / argmax are exact,
and no matmul is used (so TF32 cannot enter)."""

import pytest
import torch

from gemmaquant.formats import get_format
from tests.device.fake_cuda import fake_cuda

TYPES = ["q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def hard_weights(n=8, k=512, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, :300] = 0  # zero blocks and a zero super-block
    w[1, :256] = -w[1, :256].abs()  # one-signed blocks
    w[2, 5], w[2, 300] = 3.0, -5.0  # outliers
    w[3] = torch.randint(-8, 8, (k,), generator=g).float() * 0.01  # values on a grid: exact ties
    w[4, :256] = 1e-6 * torch.randn(256, generator=g)  # fp16 d underflows
    w[5, :64] = 0.25  # constant blocks
    return w


# every search of ggml_ref.py once (fake tensors cost about a millisecond an op)
@pytest.mark.parametrize("name,imatrix", [("q4_k", False), ("q4_k", True), ("q6_k", False), ("q6_k", True),
                                          ("q5_0", False), ("q5_0", True), ("q4_1", True), ("q8_0", False)])
def test_fit_on_a_fake_cuda_device_stays_there(name, imatrix):
    fmt = get_format(name)
    w, imp = hard_weights(), torch.rand(512) + 0.1
    with fake_cuda():
        p = fmt.quantize(w.to("cuda"), importance=imp.to("cuda") if imatrix else None)
        left = [k for k, t in p.data.items() if t.device.type != "cuda"]
    assert not left, f"{name}: {left} left the device"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("imatrix", [False, True])
def test_cuda_bytes_equal_cpu_bytes(name, imatrix):
    fmt = get_format(name)
    torch.backends.cuda.matmul.allow_tf32 = False
    for seed in range(3):
        w = hard_weights(64, 1024, seed)
        w[8:] = (torch.randn(56, 1024) * 0.05).bfloat16().float()
        imp = (torch.rand(1024) + 0.01) if imatrix else None
        cpu = fmt.to_gguf_bytes(fmt.quantize(w, importance=imp))
        gpu = fmt.to_gguf_bytes(fmt.quantize(w.cuda(), importance=None if imp is None else imp.cuda()))
        assert (cpu == gpu).all(), f"{name} seed {seed}: {(cpu != gpu).any(1).sum()} rows differ"
