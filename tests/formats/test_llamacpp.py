"""Byte-for-byte agreement with llama.cpp's own quantizers, compiled from $LLAMA_CPP_DIR/ggml/src/ggml-quants.c.

ggml-quants.c is built alone with plain `gcc -O2` (no -march, no -ffast-math) into a shared library, beside a
harness that stubs the four ggml.c symbols it links against (ggml_abort, ggml_type_size, ggml_row_size,
ggml_type_name); the fp16 conversions it uses are inline in ggml-impl.h. Then quantize_q*(src, dst, nrow,
n_per_row, imatrix) (the ..._ref quantizers without an imatrix, ..._impl with one) must produce exactly the bytes
of `fmt.to_gguf_bytes(fmt.quantize(w, importance=imatrix))`, and dequantize_row_* exactly `fmt.dequantize`.
Skipped unless LLAMA_CPP_DIR points at a llama.cpp source tree. Run: LLAMA_CPP_DIR=... pytest -m llamacpp
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gemmaquant.formats import get_format

pytestmark = pytest.mark.llamacpp

SRC = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent")) / "ggml" / "src" / "ggml-quants.c"
TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
         "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS",
         "q3_k": "Q3_K", "q2_k": "Q2_K"}

HARNESS = r"""
#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml.h"
#include <stdio.h>
#include <stdlib.h>

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}
static size_t block_elems(enum ggml_type t) {
    switch (t) {
        case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K: case GGML_TYPE_IQ4_XS: case GGML_TYPE_Q3_K:
        case GGML_TYPE_Q2_K:
            return QK_K;
        default: return 32;
    }
}
size_t ggml_type_size(enum ggml_type t) {
    switch (t) {
        case GGML_TYPE_Q8_0: return sizeof(block_q8_0);
        case GGML_TYPE_Q4_0: return sizeof(block_q4_0);
        case GGML_TYPE_Q4_1: return sizeof(block_q4_1);
        case GGML_TYPE_Q5_0: return sizeof(block_q5_0);
        case GGML_TYPE_Q5_1: return sizeof(block_q5_1);
        case GGML_TYPE_Q4_K: return sizeof(block_q4_K);
        case GGML_TYPE_Q5_K: return sizeof(block_q5_K);
        case GGML_TYPE_Q6_K: return sizeof(block_q6_K);
        case GGML_TYPE_IQ4_NL: return sizeof(block_iq4_nl);
        case GGML_TYPE_IQ4_XS: return sizeof(block_iq4_xs);
        case GGML_TYPE_Q3_K: return sizeof(block_q3_K);
        case GGML_TYPE_Q2_K: return sizeof(block_q2_K);
        default: fprintf(stderr, "harness: type %d not stubbed\n", (int) t); abort();
    }
}
size_t ggml_row_size(enum ggml_type t, int64_t ne) { return ggml_type_size(t) * (ne / block_elems(t)); }
const char * ggml_type_name(enum ggml_type t) { (void) t; return "(harness)"; }
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if "LLAMA_CPP_DIR" not in os.environ or not SRC.is_file():
        pytest.skip("LLAMA_CPP_DIR is unset or has no ggml/src/ggml-quants.c")
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    root = SRC.parents[1]  # .../ggml
    out = tmp_path_factory.mktemp("ggml_quants")
    (out / "harness.c").write_text(HARNESS)
    cmd = ["gcc", "-O2", "-DNDEBUG", "-shared", "-fPIC", f"-I{root / 'include'}", f"-I{root / 'src'}",
           str(out / "harness.c"),
           str(SRC), "-o", str(out / "libggmlq.so"), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"building the harness failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
    so = ctypes.CDLL(str(out / "libggmlq.so"))
    for t in TYPES.values():
        q = getattr(so, f"quantize_{cname(t)}")
        q.restype, q.argtypes = ctypes.c_size_t, [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
        d = getattr(so, f"dequantize_row_{cname(t)}")
        d.restype, d.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return so


def cname(type_name: str) -> str:
    return type_name.lower().replace("_k", "_K")  # Q4_K -> q4_K, Q8_0 -> q8_0, IQ4_XS -> iq4_xs


def c_quantize(so, type_name: str, w: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    t = TYPES[type_name]
    n, k = w.shape
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
    w = np.ascontiguousarray(w, np.float32)
    out = np.zeros((n, k // block * size), np.uint8)
    fn = getattr(so, f"quantize_{cname(t)}")
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    if qw is not None and qw.ndim == 2:  # one imatrix per row: call row by row
        for r in range(n):
            fn(w[r].ctypes.data, out[r].ctypes.data, 1, k, qw[r].ctypes.data)
        return out
    fn(w.ctypes.data, out.ctypes.data, n, k, None if qw is None else qw.ctypes.data)
    return out


def c_dequantize(so, type_name: str, raw: np.ndarray, k: int) -> np.ndarray:
    fn = getattr(so, f"dequantize_row_{cname(TYPES[type_name])}")
    raw = np.ascontiguousarray(raw)
    out = np.zeros((raw.shape[0], k), np.float32)
    fn(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def hard_weights(n=12, k=1024, seed=0) -> torch.Tensor:
    """Random rows plus the cases a block search can get wrong."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, :300] = 0  # all-zero blocks and a zero super-block
    w[1, :512] = -w[1, :512].abs()  # negative-only blocks
    w[2, :512] = w[2, :512].abs()  # positive-only blocks
    w[3, 5], w[3, k - 300] = 3.0, -5.0  # outliers
    w[4, :256] = 1e-3 * torch.randn(256, generator=g)  # one huge sub-block among tiny ones: sub-scales round to 0
    w[4, 32:64] = 40 * torch.randn(32, generator=g)
    w[5, :64] = 0.25  # constant blocks
    w[5, 64:96] = -0.125
    w[6] = torch.randint(-8, 8, (k,), generator=g).float() * 0.01  # values on a grid: exact ties
    w[7, :256] = 1e-6 * torch.randn(256, generator=g)  # fp16 d underflows to a subnormal
    w[8, :256] = 1e-9 * torch.randn(256, generator=g)  # ... and to zero
    w[9, :128] = torch.randn(128, generator=g) * 100  # large values
    return w


@pytest.mark.parametrize("name", list(TYPES))
def test_rtn_bytes_equal_llamacpp(lib, name):
    fmt = get_format(name)
    w = hard_weights()
    ours = fmt.to_gguf_bytes(fmt.quantize(w))
    ref = c_quantize(lib, name, w.numpy(), None)
    bad = np.nonzero((ours != ref).any(-1))[0]
    assert np.array_equal(ours, ref), f"{name}: rows {bad.tolist()} differ from llama.cpp"


@pytest.mark.parametrize("name", list(TYPES))
def test_imatrix_bytes_equal_llamacpp(lib, name):
    fmt = get_format(name)
    w = hard_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    imatrix = torch.rand(w.shape[1], generator=g) ** 2
    imatrix[100:140] = 0  # columns the calibration never reached
    ours = fmt.to_gguf_bytes(fmt.quantize(w, importance=imatrix))
    ref = c_quantize(lib, name, w.numpy(), imatrix.numpy())
    bad = np.nonzero((ours != ref).any(-1))[0]
    assert np.array_equal(ours, ref), f"{name}: rows {bad.tolist()} differ from llama.cpp"


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_k", "q6_k", "iq4_nl", "iq4_xs", "q3_k", "q2_k"])
def test_per_element_importance_equals_llamacpp_row_by_row(lib, name):
    fmt = get_format(name)
    w = hard_weights(k=512, seed=3)
    imp = torch.rand(w.shape, generator=torch.Generator().manual_seed(4))
    ours = fmt.to_gguf_bytes(fmt.quantize(w, importance=imp))
    assert np.array_equal(ours, c_quantize(lib, name, w.numpy(), imp.numpy()))


@pytest.mark.parametrize("name", list(TYPES))
def test_dequantize_equals_llamacpp(lib, name):
    fmt = get_format(name)
    w = hard_weights(seed=5)
    raw = c_quantize(lib, name, w.numpy(), None)
    ours = fmt.dequantize(fmt.from_gguf_bytes(raw, tuple(w.shape))).numpy()
    ref = c_dequantize(lib, name, raw, w.shape[1])
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{name}: max diff {np.abs(ours - ref).max()}"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "q3_k", "q2_k"])
def test_kquants_random_scales_equal_llamacpp(lib, name, seed):
    """Rows whose magnitude varies by orders of magnitude between sub-blocks, with and without an imatrix."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(8, 512, generator=g) * torch.exp(4 * torch.randn(8, 512 // 16, 1, generator=g)).repeat(
        1, 1, 16).reshape(8, 512)
    imatrix = torch.rand(512, generator=g)
    for imp in (None, imatrix):
        ours = fmt.to_gguf_bytes(fmt.quantize(w, importance=imp))
        ref = c_quantize(lib, name, w.numpy(), None if imp is None else imp.numpy())
        assert np.array_equal(ours, ref), f"{name} seed {seed} importance {imp is not None}"
