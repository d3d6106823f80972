"""What llama.cpp's CPU backend computes for a GGUF, in torch: our reference model with llama.cpp's activation
rounding in every matrix product (the "compute precision" of a GGUF type).

ggml multiplies a weight of type T by activations converted to T's `vec_dot_type` (ggml-cpu.c `type_traits_cpu`):
    F32 -> F32 (exact)          F16 -> F16             BF16 -> BF16
    Q4_0, Q5_0, Q8_0, IQ4_NL -> Q8_0    Q4_1, Q5_1 -> Q8_1     Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS -> Q8_K
Q8_0 / Q8_1 (arch/x86/quants.c, AVX2 path): per 32 values d = amax/127 (stored fp16), q = round_half_even(x*127/amax).
Q8_1 also stores s = fp16(d * sum(q)), which the Q4_1/Q5_1 dot product uses for the weight minimum's term.
Q8_K (ggml-quants.c `quantize_row_q8_K_ref`): per 256 values iscale = -127/x_maxabs_signed,
q = round_half_even(iscale*x),
d = 1/iscale (fp32). Integer dot products are exact, so what remains between this simulation and llama.cpp is fp32
summation order (and, rarely, an activation that sits on a rounding boundary).
"""

from __future__ import annotations

import types

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from gemmaquant.export.gguf_names import text_name

VEC_DOT = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0",
           "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
           "IQ4_NL": "Q8_0", "IQ4_XS": "Q8_K", "Q3_K": "Q8_K", "Q2_K": "Q8_K"}


def _blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // n, n)


def q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (x_hat, d_unrounded, q) with x_hat = fp16(d) * q, per 32-block."""
    b = _blocks(x.float(), 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv)  # torch.round is half-to-even, as _mm256_round_ps(_MM_ROUND_NEAREST)
    d16 = d.half().float()
    return (q * d16).reshape(x.shape), d, q


def q8_k(x: torch.Tensor) -> torch.Tensor:
    b = _blocks(x.float(), 256)
    idx = b.abs().argmax(-1, keepdim=True)  # first maximal |x| (the reference loop keeps the first strict max)
    mx = b.gather(-1, idx)
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(iscale * b).clamp(max=127)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(x.shape)


def round_activations(x: torch.Tensor, vec_dot: str) -> torch.Tensor:
    if vec_dot == "F32":
        return x.float()
    if vec_dot == "F16":
        return x.half().float()
    if vec_dot == "BF16":
        return x.bfloat16().float()
    if vec_dot in ("Q8_0", "Q8_1"):
        return q8_0(x)[0]
    if vec_dot == "Q8_K":
        return q8_k(x)
    raise KeyError(vec_dot)


def linear(x: torch.Tensor, w: torch.Tensor, type_name: str, mins: torch.Tensor | None = None,
           perturb: tuple[torch.Generator, float] | None = None) -> torch.Tensor:
    """y = x @ w.T as ggml computes it for a weight stored as `type_name` (w: its dequantized values [N, K];
    mins: the Q4_1 / Q5_1 block minima [N, K/32]). perturb = (generator, eps) multiplies the activations by
    (1 + eps * N(0, 1)) before rounding: how far a few-ulp disagreement upstream moves the result."""
    if perturb is not None:
        x = x * (1 + perturb[1] * torch.randn(x.shape, generator=perturb[0]))
    vd = VEC_DOT[type_name]
    xh = round_activations(x, vd)
    y = xh.double() @ w.double().T
    if vd == "Q8_1":
        _, d, q = q8_0(x)
        s = (d * q.sum(-1, keepdim=True)).half().double()  # [..., K/32, 1]: what the m * s term uses
        xs = _blocks(xh, 32).sum(-1, keepdim=True).double()
        y = y + ((s - xs)[..., 0] @ mins.double().T)
    return y.float()


def gguf_weights(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Per text tensor: its GGUF type name, and for Q4_1/Q5_1 the per-block minima m [rows, K/32]."""
    r = gguf.GGUFReader(str(path))
    kinds, mins = {}, {}
    for t in r.tensors:
        name = text_name(t.name)
        if name is None:
            continue
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        kinds[name] = kind
        if kind in ("Q4_1", "Q5_1"):
            raw = np.asarray(t.data).reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
            m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)  # block: d (f16), m (f16), ...
            shape = tuple(int(s) for s in reversed(t.shape))
            mins[name] = torch.from_numpy(m.reshape(*shape[:-1], shape[-1] // 32))
    return kinds, mins


def emulate(model, path, perturb: tuple[torch.Generator, float] | None = None):
    """Patch `model` (a Gemma4 holding the GGUF's dequantized weights) to compute as llama.cpp does."""
    kinds, mins = gguf_weights(path)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            key = name + ".weight"
            mod.forward = (lambda m, k: (lambda x: linear(x, m.weight, kinds[k], mins.get(k), perturb)))(mod, key)
        if type(mod).__name__ == "Experts":
            i = name.split(".")[1]
            gu, dn = f"layers.{i}.experts.gate_up_proj", f"layers.{i}.experts.down_proj"

            def expert(self, e, x, gu=gu, dn=dn):
                g_u = linear(x, self.gate_up_proj[e], kinds[gu], None if gu not in mins else mins[gu][e], perturb)
                gate, up = g_u.chunk(2, dim=-1)
                h = F.gelu(gate, approximate="tanh") * up
                return linear(h, self.down_proj[e], kinds[dn], None if dn not in mins else mins[dn][e], perturb)

            mod.expert = types.MethodType(expert, mod)
    out_name = "embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"

    def head(self, h):
        w = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = linear(self.norm(h), w, kinds[out_name], mins.get(out_name), perturb)
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    model.head = types.MethodType(head, model)
    return model
