"""Block-wise reconstruction before end-to-end QAT: one decoder layer at a time (EfficientQAT's Block-AP).

EfficientQAT (Chen et al. 2024, arXiv:2407.11062) trains each transformer block alone, all its parameters
(latent weights and quantization parameters) at once, to reproduce the float block's output; OmniQuant
(Shao et al. 2023) did the same for the quantization parameters only. Per layer i, in order:

    x_fp  = the float model's input to layer i          x_q = the student's input to layer i (layers < i done)
    y_fp  = teacher.layers[i](x_fp)                     (target: the float chain, so layer i also corrects
                                                         the error that layers < i left behind)
    for step < block_steps:  minibatch b of the block samples
        loss = |student.layers[i](x_q[b]) - y_fp[b]|^2 / |y_fp[b]|^2  (+ router KL on MoE layers)
        AdamW on layer i's latent weights, block scales and float tensors (the QAT recipe's rates), cosine
    x_q <- student.layers[i](x_q),  x_fp <- y_fp

The block samples' hidden states are kept for both chains ([samples, seq_len, hidden] each, like GPTQ's
calibration activations), with the K/V of layers that KV-shared layers read. The loss sees the whole layer
(attention softmax, qk-norms, the MoE routing), which GPTQ's per-matrix least squares does not; and every layer
gets its own steps, where the end-to-end loss spreads one gradient over all of them.
Resumable: after each layer the student goes to `blocks.safetensors` with the count of layers done.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from gemmaquant.model.gemma4 import ForwardState, LayerKV

BLOCK_CHECKPOINT = "qat-blocks.safetensors"


def _rel_mse(out: Tensor, target: Tensor) -> Tensor:
    return ((out - target) ** 2).mean() / (target**2).mean().clamp(min=1e-12)


def _router_kl(s: Tensor, t: Tensor) -> Tensor:
    ls, lt = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


class _Chain:
    """One model's hidden states entering the next layer, for every block sample, and the K/V its producer
    layers computed (KV-shared layers read them)."""

    def __init__(self, model: nn.Module, ids: Tensor, chunk: int):
        self.model, self.chunk = model, chunk
        with torch.no_grad():
            parts = [model.embed(ids[s:s + chunk]) for s in range(0, ids.shape[0], chunk)]
        self.h = torch.cat([p[0] for p in parts])
        self.ple = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        self.kv: dict[int, LayerKV] = {}
        self.base = model.forward_state(ids.shape[1], None, ids.device)

    def state(self, rows: Tensor) -> ForwardState:
        fresh = {i: LayerKV(kv.k[rows], kv.v[rows], kv.pos) for i, kv in self.kv.items()}
        return ForwardState(q_pos=self.base.q_pos, rope=self.base.rope, fresh_kv=fresh)

    def run(self, i: int, rows: Tensor, h: Tensor | None = None) -> tuple[Tensor, ForwardState]:
        st = self.state(rows)
        layer = self.model.layers[i]
        out = layer(self.h[rows] if h is None else h, st, None if self.ple is None else self.ple[rows, :, i])
        return out, st

    @torch.no_grad()
    def advance(self, i: int) -> Tensor:
        """Layer i over all samples (in chunks): the chain moves to layer i + 1; returns the new hidden states."""
        outs, kvs = [], []
        for s in range(0, self.h.shape[0], self.chunk):
            rows = torch.arange(s, min(s + self.chunk, self.h.shape[0]))
            out, st = self.run(i, rows)
            outs.append(out)
            if i in st.fresh_kv:
                kvs.append(st.fresh_kv[i])
        cfg = self.model.config
        if kvs and any(cfg.kv_producer(j) == i for j in range(i + 1, cfg.num_hidden_layers)):
            self.kv[i] = LayerKV(torch.cat([kv.k for kv in kvs]), torch.cat([kv.v for kv in kvs]), kvs[0].pos)
        self.h = torch.cat(outs)
        return self.h


def block_reconstruct(teacher: nn.Module, student: nn.Module, ids: Tensor, r, param_groups, work_dir: Path,
                      fingerprint: str = "", progress: bool | None = None) -> list[dict]:
    """Train `student` (prepared for QAT) layer by layer towards `teacher` on the block samples `ids` [N, T].
    r: the QATRecipe (block_steps, batch_size, rates, router_weight, seed); param_groups(module, r) -> AdamW
    groups. Returns the per-layer log (first and last loss). Resumes from work_dir / BLOCK_CHECKPOINT when its
    fingerprint (model, recipe, data) is this run's."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from gemmaquant.quantized import save_atomic

    L = len(student.layers)
    ckpt = Path(work_dir) / BLOCK_CHECKPOINT
    done, log = 0, []
    if ckpt.is_file():
        with safe_open(str(ckpt), framework="pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("fingerprint") == fingerprint:
            student.load_state_dict(state, strict=True)
            done, log = int(meta["layers_done"]), json.loads(meta["log"])

    chunk = r.batch_size
    fp, q = _Chain(teacher, ids, chunk), _Chain(student, ids, chunk)
    for i in range(done):  # resume: bring both chains to the first layer not yet trained
        fp.advance(i), q.advance(i)
    g = torch.Generator().manual_seed(r.seed * 7919 + 17)
    bar = tqdm(total=L * r.block_steps, initial=done * r.block_steps, desc="qat blocks", unit="step",
               disable=(not progress) if progress is not None else None)
    for i in range(done, L):
        s_layer, t_layer = student.layers[i], teacher.layers[i]
        groups = param_groups(s_layer, r)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
        base = [grp["lr"] for grp in opt.param_groups]
        router = r.router_weight > 0 and hasattr(s_layer, "router")
        taps: dict[str, Tensor] = {}
        hooks = []
        if router:
            hooks = [s_layer.router.proj.register_forward_hook(lambda m, a, o: taps.__setitem__("s", o)),
                     t_layer.router.proj.register_forward_hook(lambda m, a, o: taps.__setitem__("t", o))]
        first = last = None
        try:
            for step in range(r.block_steps):
                rows = torch.randint(0, ids.shape[0], (r.batch_size,), generator=g)
                with torch.no_grad():
                    target, _ = fp.run(i, rows)
                out, _ = q.run(i, rows)
                loss = _rel_mse(out, target)
                if router:
                    loss = loss + r.router_weight * _router_kl(taps["s"], taps["t"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], r.grad_clip)
                f = r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / r.block_steps))
                for grp, lr in zip(opt.param_groups, base):
                    grp["lr"] = lr * f
                opt.step()
                first = loss.item() if first is None else first
                last = loss.item()
                bar.update(1)
                bar.set_postfix(layer=i, loss=f"{last:.4f}")
        finally:
            for h in hooks:
                h.remove()
        for p in s_layer.parameters():
            p.requires_grad_(False)
        log.append({"layer": i, "loss_first": round(first, 6), "loss_last": round(last, 6)})
        fp.advance(i), q.advance(i)
        save_atomic({k: v.detach().contiguous() for k, v in student.state_dict().items()}, ckpt,
                    {"layers_done": str(i + 1), "log": json.dumps(log), "fingerprint": fingerprint})
    bar.close()
    for p in student.parameters():
        p.requires_grad_(True)
    return log
