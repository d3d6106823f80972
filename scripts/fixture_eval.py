"""Stage 4 of scripts/train_fixtures.py: evaluating the fixtures (the `report` command)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fixture_common import log
from fixture_corpus import read_documents
from fixture_models import fixture_configs, init_weights, token_stream
from fixture_tokenizer import VOCAB_SIZE


# =====================================================================================================
# 4. Evaluation (used by `report`; the tests re-check the bounds quickly)
# =====================================================================================================


def load_fixture(path: Path, dtype=None):
    import torch
    from safetensors.torch import load_file

    from gemmaquant.config import Gemma4Config
    from gemmaquant.model.gemma4 import Gemma4

    cfg = Gemma4Config.from_hf_dict(json.loads((path / "config.json").read_text()))
    model = Gemma4(cfg)
    sd = {k.removeprefix("model."): v for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(sd, strict=True)
    return model.to(dtype or torch.float32).eval()


def heldout_windows(tok_dir: Path, data_dir: Path, seq: int = 128, max_windows: int | None = None):
    """Held-out documents as <bos> doc <eos> windows of `seq` tokens; returns (windows [N, seq+1], kinds)."""
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    docs = read_documents(data_dir / "heldout.txt")
    stream = token_stream(tok, docs)
    n = (len(stream) - 1) // seq
    if max_windows:
        n = min(n, max_windows)
    return torch.tensor([stream[k * seq:k * seq + seq + 1] for k in range(n)], dtype=torch.int64)


def perplexity(model, windows, batch: int = 16) -> float:
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(windows), batch):
            x = windows[k:k + batch]
            logits = model(x[:, :-1]).float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def unigram_perplexity(tok_dir: Path, data_dir: Path, windows) -> float:
    """Perplexity of the add-one unigram model fitted on train.txt, on the same held-out targets."""
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    counts = torch.bincount(torch.tensor(token_stream(tok, read_documents(data_dir / "train.txt"))),
                            minlength=VOCAB_SIZE).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[windows[:, 1:].reshape(-1)].mean().item())


def rtn_quantize_(model, bits: int, group: int | None) -> None:
    """Round-to-nearest, symmetric, in place, on every 2-D weight (linear layers, experts, embeddings):
    per output row (group None) or per row in groups of `group` input columns. int8: max-abs/127, int4: /7."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2:
                continue
            w = p.float()
            shape = w.shape
            wg = w.reshape(-1, group) if group else w.reshape(-1, shape[-1])
            scale = wg.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
            q = (wg / scale).round().clamp(-qmax - 1, qmax) * scale
            p.copy_(q.reshape(shape).to(p.dtype))


def kl_to(ref_logits, logits) -> float:
    import torch.nn.functional as F

    lp, lq = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def expert_load(model, windows) -> list[list[int]]:
    """Tokens routed to each expert (top-k slots counted) per MoE layer on the given windows."""
    import torch

    loads = [torch.zeros(model.config.num_experts, dtype=torch.int64) for _ in model.layers]
    def count(i):
        def hook(module, args, out):  # out = (weights, expert ids); returns None so the output is unchanged
            loads[i].add_(torch.bincount(out[1].reshape(-1), minlength=len(loads[i])))
        return hook

    hooks = [layer.router.register_forward_hook(count(i)) for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(windows[:, :-1])
    for hk in hooks:
        hk.remove()
    return [l.tolist() for l in loads]


def evaluate(name: str, path: Path, data_dir: Path, max_windows: int | None = None) -> dict:
    import copy

    import torch

    from gemmaquant.model.gemma4 import param_counts

    torch.set_num_threads(1)
    model = load_fixture(path)
    windows = heldout_windows(path, data_dir, 128, max_windows)
    res = {"params": param_counts(model.config), "heldout_windows": len(windows),
           "heldout_tokens": int(windows[:, 1:].numel()),
           "safetensors_bytes": (path / "model.safetensors").stat().st_size}
    res["ppl_heldout"] = round(perplexity(model, windows), 3)
    res["ppl_unigram"] = round(unigram_perplexity(path, data_dir, windows), 1)
    untrained = type(model)(model.config)
    init_weights(untrained, 0)
    res["ppl_untrained"] = round(perplexity(untrained.eval(), windows[:32]), 1)
    sub = windows[torch.linspace(0, len(windows) - 1, min(len(windows), 64)).long()]  # spread over all kinds
    with torch.no_grad():
        ref = model(sub[:, :-1])
        for label, bits, group in (("int8_per_channel", 8, None), ("int4_g32", 4, 32)):
            q = copy.deepcopy(model)
            rtn_quantize_(q, bits, group)
            res[f"kl_{label}"] = round(kl_to(ref, q(sub[:, :-1])), 5)
            res[f"ppl_{label}"] = round(perplexity(q, windows), 3)
    if model.config.enable_moe_block:
        res["tokens_per_expert"] = expert_load(model, sub)
    return res


def update_report(fixtures_dir: Path, section: str, name: str, values: dict) -> None:
    """fixtures/report.json: {"training": {name: ...}, "eval": {name: ...}}, the numbers README.md quotes."""
    f = Path(fixtures_dir) / "report.json"
    data = json.loads(f.read_text()) if f.is_file() else {}
    data.setdefault(section, {})[name] = values
    f.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def report(args) -> dict:
    out = {}
    for name in args.only or list(fixture_configs()):
        path = Path(args.fixtures_dir) / name
        out[name] = evaluate(name, path, Path(args.data_dir), max_windows=16 if args.quick else None)
        log(f"{name}: {json.dumps(out[name])}")
        update_report(getattr(args, "fixtures_report", Path(args.fixtures_dir)), "eval", name, out[name])
    return out
