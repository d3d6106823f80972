"""qat_train on a bundled trained fixture, small: GPTQ start, distillation, exact resume, the PTQ exporters on its
output, bad input refused with a clear error (library and CLI)."""

import json

import pytest
import torch

import gemmaquant
from gemmaquant.fixtures import documents
from gemmaquant.formats import get_format
from gemmaquant.qat import QATError, qat_train
from gemmaquant.quantized import QuantizedSource

SMALL = dict(batch_size=2, seq_len=64, calib_samples=4, calib_seq_len=64, eval_seqs=2, eval_seq_len=64, save_every=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n<eos>\n".join(documents("train")[:40]) + "\n")
    return path


def packed_of(work):
    src = QuantizedSource(work)
    return {n: src.get(n) for n in src.names()}


def test_qat_train_writes_exports_and_report(tmp_path, data):
    rep = qat_train("tiny-moe", bits=4, data=data, steps=3, out=tmp_path, progress=False, **SMALL)
    assert rep["steps"] == 3 and len(rep["log"]) == 3 and rep["ptq"]["kl_mean"] > 0
    kls = [x["kl"] for x in rep["log"]]  # fewer steps than the window: both means are over the whole log
    assert rep["kl_head"] == rep["kl_tail"] == pytest.approx(sum(kls) / 3, abs=1e-6) and "(mean of" in rep["text"]
    assert json.loads((tmp_path / "qat-report.json").read_text())["qat"]["top1"] == rep["qat"]["top1"]
    assert "QAT removes" in (tmp_path / "qat-report.md").read_text()  # and the same sections, with plots, in html
    assert "id='plot-training'" in (tmp_path / "qat-report.html").read_text()
    gap = rep["gap_removed"]  # the share of GPTQ's KL removed, with its bootstrap interval over the 2 windows
    assert gap["share"] == pytest.approx(1 - rep["qat"]["kl_mean"] / rep["ptq"]["kl_mean"], rel=1e-9)
    assert gap["windows"] == 2 and gap["ci95"][0] <= gap["share"] <= gap["ci95"][1] and "95% CI" in rep["text"]
    for k in ("ptq", "qat"):  # MoE: the routing flips of both models, and the KL they carry
        rt = rep[k]["routing"]
        assert len(rt["flips"]) == 4 and 0 < rt["kl_ref_routing"] < rep[k]["kl_mean"]
    assert rep["text"].count("of the KL is routing") == 2
    values = packed_of(rep["files"]["quantized"])
    fmt = get_format("int4_g32_sym")
    q = values["layers.1.self_attn.q_proj.weight"]
    assert q.fmt == fmt and all(p.fmt == fmt for p in values["layers.1.experts.gate_up_proj"])
    # the GGUF (Q4_0) and compressed-tensors (W4A16) exports hold exactly the trained grid values
    w_hat = fmt.dequantize(q)
    for f in (rep["files"]["gguf"], rep["files"]["safetensors"]):
        m = gemmaquant.load(f)
        assert torch.equal(m.layers[1].self_attn.q_proj.weight, w_hat), f
        e = values["layers.2.experts.down_proj"]
        assert torch.equal(m.layers[2].experts.down_proj[5], fmt.dequantize(e[5])), f
    # and the trained model runs packed (gemmaquant.runtime), with the logits of its dequantized weights
    from gemmaquant import ops
    from gemmaquant.model.gemma4 import Gemma4
    from gemmaquant.runtime import load_quantized

    run = load_quantized(rep["files"]["quantized"], dtype=torch.float32)
    ref = Gemma4(run.config)
    ref.load_state_dict(QuantizedSource(rep["files"]["quantized"]).dequantized_state(), strict=False)
    ids = torch.randint(3, run.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ops.use("reference"):
        want, got = ref(ids), run(ids)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("average", [0.0, 0.5])
def test_resume_gives_the_uninterrupted_result(tmp_path, data, average):
    kw = dict(bits=2, data=data, steps=12, progress=False, export=False, average=average, **SMALL)
    whole = qat_train("tiny-moe", out=tmp_path / "whole", **kw)
    stopped = qat_train("tiny-moe", out=tmp_path / "cut", stop_after_step=6, **kw)  # saved after step 7 of 12
    assert stopped["stopped_at_step"] == 7
    resumed = qat_train("tiny-moe", out=tmp_path / "cut", **kw)
    assert [x["loss"] for x in resumed["log"]] == [x["loss"] for x in whole["log"]]
    timeless = (lambda sel: {k: v for k, v in sel.items() if k != "seconds"})  # (evaluation time differs)
    assert timeless(resumed["selection"]) == timeless(whole["selection"])  # the evaluations and the best survive
    a, b = packed_of(whole["files"]["quantized"]), packed_of(resumed["files"]["quantized"])
    for name, va in a.items():
        vb = b[name]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), name
            continue
        for pa, pb in zip(va if isinstance(va, list) else [va], vb if isinstance(vb, list) else [vb]):
            assert all(torch.equal(pa.data[k], pb.data[k]) for k in pa.data), name


def test_micro_batches_accumulate_the_whole_batch_gradient():
    """Gradient accumulation: the same step in micro-batches of 1 and 3 windows gives the whole batch's loss and
    gradients (the logits and router terms are means over tokens; the hidden-state term, whose normaliser is per
    micro-batch, is off here). The KL is computed in fp32 (distill_loss), hence fp32 tolerances on a float64 model."""
    from gemmaquant.qat.distill import Taps, accumulate_gradients
    from gemmaquant.qat.train import QATRecipe

    teacher = gemmaquant.load("tiny-moe", dtype=torch.float64).eval()
    student = gemmaquant.load("tiny-moe", dtype=torch.float64)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    ids = torch.randint(3, teacher.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    s_taps, t_taps = Taps(student, False, True), Taps(teacher, False, True)
    results = []
    for micro in (None, 1, 3):
        r = QATRecipe(batch_size=4, micro_batch=micro, hidden_weight=0.0)
        student.zero_grad(set_to_none=True)
        loss, parts = accumulate_gradients(student, teacher, ids, s_taps, t_taps, r)
        results.append((loss, parts, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (loss, parts, grads), rest = results[0], results[1:]
    assert parts["router"] > 0 and parts["kl"] > 0
    for loss_m, parts_m, grads_m in rest:
        assert loss_m == pytest.approx(loss, rel=1e-6) and parts_m["kl"] == pytest.approx(parts["kl"], rel=1e-6)
        for n, g in grads.items():
            torch.testing.assert_close(grads_m[n], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=n)
    with pytest.raises(QATError, match="micro_batch"):
        QATRecipe(batch_size=4, micro_batch=5)


def test_an_moe_model_defaults_to_batch_32_and_attention_at_a_quarter_of_the_rates(tmp_path, data):
    """batch_size=None and attention_lr_scale=None (the recipe's defaults) resolve per model (for_model): each
    expert learns only from the tokens routed to it, so an MoE model gets four times the batch, and its attention
    matrices train at 0.25x the rates (docs/qat.md); a dense model keeps batch 8 and 1x. The report records what
    ran."""
    from gemmaquant.qat.train import QATRecipe, default_attention_lr_scale, default_batch_size, for_model
    from gemmaquant.workflow import model_config

    assert QATRecipe().batch_size is None and QATRecipe().attention_lr_scale is None
    assert default_batch_size(model_config("tiny-moe")) == 32 and default_attention_lr_scale(model_config("tiny-moe")) == 0.25
    for dense in ("tiny-dense", "tiny-edge"):
        assert default_batch_size(model_config(dense)) == 8 and default_attention_lr_scale(model_config(dense)) == 1.0
    resolved = for_model(QATRecipe(batch_size=4, attention_lr_scale=2.0), model_config("tiny-moe"))
    assert (resolved.batch_size, resolved.attention_lr_scale) == (4, 2.0)  # what the recipe says wins
    small = {k: v for k, v in SMALL.items() if k != "batch_size"} | {"eval_seqs": 0}
    rep = qat_train("tiny-moe", data=data, steps=1, out=tmp_path / "a", export=False, progress=False, **small)
    assert rep["recipe"]["batch_size"] == 32 and rep["recipe"]["attention_lr_scale"] == 0.25
    with pytest.raises(QATError, match=r"micro_batch must be in 1\.\.batch_size \(32\)"):
        qat_train("tiny-moe", data=data, steps=1, out=tmp_path / "b", micro_batch=33, progress=False, **small)


def test_expert_lr_scale_sets_the_expert_rates_only():
    """param_groups: expert_lr_scale multiplies the fused experts' latent-weight and scale rates, nothing else."""
    from gemmaquant.qat import prepare_qat
    from gemmaquant.qat.train import QATRecipe, param_groups

    model = gemmaquant.load("tiny-moe", dtype=torch.float32)
    prepare_qat(model, "int4_g32_sym", learnable_scales=True)
    base, scaled = (param_groups(model, QATRecipe(expert_lr_scale=k)) for k in (1.0, 3.0))
    assert [g["name"] for g in base] == [g["name"] for g in scaled]
    experts = [g["name"] for g in base if ".experts." in g["name"]]
    assert len(experts) == 2 * 2 * model.config.num_hidden_layers  # gate_up and down, latent and scales, per layer
    for b, s in zip(base, scaled):
        assert s["lr"] == pytest.approx(b["lr"] * (3.0 if b["name"] in experts else 1.0), rel=1e-12), b["name"]
    with pytest.raises(QATError, match="expert_lr_scale"):
        QATRecipe(expert_lr_scale=-1.0)


def test_attention_lr_scale_sets_the_attention_rates_only():
    """param_groups: attention_lr_scale multiplies the q/k/v/o projections' latent-weight and scale rates (the
    named groups of every layer's self_attn), nothing else; a recipe that does not say (None) gets the model's
    default, as in qat_train: 0.25 on this MoE model."""
    from gemmaquant.qat import prepare_qat
    from gemmaquant.qat.train import QATRecipe, param_groups

    model = gemmaquant.load("tiny-moe", dtype=torch.float32)
    prepare_qat(model, "int4_g32_sym", learnable_scales=True)
    base, scaled, unresolved = (param_groups(model, QATRecipe(attention_lr_scale=k)) for k in (1.0, 0.25, None))
    assert [g["name"] for g in base] == [g["name"] for g in scaled]
    attention = [g["name"] for g in base if ".self_attn." in g["name"]]
    projections = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    assert len(attention) == 2 * len(projections) >= 2 * 3 * model.config.num_hidden_layers  # latent and scales
    for b, s, u in zip(base, scaled, unresolved):
        assert s["lr"] == pytest.approx(b["lr"] * (0.25 if b["name"] in attention else 1.0), rel=1e-12), b["name"]
        assert u["lr"] == s["lr"]
    with pytest.raises(QATError, match="attention_lr_scale"):
        QATRecipe(attention_lr_scale=-1.0)


@pytest.mark.parametrize("fmt_name", ["int4_g32_sym", "int2_g32_asym", "q4_1", "q4_k", "q6_k"])
def test_every_block_parameter_moves_the_grid_at_the_scale_rate(fmt_name):
    """param_groups: one step of lr on any block parameter (a scale, a min, a K-quant super-block scale d or,
    with learnable_ints, a 6-bit sub-scale) moves its weight's grid by scale_lr grid steps on average, whatever
    the format: a Q4_K d, which multiplies sub-scales of about 50, gets a rate 50 times smaller in its units."""
    from gemmaquant.model.testing import random_model
    from gemmaquant.qat import fake_quantizers, prepare_qat
    from gemmaquant.qat.train import QATRecipe, param_groups
    from tests.qat.test_prepare import KQUANT_MOE

    model = random_model(KQUANT_MOE)
    prepare_qat(model, fmt_name, learnable_scales=True, learnable_ints=True)
    r = QATRecipe(scale_lr=1e-3, expert_lr_scale=1.0, attention_lr_scale=1.0)  # the common rate on every matrix
    lr = {g["name"]: g["lr"] for g in param_groups(model, r)}
    checked = 0
    for _, _, fq in fake_quantizers(model):
        params = {k: v.detach().float() for k, v in fq.block_params().items()}
        scale, offset, _, _ = fq.fmt.grid(params)
        step = float(scale.abs().mean())
        for k, p in fq.named_parameters(recurse=False):
            s2, o2, _, _ = fq.fmt.grid({**params, k: params[k] + lr[f"{fq.name}:{k}"]})
            moved = (s2 - scale).abs().mean() if not torch.equal(s2, scale) else (o2 - offset).abs().mean()
            assert float(moved) / step == pytest.approx(r.scale_lr, rel=1e-3), (fq.name, k)
            checked += 1
    assert checked >= len(fake_quantizers(model)) * (3 if fmt_name == "q4_k" else 1)


def test_weight_average_is_the_ema_of_the_trained_values():
    from gemmaquant.qat.state import WeightAverage

    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    avg = WeightAverage(model, decay=0.75)
    w0 = model.weight.detach().clone()
    want = w0.clone()
    for k in range(3):
        with torch.no_grad():
            model.weight.add_(float(k + 1))
        avg.update()
        want = 0.75 * want + 0.25 * model.weight.detach()
    assert set(avg.avg) == {"weight"}  # only what trains
    avg.apply()
    assert torch.allclose(model.weight, want) and not torch.equal(model.weight, w0 + 6)


def test_average_spans_at_most_the_last_fifth_of_the_run():
    from gemmaquant.qat.train import QATRecipe, average_decay

    assert average_decay(QATRecipe(steps=500)) == 0.99 and average_decay(QATRecipe(steps=5000)) == 0.99
    assert average_decay(QATRecipe(steps=100)) == 0.95 and average_decay(QATRecipe(steps=3)) == 0.0
    assert average_decay(QATRecipe(steps=100, average=0.0)) == 0.0


def test_qat_on_a_gguf_grid_exports_that_gguf_type_exactly(tmp_path, data):
    rep = qat_train("tiny-moe", bits=4, data=data, steps=2, out=tmp_path, progress=False, weight_format="q4_0",
                    **SMALL)
    assert "safetensors" not in rep["files"]  # Q4_0's fp16 scales and code -8 are not W4A16's grid
    values = packed_of(rep["files"]["quantized"])
    q = values["layers.1.self_attn.q_proj.weight"]
    assert q.fmt == get_format("q4_0") and rep["files"]["gguf"].endswith("-Q4_0.gguf")
    m = gemmaquant.load(rep["files"]["gguf"])
    assert torch.equal(m.layers[1].self_attn.q_proj.weight, q.fmt.dequantize(q))
    e = values["layers.2.experts.gate_up_proj"]
    assert torch.equal(m.layers[2].experts.gate_up_proj[3], e[3].fmt.dequantize(e[3]))


def test_qat_on_a_gguf_mix_trains_each_tensor_on_its_block_type_and_exports_it_exactly(tmp_path, data):
    """--gguf-type Q4_K_M: every weight on the type llama-quantize's mix gives it (on tiny-moe's 160/128-wide rows
    mostly the 32-block fallbacks, K-quants where a row is a multiple of 256), and the GGUF holds exactly that."""
    rep = qat_train("tiny-moe", data=data, steps=2, out=tmp_path, progress=False, gguf_type="q4_k_m", **SMALL)
    assert rep["format"] == "Q4_K_M" and rep["files"]["gguf"].endswith("-Q4_K_M.gguf")
    assert "safetensors" not in rep["files"]
    values = packed_of(rep["files"]["quantized"])
    types = {(v[0] if isinstance(v, list) else v).fmt.name for v in values.values() if isinstance(v, list) or
             hasattr(v, "fmt")}
    assert {"q4_k", "q5_0", "q8_0"} <= types  # a mix, not one format
    m = dict(gemmaquant.load(rep["files"]["gguf"]).named_parameters())
    for name, v in values.items():
        if isinstance(v, list):
            want = torch.stack([p.fmt.dequantize(p) for p in v])
        elif hasattr(v, "fmt"):
            want = v.fmt.dequantize(v)
        else:
            continue
        assert torch.equal(m[name], want.reshape(m[name].shape)), name
    with pytest.raises(QATError, match="not both"):
        qat_train("tiny-moe", data=data, steps=2, out=tmp_path / "x", weight_format="q4_0", gguf_type="Q4_K_M")
    with pytest.raises(QATError, match="gguf_type = 'q9_x': must be a GGUF type or mix"):
        qat_train("tiny-moe", data=data, steps=2, out=tmp_path / "y", gguf_type="q9_x")
    assert not (tmp_path / "y").exists()  # refused before any work


def test_embeddings_trained_on_the_gguf_token_embd_grid_are_stored_exactly(tmp_path, data):
    """embedding_type="Q5_0": both embedding tables of tiny-edge train on Q5_0's grid, the GGUF stores them as
    Q5_0, and what it stores is the trained value (a fixed point of Q5_0's rounding, equal to the bf16 export)."""
    import gguf

    rep = qat_train("tiny-edge", data=data, steps=2, out=tmp_path, progress=False, embedding_type="q5_0", **SMALL)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(rep["files"]["gguf"]).tensors}
    assert types["token_embd.weight"] == types["per_layer_token_embd.weight"] == "Q5_0"
    fmt = get_format("q5_0")
    model = gemmaquant.load(rep["files"]["gguf"])
    stored = gemmaquant.load(rep["files"]["safetensors"])
    for name in ("embed_tokens", "embed_tokens_per_layer"):
        e = getattr(model, name).weight.detach().float()
        assert torch.equal(fmt.dequantize(fmt.quantize(e)).float(), e), name
        assert torch.equal(getattr(stored, name).weight.detach().float(), e.bfloat16().float()), name
    # the GPTQ baseline of the report has its tables rounded the same way (Q5_0 costs it some KL)
    from gemmaquant.eval.metrics import compare_logits, heldout_ids
    from gemmaquant.fixtures import fixture_path
    from gemmaquant.qat.source import dequantized_model
    from gemmaquant.qat.train import default_heldout

    ids = heldout_ids(fixture_path("tiny-edge"), default_heldout(), SMALL["eval_seqs"], SMALL["eval_seq_len"])
    unrounded = compare_logits(gemmaquant.load("tiny-edge", dtype=torch.float32),
                               dequantized_model(QuantizedSource(rep["work_dir"])), ids)["kl_mean"]
    assert rep["ptq"]["kl_mean"] > unrounded
    with pytest.raises(QATError, match="multiple of 256"):  # Q4_K's 256-blocks on 160-wide rows
        qat_train("tiny-edge", data=data, steps=2, out=tmp_path / "x", progress=False, embedding_type="Q4_K",
                  **SMALL)


def test_per_layer_table_trains_on_the_rows_of_the_training_text_as_the_whole_table_would(tmp_path, data,
                                                                                           monkeypatch):
    """tiny-edge: the per-layer table trained as SparseRowsEmbedding (the default) gives the training of the whole
    table: the same logged losses and the same stored trained rows, bit for bit, and the rows of tokens the text
    lacks stay the float model's. Its checkpoint holds the used rows only, and resume is exact."""
    from safetensors import safe_open

    import gemmaquant.qat.train as train
    from gemmaquant.qat.train import CHECKPOINT, token_stream
    from gemmaquant.fixtures import fixture_path

    kw = dict(bits=4, data=data, steps=6, progress=False, export=False, **SMALL)
    sparse = qat_train("tiny-edge", out=tmp_path / "sparse", **kw)
    assert qat_train("tiny-edge", out=tmp_path / "cut", stop_after_step=2, **kw)["stopped_at_step"] == 3
    with safe_open(str(next((tmp_path / "cut").rglob(CHECKPOINT))), framework="pt") as f:
        rows = f.get_tensor("model::embed_tokens_per_layer.rows")
        assert not any(k.endswith("embed_tokens_per_layer.weight") or k.endswith(".table") for k in f.keys())
    from gemmaquant.qat.heldout import split_heldout
    from gemmaquant.qat.train import QATRecipe

    held_back = split_heldout(token_stream(fixture_path("tiny-edge"), data), QATRecipe(batch_size=2, seq_len=64), None)
    used = torch.unique(held_back[0])  # the rows of the text that trains (the held-out tail does not)
    assert rows.shape[0] == used.numel() < 4096
    resumed = qat_train("tiny-edge", out=tmp_path / "cut", **kw)
    assert [x["loss"] for x in resumed["log"]] == [x["loss"] for x in sparse["log"]]

    monkeypatch.setattr(train, "train_used_rows", lambda *a: None)  # the whole table as one trained parameter,
    monkeypatch.setattr(train, "shared_tables", lambda teacher: [])  # the student's own copy
    dense = qat_train("tiny-edge", out=tmp_path / "dense", **kw)
    assert [x["loss"] for x in sparse["log"]] == [x["loss"] for x in dense["log"]]
    a = packed_of(sparse["files"]["quantized"])["embed_tokens_per_layer.weight"].float()
    b = packed_of(dense["files"]["quantized"])["embed_tokens_per_layer.weight"].float()
    float_table = gemmaquant.load("tiny-edge", dtype=torch.float32).embed_tokens_per_layer.weight
    unused = torch.ones(a.shape[0], dtype=torch.bool)
    unused[used] = False
    assert torch.equal(a[unused], b[unused]) and torch.equal(a[unused], float_table[unused])
    assert not torch.equal(a[used], float_table[used])  # the used rows trained ...
    assert torch.equal(a[used], b[used])  # ... as in the whole table


@pytest.mark.parametrize("per_layer_embed_lr", [None, 0.0])
def test_the_student_shares_the_teachers_per_layer_table(per_layer_embed_lr):
    import copy

    from gemmaquant.qat.sparse_rows import SparseRowsEmbedding
    from gemmaquant.qat.train import QATRecipe, shared_tables, train_used_rows

    teacher = gemmaquant.load("tiny-edge", dtype=torch.float32)
    shared = shared_tables(teacher)
    student = copy.deepcopy(teacher, memo={id(t): t for t in shared})
    train_used_rows(student, torch.tensor([5, 9, 5, 700]), QATRecipe(per_layer_embed_lr=per_layer_embed_lr))
    ple = student.embed_tokens_per_layer
    table = ple.table if per_layer_embed_lr is None else ple.weight
    assert table.data_ptr() == teacher.embed_tokens_per_layer.weight.data_ptr()  # the same memory, no copy
    assert student.embed_tokens.weight.data_ptr() != teacher.embed_tokens.weight.data_ptr()
    assert isinstance(ple, SparseRowsEmbedding) == (per_layer_embed_lr is None)
    if per_layer_embed_lr is None:
        assert ple.rows.shape == (3, table.shape[1]) and not any(n.endswith("table") for n in student.state_dict())


def test_frozen_per_layer_tables_are_the_teachers_not_copied_or_saved(tmp_path, data):
    """per_layer_embed_lr=0: tiny-edge's per-layer table is the teacher's own tensor. It leaves the checkpoint,
    resume still gives the uninterrupted result, the export holds the float table unchanged while the token table
    trains, and on a GGUF embedding grid the teacher keeps its float table (the report's GPTQ KL is unchanged)."""
    from safetensors import safe_open

    from gemmaquant.qat.train import CHECKPOINT

    kw = dict(bits=4, data=data, steps=6, progress=False, export=False, per_layer_embed_lr=0, **SMALL)
    whole = qat_train("tiny-edge", out=tmp_path / "whole", **kw)
    assert qat_train("tiny-edge", out=tmp_path / "cut", stop_after_step=2, **kw)["stopped_at_step"] == 3
    ckpt = next((tmp_path / "cut").rglob(CHECKPOINT))
    with safe_open(str(ckpt), framework="pt") as f:
        saved = list(f.keys())
    assert not any("embed_tokens_per_layer" in k for k in saved) and any("embed_tokens.weight" in k for k in saved)
    resumed = qat_train("tiny-edge", out=tmp_path / "cut", **kw)
    assert [x["loss"] for x in resumed["log"]] == [x["loss"] for x in whole["log"]]
    float_model = gemmaquant.load("tiny-edge", dtype=torch.float32)
    out = packed_of(resumed["files"]["quantized"])
    assert torch.equal(out["embed_tokens_per_layer.weight"].float(), float_model.embed_tokens_per_layer.weight)
    assert not torch.equal(out["embed_tokens.weight"].float(), float_model.embed_tokens.weight)

    grid = dict(kw, steps=2, embedding_type="q5_0")
    shared = qat_train("tiny-edge", out=tmp_path / "grid", **grid)
    copied = qat_train("tiny-edge", out=tmp_path / "grid-copied", **dict(grid, per_layer_embed_lr=None))
    assert shared["ptq"]["kl_mean"] == copied["ptq"]["kl_mean"]
    fmt = get_format("q5_0")
    ple = packed_of(shared["files"]["quantized"])["embed_tokens_per_layer.weight"].float()
    assert torch.equal(ple, fmt.dequantize(fmt.quantize(float_model.embed_tokens_per_layer.weight)).float())


def test_bad_input(tmp_path, data):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words of training text.\n")
    with pytest.raises(QATError, match="too short"):
        qat_train("tiny-moe", bits=4, data=short, steps=2, out=tmp_path / "a", **SMALL)
    with pytest.raises(QATError, match="bits=5"):
        qat_train("tiny-moe", bits=5, data=data, steps=2, out=tmp_path / "b", **SMALL)
    with pytest.raises(QATError, match="does not fit"):  # Q4_K needs 256-weight super-blocks; rows have 160
        qat_train("tiny-moe", bits=4, data=data, steps=2, out=tmp_path / "c", weight_format="q4_k", **SMALL)
    with pytest.raises(QATError, match="not found"):
        qat_train("tiny-moe", bits=4, data=tmp_path / "missing.txt", steps=2, out=tmp_path / "d", **SMALL)
    with pytest.raises(QATError, match="average"):
        qat_train("tiny-moe", bits=4, data=data, steps=2, out=tmp_path / "e", average=1.0, **SMALL)


def test_cli_reports_bad_data_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from gemmaquant.cli import app

    short = tmp_path / "short.txt"
    short.write_text("Too little.\n")
    res = CliRunner().invoke(app, ["qat", "tiny-moe", "--bits", "4", "--data", str(short), "--steps", "2",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "too short" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args, grid", [(["--bits", "8", "--gguf-type", "Q4_K_M"], "--gguf-type Q4_K_M"),
                                        (["--bits", "3", "--format", "q4_0"], "--format q4_0")])
def test_cli_refuses_bits_that_contradict_the_grid(tmp_path, args, grid):
    from typer.testing import CliRunner

    from gemmaquant.cli import app

    res = CliRunner().invoke(app, ["qat", "tiny-moe", "--data", str(tmp_path / "d.txt"), "--out", str(tmp_path / "o"),
                                   *args])
    assert res.exit_code == 2 and f"conflicts with {grid}" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_cli_passes_recipe_options_through(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import gemmaquant.qat
    from gemmaquant.cli import app

    seen = {}

    def fake_train(model, **kw):
        seen.update(kw, model=model)
        return {"text": "ok"}

    monkeypatch.setattr(gemmaquant.qat, "qat_train", fake_train)
    args = ["qat", "tiny-edge", "--data", str(tmp_path / "d.txt"), "--steps", "3", "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, args + ["--lr", "0", "--scale-lr", "0.01", "--batch-size", "4", "--micro-batch", "2",
                                          "--expert-lr-scale", "2", "--attention-lr-scale", "0.5",
                                          "--average", "0.99", "--gguf-type", "Q4_K_M",
                                          "--embedding-type", "Q6_K", "--fixed-ints",
                                          "--per-layer-embed-lr", "0", "--heldout", str(tmp_path / "h.txt"),
                                          "--export-last", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert seen["heldout"] == tmp_path / "h.txt" and seen["export_last"] is True and seen["seed"] == 3
    assert seen["learnable_ints"] is False and seen["per_layer_embed_lr"] == 0.0
    assert seen["lr"] == 0.0 and seen["scale_lr"] == 0.01 and seen["batch_size"] == 4 and seen["steps"] == 3
    assert seen["average"] == 0.99 and seen["gguf_type"] == "Q4_K_M"
    assert seen["embedding_type"] == "Q6_K" and seen["micro_batch"] == 2 and seen["expert_lr_scale"] == 2.0
    assert seen["attention_lr_scale"] == 0.5
    seen.clear()
    res = CliRunner().invoke(app, args + ["--format", "q4_0", "--overwrite"])  # --format and --gguf-type exclude
    assert res.exit_code == 0 and seen["weight_format"] == "q4_0", res.output  # each other: checked before training
    seen.clear()
    res = CliRunner().invoke(app, args + ["--format", "q4_0", "--gguf-type", "Q4_K_M", "--overwrite"])
    assert res.exit_code == 2 and "not both" in res.output and not seen
    res = CliRunner().invoke(app, args + ["--overwrite"])
    assert res.exit_code == 0 and "lr" not in seen and "weight_format" not in seen  # the recipe's defaults apply
    assert seen["heldout"] is None and seen["export_last"] is False and "seed" not in seen
    assert "learnable_ints" not in seen
    assert seen["bits"] == 4
    seen.clear()
    res = CliRunner().invoke(app, args + ["--overwrite", "--bits", "4", "--gguf-type", "Q4_K_M"])  # consistent
    assert res.exit_code == 0 and seen["gguf_type"] == "Q4_K_M"
