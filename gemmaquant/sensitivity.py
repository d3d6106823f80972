"""How much each tensor's quantization onto each candidate GGUF type costs: the losses `mix_search` allocates with.

Proxy (streaming, one layer at a time, the float model's activations on the calibration set, the pipeline's own
statistics from gemmaquant.capture):
    matrix W [N, K] reading inputs with Gram H = E[x x^T]:   tr(dW H dW^T), the mean squared output error per
        token, dW = W - Q(W) with Q the importance-weighted round-to-nearest onto the type (imatrix-style block
        parameters, weighted by diag(H): the starting point GPTQ refines);
    expert tensor family: the sum over experts of the same, each with its own routed tokens' H, weighted by the
        share of tokens routed to it;
    token embedding (tied): sum_t p(t) |dE_t|^2 * H_model (the input side) + tr(dE H_f dE^T) with H_f the Gram of
        the final-normed hidden state (the output head); per-layer embedding table: sum_t p(t) |dE_t|^2 * P. Both
        with plain round-to-nearest, as the exporter stores the embeddings.
Those errors live in different spaces (q_proj's output is not the residual stream), so they are put on one scale
by measurement (`kl=True`, the default): for each unit, the KL(float || model) on calibration text with that unit
alone quantized to its cheapest candidate gives the unit's weight: loss(u, t) = KL_u * err(u, t) / err(u, cheapest).
That takes one forward of the whole model per unit (the model is loaded: fixture and edge sizes). `kl=False`
(streaming, bounded memory at any size) scales the proxy by a prior measured on the trained fixtures instead: the
KL per unit of proxy of the tensor's role (attention, dense MLP, experts, embeddings, PLE) and position (first,
middle, last layer), PRIOR_WEIGHTS. The raw proxy alone does not rank tensors by their KL (Spearman -0.23 to 0.09
on the fixtures); scaled by the prior fitted on the other fixtures it reaches 0.38-0.65
(benchmarks/results/sensitivity.md).
Zero-padding (gemmaquant.padding): for the MLP kinds whose width is not a multiple of 256, every unit of that
kind also gets `padded` options: its bytes on the padded shape, and its loss with the padded matrix (gate/up: the
same rows plus zero rows, which quantize to zero: the same error; down: zero columns that meet zero activations,
the Hessian's padded rows and columns zero, and the 256-block types now possible), on the same KL scale.
The total loss of a mix is predicted as the sum of its units' losses (additivity, as HAWQ / llama.cpp's target-bpw
work assume); `Sensitivity.spearman` says how well the raw proxy alone ranks the units against the measured KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gemmaquant.mix_search import FLOAT_CANDIDATE, Unit, candidate_types

EMBEDDINGS = ("embed_tokens.weight", "embed_tokens_per_layer.weight")


@dataclass
class Sensitivity:
    units: list[Unit]
    fixed_bytes: int  # bytes of every tensor the search does not choose (norms, router, rope_freqs, kept floats)
    weights: int  # weights in the file (the bits-per-weight denominator)
    proxy: dict[str, dict[str, float]] = field(default_factory=dict)  # unit -> type -> raw proxy error
    kl: dict[str, float] = field(default_factory=dict)  # unit -> measured KL with it alone on its cheapest type
    reference_type: dict[str, str] = field(default_factory=dict)
    padded: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)  # unit -> type -> (bytes, loss)
    pad_kind: dict[str, str] = field(default_factory=dict)  # unit -> its paddable kind ("mlp", "experts")

    def variants(self) -> list[tuple[tuple[str, ...], list[Unit]]]:
        """(padded kinds, units) for every subset of the paddable kinds, the unpadded model first."""
        from gemmaquant.mix_search import padding_subsets, with_padding

        return [(k, with_padding(self.units, self.padded, self.pad_kind, k)) for k in padding_subsets(self.pad_kind)]

    def spearman(self) -> float | None:
        """Rank correlation across units between the raw proxy and the measured KL (cheapest type)."""
        names = [n for n in self.kl if self.proxy[n].get(self.reference_type[n])]
        if len(names) < 3:
            return None
        a = torch.tensor([self.proxy[n][self.reference_type[n]] for n in names], dtype=torch.float64)
        b = torch.tensor([self.kl[n] for n in names], dtype=torch.float64)
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    def to_dict(self) -> dict:
        return {"fixed_bytes": self.fixed_bytes, "weights": self.weights, "spearman_proxy_vs_kl": self.spearman(),
                "units": {u.name: {"shape": list(u.shape), "options": {t: list(v) for t, v in u.options.items()},
                                   "kl_alone": self.kl.get(u.name), "reference_type": self.reference_type.get(u.name)}
                          for u in self.units},
                "padded": {n: {"kind": self.pad_kind[n], "options": {t: list(v) for t, v in o.items()}}
                           for n, o in self.padded.items()}}


def skeleton(cfg, space=None) -> Sensitivity:
    """The searchable units of `cfg` with the bytes of every candidate (losses 0), the fixed bytes and the weight
    count: all a budget needs, from the config alone. space: another search's candidates and bytes (an object with
    `skeleton(cfg)`, e.g. gemmaquant.ct_mix.CTSpace); None: the GGUF types."""
    if space is not None:
        return space.skeleton(cfg)
    from gemmaquant.checkpoint import expected_shapes
    from gemmaquant.export.gguf_mix import gguf_mix_plan
    from gemmaquant.export.gguf_pack import tensor_nbytes
    from gemmaquant.padding import kind_of, padded_config, padded_shape, paddable

    shapes = expected_shapes(cfg)
    base = gguf_mix_plan(cfg, "Q8_0")  # the types of the tensors the search leaves alone (F32 norms, kept BF16)
    rope = cfg.global_head_dim // 2  # the generated rope_freqs tensor, F32
    fixed = 4 * rope + sum(tensor_nbytes(base[n], s) for n, s in shapes.items() if not searchable(n, s))
    weights = rope + sum(int(torch.Size(s).numel()) for s in shapes.values())
    units = [Unit(n, tuple(s), {t: (tensor_nbytes(t, tuple(s)), 0.0) for t in candidate_types(s[-1])})
             for n, s in shapes.items() if searchable(n, s)]
    sens = Sensitivity(units, fixed, weights)
    kinds = paddable(cfg)
    padded_cfg = padded_config(cfg, kinds)
    for u in units:
        if kind_of(u.name) in kinds:
            ps = padded_shape(u.name, u.shape, cfg, padded_cfg)
            sens.pad_kind[u.name] = kind_of(u.name)
            sens.padded[u.name] = {t: (tensor_nbytes(t, ps), 0.0) for t in candidate_types(ps[-1])}
    return sens


def cheapest(u: Unit) -> str:
    """The candidate with the fewest bytes (the first registered one among equals: Q4_0 before Q4_K)."""
    return min(u.options, key=lambda t: u.options[t][0])


def searchable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the search chooses this tensor's type: every quantized matrix and the embedding tables (llama.cpp
    keeps per_layer_model_projection float, and so does gemmaquant; norms, routers, scalars stay F32)."""
    from gemmaquant.plan import float_reason

    return len(shape) >= 2 and (float_reason(name) is None or name in EMBEDDINGS)


