"""How fast this machine's device runs what a quantization spends its time on, measured by short probes, for the
`--dry-run` time estimate (gemmaquant.estimate).

    gemm     the layer forward: GFLOP/s of one [tokens, H] x [H, H] product at the model's width, in the forward's
             dtype (fp32 on the CPU, bf16 on a GPU), on the run's device
    acc      the statistics (X^T X sums): the same product in their accumulation dtype (fp64 on the CPU, fp32 on
             a GPU)
    gptq     per (format, K): the column sweep timed at two row counts and the damped Cholesky factor alone, at
             K_p = min(K, PROBE_K) columns, giving
                 t(N, K) = a (K / K_p)^3            factorization (fp64 Cholesky + triangular inverse)
                         + c K                      per-column cost that does not grow with N (kernel launches,
                                                    Python), shared by a batch of experts (gptq_batched)
                         + b N (K / K_p)^2          per row: rounding, in-block updates and block updates
             measured exactly at K <= PROBE_K, extrapolated beyond (the block updates grow as K^2 per row)

Probes take about a second in all; results are kept per process and in a JSON file (GEMMAQUANT_CACHE, default
~/.cache/gemmaquant/throughput.json) under the device's name and the torch version, so a second dry run on the
same machine reuses them (and says so).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROBE_K = 1024  # the widest GPTQ probe (a 31B down_proj has K = 21504: its factorization alone takes minutes)
PROBE_ROWS = (16, 48)
_MEMO: dict[str, dict] = {}


@dataclass
class Throughput:
    """Measured rates of one device. gptq: {gptq_key(format, K_p, importance): {"a": s, "c": s per column,
    "b": s per row}}."""

    device: str
    gemm_gflops: float
    gptq: dict[str, dict] = field(default_factory=dict)
    acc_gflops: float | None = None  # the statistics' rate (None: gemm_gflops)
    basis: str = "measured"  # "measured now", "cached (<date>)", or what a caller injected

    def gptq_seconds(self, fmt_name: str, N: int, K: int, experts: int = 1, batch: int = 1,
                     importance: bool = True) -> float:
        """One matrix [N, K] (experts of them, `batch` per batched sweep) by GPTQ on this device; importance:
        block parameters fit imatrix-style (the recipe's importance_params) or by absmax."""
        kp = min(K, PROBE_K)
        p = self.gptq[gptq_key(fmt_name, kp, importance)]
        r = K / kp
        sweeps = -(-experts // max(batch, 1))
        return experts * (p["a"] * r**3 + p["b"] * N * r**2) + sweeps * p["c"] * K


def gptq_key(fmt_name: str, kp: int, importance: bool) -> str:
    return f"{fmt_name}:{kp}" + ("" if importance else ":absmax")


def cache_file() -> Path:
    return Path(os.environ.get("GEMMAQUANT_CACHE", Path.home() / ".cache" / "gemmaquant")) / "throughput.json"


def _key(dev: torch.device) -> str:
    from gemmaquant.device import device_name

    return f"{device_name(dev)} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev, min_seconds: float = 0.0) -> float:
    """Seconds per call of fn (one warm-up call, then repeated for at least min_seconds)."""
    fn()
    _sync(dev)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(dev)
        if time.perf_counter() - t0 >= min_seconds:
            return (time.perf_counter() - t0) / n


def probe_gemm(dev: torch.device, dtype: torch.dtype, width: int, tokens: int = 512) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g).to(dev, dtype)
    w = torch.randn(width, width, generator=g).to(dev, dtype)
    s = _timed(lambda: x @ w, dev, 0.2)
    return 2 * tokens * width * width / s / 1e9


def probe_gptq(dev: torch.device, fmt, K: int, importance: bool = True) -> dict:
    """{"a", "c", "b"} of the module docstring for `fmt` at K columns (K <= PROBE_K)."""
    from gemmaquant.algorithms.gptq import damped_inverse_cholesky, gptq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * K, K, generator=g) * torch.exp(torch.randn(K, generator=g))
    H = (x.T @ x / x.shape[0]).to(dev)
    a = _timed(lambda: damped_inverse_cholesky(H.double(), 0.01), dev)
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in PROBE_ROWS:
            w = (0.02 * torch.randn(n, K, generator=g)).to(dev)
            times.append(_timed(lambda w=w: gptq(w, H, fmt, importance_params=importance), dev))
    (n0, n1), (t0, t1) = PROBE_ROWS, times
    b = max(0.0, (t1 - t0) / (n1 - n0))
    c = max(0.0, t0 - b * n0 - a) / K
    return {"a": a, "c": c, "b": b}


def measure(dev: torch.device, fwd_dtype: torch.dtype, width: int, gptq_shapes: set[tuple[object, int]],
            importance: bool = True, use_cache: bool = True, acc_dtype: torch.dtype | None = None) -> Throughput:
    """The throughput of `dev` for a run: GEMM at `width` in `fwd_dtype` and in `acc_dtype` (the statistics'),
    GPTQ probes for each (format, K) in gptq_shapes (K capped at PROBE_K). Reuses what this process or the cache
    file measured before."""
    key = _key(dev)
    path = cache_file()
    stored = {}
    if use_cache and path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}  # an unreadable cache is measured again
    entry = _MEMO.setdefault(key, stored.get(key, {"gemm": {}, "gptq": {}, "date": None}))
    fresh = False
    rates = {}
    for dtype in (fwd_dtype, acc_dtype or fwd_dtype):
        gk = f"{str(dtype).removeprefix('torch.')}:{width}"
        if gk not in entry["gemm"]:
            entry["gemm"][gk] = probe_gemm(dev, dtype, width)
            fresh = True
        rates[dtype] = entry["gemm"][gk]
    for fmt, K in sorted(gptq_shapes, key=lambda s: (s[0].name, s[1])):
        kp = min(K, PROBE_K)
        if gptq_key(fmt.name, kp, importance) not in entry["gptq"]:
            entry["gptq"][gptq_key(fmt.name, kp, importance)] = probe_gptq(dev, fmt, kp, importance)
            fresh = True
    if fresh:
        entry["date"] = time.strftime("%Y-%m-%d %H:%M")
        if use_cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({**stored, key: entry}, indent=1, sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home: the measurement serves this process only
    basis = "measured now" if fresh else f"measured {entry['date']}, cached in {path}"
    return Throughput(device=key, gemm_gflops=rates[fwd_dtype], gptq=dict(entry["gptq"]), basis=basis,
                      acc_gflops=rates[acc_dtype or fwd_dtype])
