"""Quality of a quantized model against its float model, on held-out text.

KL(ref || test) per next-token distribution (mean, 99th percentile, max over tokens), top-1 agreement, and the
perplexity of both. Instruction-tuned Gemma 4's perplexity on plain text says little, so KL divergence and top-1
agreement are the headline figures. Everything is computed in fp64 from fp32 logits, one batch at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


@torch.no_grad()
def compare_logits(ref: torch.nn.Module, test: torch.nn.Module, ids: Tensor, batch_size: int = 4,
                   windows: bool = False, routing: bool = False) -> dict:
    """KL, top-1 and perplexity of `test` against `ref` on ids [n_seq, T]; windows=True adds "kl_windows", the mean
    KL of each of the n_seq windows (for `share_removed`'s confidence interval); routing=True adds, on an MoE
    model, "routing": expert choices that differ per MoE layer and the KL with the reference's routing, from one
    more forward of `test` per batch (gemmaquant.eval.routing)."""
    from gemmaquant.eval.routing import RoutingProbe, moe_routers

    probe = RoutingProbe(ref, test) if routing and moe_routers(ref) else None
    kls, agree, nll_ref, nll_test, n, kl_forced = [], 0, 0.0, 0.0, 0, 0.0
    try:
        for b in ids.split(batch_size):
            lr = torch.log_softmax(ref(b).double(), -1)[:, :-1]  # predictions for positions 1..T-1
            lt = torch.log_softmax(test(b).double(), -1)[:, :-1]
            target = b[:, 1:]
            kls.append((lr.exp() * (lr - lt)).sum(-1).flatten())
            agree += int((lr.argmax(-1) == lt.argmax(-1)).sum())
            nll_ref -= float(lr.gather(-1, target[..., None]).sum())
            nll_test -= float(lt.gather(-1, target[..., None]).sum())
            n += target.numel()
            if probe is not None:
                probe.count_flips()
                probe.forcing = True
                lf = torch.log_softmax(test(b).double(), -1)[:, :-1]
                probe.forcing = False
                kl_forced += float((lr.exp() * (lr - lf)).sum(-1).clamp(min=0).sum())
    finally:
        if probe is not None:
            probe.remove()
    kl = torch.cat(kls).clamp(min=0)
    out = {"kl_mean": float(kl.mean()), "kl_p99": float(torch.quantile(kl, 0.99)), "kl_max": float(kl.max()),
           "top1": agree / n, "ppl_ref": float(torch.exp(torch.tensor(nll_ref / n))),
           "ppl_test": float(torch.exp(torch.tensor(nll_test / n))), "tokens": n}
    if windows:
        out["kl_windows"] = kl.view(ids.shape[0], -1).mean(-1).tolist()
    if probe is not None:
        out["routing"] = probe.result(out["kl_mean"], kl_forced / n)
    return out


def share_removed(base_windows: list[float], new_windows: list[float], resamples: int = 10_000,
                  seed: int = 0) -> dict:
    """How much of a baseline's KL a new model removes, 1 - KL(new) / KL(base), on the same held-out windows, with
    a 95% confidence interval from a paired bootstrap over the windows (both models' KL of a window resampled
    together; percentile interval, Efron & Tibshirani 1993, ch. 13). It says how far the figure could move on
    other text of the same kind; it does not include run-to-run (seed) spread."""
    b = torch.tensor(base_windows, dtype=torch.float64)
    t = torch.tensor(new_windows, dtype=torch.float64)
    if b.shape != t.shape or b.numel() < 2:
        raise ValueError(f"share_removed needs the same >= 2 windows for both models, got {b.numel()} and {t.numel()}")
    if not b.mean() > 0:
        raise ValueError("share_removed: the baseline's KL is 0, there is nothing to remove")
    idx = torch.randint(0, b.numel(), (resamples, b.numel()), generator=torch.Generator().manual_seed(seed))
    boot = 1 - t[idx].mean(1) / b[idx].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"share": float(1 - t.mean() / b.mean()), "ci95": [lo, hi], "windows": b.numel()}


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: Tensor, batch_size: int = 4) -> float:
    nll, n = 0.0, 0
    for b in ids.split(batch_size):
        lp = torch.log_softmax(model(b).double(), -1)[:, :-1]
        nll -= float(lp.gather(-1, b[:, 1:, None]).sum())
        n += b[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / n)))


def heldout_ids(tokenizer_dir: str | Path, text_file: str | Path, n_seq: int, seq_len: int, bos: int = 2) -> Tensor:
    """[n_seq, seq_len] non-overlapping windows of the held-out text (BOS before each document)."""
    from gemmaquant.calibration import CalibrationError, load_tokenizer, read_texts

    tok = load_tokenizer(tokenizer_dir)
    stream: list[int] = []
    for text in read_texts(text_file):
        stream += [bos] + tok.encode(text, add_special_tokens=False).ids
        if len(stream) >= n_seq * seq_len:
            break
    if len(stream) < n_seq * seq_len:
        raise CalibrationError(f"{text_file}: {len(stream)} tokens, too short for {n_seq} x {seq_len} held-out tokens")
    return torch.tensor(stream[:n_seq * seq_len]).view(n_seq, seq_len)


def sqnr_db(w: Tensor, w_hat: Tensor) -> float:
    err = (w.double() - w_hat.double()).pow(2).sum()
    return float("inf") if err == 0 else float(10 * torch.log10(w.double().pow(2).sum() / err))