def _dequant(w: torch.Tensor, type_name: str, importance: torch.Tensor | None) -> torch.Tensor:
    from gemmaquant.algorithms import rtn
    from gemmaquant.formats import get_format

    if type_name == FLOAT_CANDIDATE:
        return w.to(torch.float16).float()
    if type_name == "bf16":  # the compressed-tensors search's unquantized choice (gemmaquant.ct_mix)
        return w.to(torch.bfloat16).float()
    fmt = get_format(type_name)
    return fmt.dequantize(rtn(w, fmt, importance=importance)).float()


def _matrix_err(w: torch.Tensor, H: torch.Tensor, type_name: str) -> tuple[float, torch.Tensor]:
    """(tr(dW H dW^T), the dequantized matrix) for importance-weighted RTN onto `type_name`."""
    imp = torch.diagonal(H).float().clamp_min(0)
    q = _dequant(w.float(), type_name, imp)
    d = (w.double() - q.double())
    return float(((d @ H.double()) * d).sum()), q


@torch.no_grad()
def measure(model, recipe, *, calib: str | None = None, tokenizer_dir=None, kl: bool = True,
            kl_sequences: int = 8, progress: bool | None = None, space=None) -> Sensitivity:
    """The options (bytes, loss) of every searchable tensor of `model` (alias, directory or model object) on the
    recipe's calibration data; `space` as in `skeleton` (None: the GGUF types). Nothing the caller passed is
    modified."""
    from gemmaquant.calibration import calibration_tokens
    from gemmaquant.capture import LayerStats, capture, force_route_rare_experts, group_of
    from gemmaquant.model.gemma4 import Gemma4, rope_inv_freqs
    from gemmaquant.padding import padded_config, padded_shape, paddable
    from gemmaquant.progress import progress as progress_lines, stage
    from gemmaquant.quantize import Activations, QuantizeError, build_layer, open_source, run_layer

    src = open_source(model, tokenizer_dir)
    cfg = src.config
    tok_dir = getattr(src, "path", None)
    if tok_dir is None:
        raise QuantizeError("no tokenizer: pass tokenizer_dir= (the directory with tokenizer.json)")
    ids, _ = calibration_tokens(tok_dir, calib or recipe.calibration, recipe.n_samples, recipe.seq_len,
                                cfg.bos_token_id)
    sens = skeleton(cfg, space)
    units = {u.name: u for u in sens.units}
    proxy: dict[str, dict[str, float]] = {}
    refs: dict[str, torch.Tensor] = {}  # unit -> its weights on the cheapest candidate (for the KL measurement)
    padded_proxy: dict[str, dict[str, float]] = {}  # unit -> type -> raw proxy error of the padded matrix
    padded_cfg = padded_config(cfg, paddable(cfg))
    pad_to = {n: padded_shape(n, shapes[n], cfg, padded_cfg)[-1] for n in sens.padded}  # down: the padded width

    globals_ = {k: v.float() for k, v in src.global_state().items()}
    with torch.device("meta"):
        shell = Gemma4(cfg)
    shell.load_state_dict(globals_, strict=False, assign=True)
    batches = ids.split(recipe.batch_size)
    embedded = [shell.embed(b) for b in batches]
    acts = Activations(h=[e[0] for e in embedded], ple=[e[1] for e in embedded])
    del embedded
    inv_freqs = rope_inv_freqs(cfg)
    stage("measuring each tensor's sensitivity to each candidate type", progress)
    for i in progress_lines(range(cfg.num_hidden_layers), desc="sensitivity", unit="layer",
                            total=cfg.num_hidden_layers, enabled=progress):
        layer = build_layer(cfg, i, src.layer_state(i))
        stats = LayerStats()
        with capture(layer, stats, max_samples=0):
            acts.h = run_layer(layer, cfg, i, acts, inv_freqs)
        force_route_rare_experts(layer, stats, recipe.moe_min_tokens, max_samples=0)
        params = dict(layer.named_parameters())
        for rel, w in params.items():
            name = f"layers.{i}.{rel}"
            if name not in units:
                continue
            w = w.detach()
            proxy[name] = {}
            cands = list(units[name].options)  # the skeleton's candidates for this tensor
            if rel.startswith("experts."):
                kind = "expert_in" if rel.endswith("gate_up_proj") else "expert_down_in"
                share = stats.expert_tokens.double() / max(int(stats.expert_tokens.sum()), 1)
                for t in cands:
                    err, qs = 0.0, []
                    for e in range(w.shape[0]):
                        ee, q = _matrix_err(w[e], _expert_h(stats, kind, e, w.shape[-1]), t)
                        err += float(share[e]) * ee
                        qs.append(q)
                    proxy[name][t] = err
                    if t == cheapest(units[name]):
                        refs[name] = torch.stack(qs)
                if name in sens.padded:
                    padded_proxy[name] = _padded_errors(name, pad_to[name], proxy[name], sens.padded[name], w, [
                        (float(share[e]), _expert_h(stats, kind, e, w.shape[-1])) for e in range(w.shape[0])])
            else:
                H = stats.inputs[group_of(rel)].hessian
                for t in cands:
                    proxy[name][t], q = _matrix_err(w, H, t)
                    if t == cheapest(units[name]):
                        refs[name] = q
                if name in sens.padded:
                    padded_proxy[name] = _padded_errors(name, pad_to[name], proxy[name], sens.padded[name], w[None],
                                                        [(1.0, H)])
        del layer, stats
    # the embeddings: token frequencies of the calibration set, and the final-normed hidden state's Gram
    freq = torch.zeros(cfg.vocab_size, dtype=torch.float64)
    freq.index_add_(0, ids.flatten(), torch.ones(ids.numel(), dtype=torch.float64))
    freq /= freq.sum()
    hf = torch.cat([shell.norm(h).reshape(-1, cfg.hidden_size) for h in acts.h]).double()
    Hf = hf.T @ hf / hf.shape[0]
    for name in (n for n in EMBEDDINGS if n in units):
        w = globals_[name]
        f = torch.zeros(w.shape[0], dtype=torch.float64)  # a PLE table as long as the vocabulary or shorter
        n = min(w.shape[0], cfg.vocab_size)
        f[:n] = freq[:n]
        scale = cfg.hidden_size if name == "embed_tokens.weight" else cfg.hidden_size_per_layer_input
        proxy[name] = {}
        for t in units[name].options:
            q = _dequant(w, t, None)
            d = (w.double() - q.double())
            err = float((f * d.pow(2).sum(1)).sum()) * scale
            if name == "embed_tokens.weight" and cfg.tie_word_embeddings:
                err += float(((d @ Hf) * d).sum())
            proxy[name][t] = err
            if t == cheapest(units[name]):
                refs[name] = q
    for name, u in units.items():
        u.options = {t: (b, proxy[name][t]) for t, (b, _) in u.options.items()}
    sens.proxy = proxy
    sens.reference_type = {n: cheapest(u) for n, u in units.items()}
    float_candidate = getattr(space, "float_candidate", FLOAT_CANDIDATE)  # lossless by definition
    if kl:
        stage(f"measuring the KL of each of {len(units)} tensors quantized alone", progress)
        sens.kl = _kl_alone(model, src, cfg, ids[:kl_sequences], refs, progress)
        for name, u in units.items():
            ref_err = proxy[name][sens.reference_type[name]]
            w = sens.kl[name] / ref_err if ref_err > 0 else 0.0
            u.options = {t: (b, 0.0 if t == float_candidate else w * err) for t, (b, err) in u.options.items()}
            _scale_padded(sens, name, padded_proxy, w)
    else:  # the measured prior: the KL per unit of proxy of the tensor's role and position on the fixtures
        for name, u in units.items():
            w = prior_weight(name, cfg.num_hidden_layers)
            u.options = {t: (b, 0.0 if t == float_candidate else w * err) for t, (b, err) in u.options.items()}
            _scale_padded(sens, name, padded_proxy, w)
    return sens


