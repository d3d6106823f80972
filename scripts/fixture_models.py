"""Stage 3 of scripts/train_fixtures.py: training the tiny fixtures."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from fixture_common import log
from fixture_corpus import read_documents
from fixture_tokenizer import VOCAB_SIZE


# =====================================================================================================
# 3. Models
# =====================================================================================================


def fixture_configs():
    from gemmaquant.config import FULL, SLIDING, Gemma4Config

    S, F = SLIDING, FULL
    common = dict(vocab_size=VOCAB_SIZE, head_dim=32, global_head_dim=64, sliding_window=32,
                  final_logit_softcapping=30.0, tie_word_embeddings=True, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, eos_token_id=1, bos_token_id=2, pad_token_id=0)
    return {
        # 31B-like: dense, k_eq_v full layers with their own (fewer) KV heads, sliding + full with different head dims
        "tiny-dense": Gemma4Config(**common, hidden_size=192, intermediate_size=576, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                                   attention_k_eq_v=True, layer_types=(S, S, F, S, S, F),
                                   hidden_size_per_layer_input=0),
        # 26B-A4B-like: routed experts beside the dense MLP in every layer, k_eq_v
        "tiny-moe": Gemma4Config(**common, hidden_size=160, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                                 attention_k_eq_v=True, layer_types=(S, S, S, F), hidden_size_per_layer_input=0,
                                 enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=128),
        # E2B-like: per-layer embeddings, the last two layers reuse the K/V of layers 2 (sliding) and 3 (full),
        # double-wide MLP on those shared layers
        "tiny-edge": Gemma4Config(**common, hidden_size=160, intermediate_size=320, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=1, layer_types=(S, S, S, F, S, F),
                                  hidden_size_per_layer_input=32, vocab_size_per_layer_input=VOCAB_SIZE,
                                  num_kv_shared_layers=2, use_double_wide_mlp=True),
    }


def check_llamacpp_constraints(cfg) -> None:
    """What llama.cpp's gemma4 loader needs (GEMMA4_SPEC.md §3)."""
    from gemmaquant.config import FULL, SLIDING

    t = cfg.layer_types
    assert SLIDING in t, "at least one sliding layer"
    assert cfg.global_head_dim != cfg.head_dim, "global_head_dim must differ from head_dim"
    assert t[-1] == FULL, "last layer full"
    if cfg.num_kv_shared_layers:
        first = cfg.first_kv_shared_layer
        assert t[first - 2:first] == (SLIDING, FULL), "last two unshared layers must be (sliding, full)"


def token_stream(tok, docs: list[str]) -> list[int]:
    """<bos> document <eos> for every document, concatenated."""
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids += [2] + enc.ids + [1]
    return ids


def init_weights(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p.shape[-1]
                std = 0.02 if "embed" in name else fan_in ** -0.5
                if name.endswith(("o_proj.weight", "down_proj.weight", "per_layer_projection.weight")) or \
                        name.endswith("experts.down_proj"):
                    std = std / math.sqrt(2 * model.config.num_hidden_layers)
                p.copy_(torch.randn(p.shape, generator=g) * std)
            # 1-D: norms, router scale, per-expert scale stay at their init of 1


def moe_aux_loss(model, captured: dict) -> "torch.Tensor":
    """Switch Transformer load-balancing loss per MoE layer: E * sum_e f_e * P_e, with f_e the fraction of
    (token, slot) assignments routed to expert e and P_e the mean router probability of e; 1.0 when uniform.
    The router is re-run on the residual its layer saw (captured by a forward pre-hook)."""
    import torch

    losses = []
    for i, x in captured.items():
        r = model.layers[i].router
        flat = x.reshape(-1, x.shape[-1])
        logits = r.proj(r.norm(flat) * r.scale * flat.shape[-1] ** -0.5)
        probs = torch.softmax(logits.float(), dim=-1)
        E = probs.shape[-1]
        top = probs.topk(r.top_k, dim=-1).indices
        frac = torch.zeros(E).index_add_(0, top.reshape(-1), torch.ones(top.numel())) / top.numel()
        losses.append(E * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train_fixture(name: str, cfg, tok_dir: Path, out_dir: Path, data_dir: Path, quick: bool, budget_s: float,
                  seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    from gemmaquant.model.gemma4 import Gemma4, param_counts

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    check_llamacpp_constraints(cfg)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    train_docs = read_documents(data_dir / "train.txt")
    stream = torch.tensor(token_stream(tok, train_docs), dtype=torch.int64)
    seq, batch = (128, 4) if quick else (128, 16)
    n_windows = (len(stream) - 1) // seq
    log(f"{name}: {len(stream)} training tokens, {n_windows} windows of {seq}, params {param_counts(cfg)}")
    model = Gemma4(cfg)
    init_weights(model, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    lr = 3e-3
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if cfg.enable_moe_block:
        for i, layer in enumerate(model.layers):
            hooks.append(layer.router.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0])))
    # estimate steps from the time budget with a short timing run, then a fixed cosine schedule
    steps = 30 if quick else None
    g = torch.Generator().manual_seed(seed + 1)
    warmup = 5 if quick else 100
    t0, step, total_steps, losses = time.time(), 0, steps or 10**9, []
    while step < total_steps:
        if steps is None and step == 20:
            per = (time.time() - t0) / 20
            total_steps = max(200, int(budget_s / per))
            log(f"{name}: {per:.3f}s/step -> {total_steps} steps ({total_steps * batch * seq / 1e6:.2f}M tokens)")
        frac = step / max(1, total_steps) if steps or step >= 20 else 0.0
        cur = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for grp in opt.param_groups:
            grp["lr"] = cur
        starts = torch.randint(0, n_windows, (batch,), generator=g) * seq
        x = torch.stack([stream[s:s + seq + 1] for s in starts])
        captured.clear()
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        total = loss
        aux = None
        if cfg.enable_moe_block:
            aux = moe_aux_loss(model, captured)
            total = loss + 0.02 * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % (10 if quick else 100) == 0 or step == total_steps:
            msg = f"{name}: step {step}/{total_steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} lr {cur:.2e}"
            if aux is not None:
                msg += f" aux {aux.item():.3f}"
            log(msg + f" ({time.time() - t0:.0f}s)")
    for hk in hooks:
        hk.remove()
    model.eval()
    save_fixture(model, tok_dir, out_dir)
    return {"steps": total_steps, "seconds": round(time.time() - t0), "tokens_seen": total_steps * batch * seq,
            "final_train_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4)}


def save_fixture(model, tok_dir: Path, out_dir: Path) -> None:
    import torch

    try:
        from gemmaquant.checkpoint import save_checkpoint
    except ImportError:
        save_checkpoint = None
    if save_checkpoint is not None:
        save_checkpoint(model, out_dir, dtype=torch.bfloat16, tokenizer_dir=tok_dir, overwrite=True)
        return
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tensors = {"model." + n: t.detach().to(torch.bfloat16).contiguous() for n, t in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**model.config.to_hf_dict(), "architectures": ["Gemma4ForCausalLM"], "torch_dtype": "bfloat16"}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tok_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
