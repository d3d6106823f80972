import os

import pytest
import torch

# Triton kernels run in the interpreter where there is no GPU; set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fixed_throughput(request, monkeypatch, tmp_path_factory):
    """The dry-run time estimate measures the device (gemmaquant.throughput); tests get fixed rates instead of
    timing probes (no timing in tests), and a cache file of their own. tests/test_throughput.py asks for the
    real probes with the `real_throughput` marker."""
    import gemmaquant.throughput as tp

    monkeypatch.setenv("GEMMAQUANT_CACHE", str(tmp_path_factory.getbasetemp() / "gemmaquant-cache"))
    if request.node.get_closest_marker("real_throughput") is None:
        monkeypatch.setattr(tp, "probe_gemm", lambda dev, dtype, width, tokens=512: 50.0 if dtype != torch.float64
                            else 25.0)
        monkeypatch.setattr(tp, "probe_gptq", lambda dev, fmt, K, importance=True: {"a": 0.01, "c": 1e-4, "b": 1e-4})
        monkeypatch.setattr(tp, "_MEMO", {})