def _scale_padded(sens: Sensitivity, name: str, padded_proxy: dict[str, dict[str, float]], w: float) -> None:
    """The padded options of `name` on the unit's loss scale (the padded matrix computes the same function)."""
    if name in sens.padded:
        sens.padded[name] = {t: (b, 0.0 if t == FLOAT_CANDIDATE else w * padded_proxy[name][t])
                             for t, (b, _) in sens.padded[name].items()}


def _expert_h(stats, kind: str, e: int, k: int) -> torch.Tensor:
    """Expert e's input Gram for `kind` (identity when no token reached it)."""
    st = stats.inputs.get(f"{kind}.{e}")
    return st.hessian if st is not None and st.n else torch.eye(k)


def _padded_errors(name: str, k2: int, unpadded: dict[str, float], options: dict, w: torch.Tensor,
                   weighted_h: list[tuple[float, torch.Tensor]]) -> dict[str, float]:
    """type -> proxy error of the padded matrix. gate/up (rows of the hidden width: the same row length): the padded
    rows are zero and quantize to zero, so the error is the unpadded one. down ([..., H, I] -> [..., H, I']): the
    matrices padded with zero columns, each H with zero rows and columns (the padded inputs are always zero)."""
    if not name.endswith(("down_proj", "down_proj.weight")):
        return {t: unpadded[t] for t in options}
    k = w.shape[-1]
    wp = torch.nn.functional.pad(w, (0, k2 - k))
    out = {}
    for t in options:
        err = 0.0
        for e, (share, H) in enumerate(weighted_h):
            Hp = torch.nn.functional.pad(H, (0, k2 - k, 0, k2 - k))
            err += share * _matrix_err(wp[e], Hp, t)[0]
        out[t] = err
    return out


def role(name: str) -> str:
    """What a searchable tensor does in Gemma 4 (the groups of docs/quality.md's sensitivity table)."""
    if name == "embed_tokens.weight":
        return "token embedding"
    if name == "embed_tokens_per_layer.weight":
        return "per-layer embedding table"
    if ".experts." in name:
        return "experts"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense MLP"
    return "PLE gate / projection"


def position(name: str, n_layers: int) -> str:
    if not name.startswith("layers."):
        return "global"
    i = int(name.split(".")[1])
    return "first" if i == 0 else "last" if i == n_layers - 1 else "middle"


def prior_weight(name: str, n_layers: int) -> float:
    """KL per unit of Hessian proxy for a tensor of this role and position: the geometric mean of KL_u / proxy_u
    over the trained fixtures' tensors (benchmarks/bench_sensitivity.py, benchmarks/results/sensitivity.json);
    used instead of the per-tensor KL where the model is too large to measure it (`kl=False`)."""
    return PRIOR_WEIGHTS.get((role(name), position(name, n_layers)), PRIOR_WEIGHTS.get((role(name), "any"), 1.0))


PRIOR_WEIGHTS: dict[tuple[str, str], float] = {  # benchmarks/results/sensitivity.md, 3 trained fixtures
    ("PLE gate / projection", "any"): 0.000105, ("PLE gate / projection", "first"): 0.000303,
    ("PLE gate / projection", "last"): 9.4e-05, ("PLE gate / projection", "middle"): 8.24e-05,
    ("attention", "any"): 0.000311, ("attention", "first"): 0.00236, ("attention", "last"): 5.12e-05,
    ("attention", "middle"): 0.000238, ("dense MLP", "any"): 3.95e-05, ("dense MLP", "first"): 0.000118,
    ("dense MLP", "last"): 2.3e-05, ("dense MLP", "middle"): 3.35e-05, ("experts", "any"): 0.000268,
    ("experts", "first"): 0.000946, ("experts", "last"): 7.8e-05, ("experts", "middle"): 0.000265,
    ("per-layer embedding table", "any"): 0.0117, ("per-layer embedding table", "global"): 0.0117,
    ("token embedding", "any"): 0.000122, ("token embedding", "global"): 0.000122,
}


@torch.no_grad()
def _kl_alone(model, src, cfg, ids: torch.Tensor, refs: dict[str, torch.Tensor], progress) -> dict[str, float]:
    """unit -> mean KL(float || float model with that unit replaced by `refs[unit]`) over the tokens of `ids`."""
    from gemmaquant.model.gemma4 import Gemma4
    from gemmaquant.progress import progress as progress_lines

    m = Gemma4(cfg)  # our own copy of the weights: the caller's model stays as it is
    state = dict(src.global_state())
    for i in range(cfg.num_hidden_layers):
        state.update({f"layers.{i}.{k}": v for k, v in src.layer_state(i).items()})
    m.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    m.eval()
    ref = torch.log_softmax(m(ids).double(), -1)
    out = {}
    for name in progress_lines(list(refs), desc="kl", unit="tensor", total=len(refs),
                                 enabled=progress):
        p = m.get_parameter(name)
        keep = p.detach().clone()
        p.copy_(refs[name].to(p.dtype))
        logq = torch.log_softmax(m(ids).double(), -1)
        out[name] = float((ref.exp() * (ref - logq)).sum(-1).mean())
        p.copy_(keep)
    return out
