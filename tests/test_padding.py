"""Zero-padding an MLP width to the 256-block (gemmaquant.padding): the same function, the solver takes it only
where it pays, and the files hold what the dry run says. The llama.cpp side: tests/export/test_padding_llamacpp.py."""

import json

import pytest
import torch

from gemmaquant.config import TINY_VARIANTS, VARIANTS
from gemmaquant.mix_search import TargetError, Unit, solve, solve_padded, total
from gemmaquant.padding import PaddedSource, PaddingError, check_kinds, padded_config, paddable


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_widths_and_kinds():
    assert paddable(VARIANTS["26b-a4b"]) == ("mlp", "experts")
    assert paddable(VARIANTS["31b"]) == () and paddable(VARIANTS["e4b"]) == ()
    p = padded_config(VARIANTS["26b-a4b"], ("experts", "mlp"))
    assert (p.intermediate_size, p.moe_intermediate_size) == (2304, 768)
    assert VARIANTS["26b-a4b"].moe_intermediate_size == 704  # the caller's config is not changed
    with pytest.raises(PaddingError, match="--pad-to-block: unknown MLP kind 'attn'"):
        check_kinds(["attn"], source="--pad-to-block")
    with pytest.raises(PaddingError, match="no experts MLP to pad"):
        check_kinds(["experts"], VARIANTS["31b"])


def test_padded_model_computes_the_same_function():
    """Random weights with odd widths (dense 96, experts 64): the padded model's logits equal the original's, and
    the source's tensors are untouched."""
    from gemmaquant.model.gemma4 import Gemma4
    from gemmaquant.model.testing import random_model
    from gemmaquant.quantize import ModuleSource

    cfg = TINY_VARIANTS["tiny-26b-a4b"]
    assert paddable(cfg) == ("mlp", "experts")
    model = random_model(cfg, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src = PaddedSource(ModuleSource(model), ("mlp", "experts"))
    padded = Gemma4(src.config).eval()
    state = dict(src.global_state())
    for i in range(cfg.num_hidden_layers):
        state.update({f"layers.{i}.{k}": v for k, v in src.layer_state(i).items()})
    padded.load_state_dict(state, strict=True)
    assert padded.layers[0].experts.down_proj.shape[-1] == 256
    assert torch.equal(src.get("layers.1.mlp.up_proj.weight")[96:], torch.zeros(160, cfg.hidden_size))
    ids = torch.randint(5, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids), padded(ids)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max().item()), (a - b).abs().max()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_padded_down_error_on_32_blocks_equals_the_unpadded_one():
    """On Q8_0 (absmax per 32-block) the padded columns are whole zero blocks: the padded matrix's error is the
    unpadded one's exactly (the dead Hessian rows carry nothing). Q5_0's importance-weighted fit depends on the
    row's mean square (llama.cpp's sigma2 = sum x^2 / n_per_row, which the zero columns lower): close, not equal.
    The 256-block types become candidates."""
    from gemmaquant.sensitivity import _matrix_err, _padded_errors

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(3, 16, 96, generator=g), torch.randn(400, 96, generator=g)
    H = x.T @ x / 400
    opts = {"Q5_0": (0, 0.0), "Q8_0": (0, 0.0), "Q4_K": (0, 0.0)}
    unpadded = {t: sum(_matrix_err(w[e], H, t)[0] / 3 for e in range(3)) for t in ("Q5_0", "Q8_0")}
    got = _padded_errors("layers.0.experts.down_proj", 256, unpadded, opts, w, [(1 / 3, H)] * 3)
    assert got["Q8_0"] == pytest.approx(unpadded["Q8_0"], rel=1e-12)
    assert got["Q5_0"] == pytest.approx(unpadded["Q5_0"], rel=1e-2) and got["Q5_0"] != unpadded["Q5_0"]
    assert got["Q4_K"] > 0
    # gate/up rows keep their length: the same error for every type
    up = _padded_errors("layers.0.mlp.up_proj.weight", 256, {"Q4_K": 2.5}, {"Q4_K": (0, 0.0)}, w, [])
    assert up == {"Q4_K": 2.5}


def _units(pad_cost: float) -> tuple[list[Unit], dict, dict]:
    """Two layers' down projections of kind "experts" (unpadded: Q5_0 / Q8_0; padded: Q4_K / Q6_K plus the same
    32-block types at `pad_cost` times the bytes) and an attention matrix; the padded grids' loss is lower."""
    units, padded, kind = [], {}, {}
    for i in range(2):
        n = f"layers.{i}.experts.down_proj"
        units.append(Unit(n, (4, 8, 704), {"Q5_0": (550, 1.0), "Q8_0": (850, 0.1), "F16": (1600, 0.0)}))
        padded[n] = {"Q5_0": (int(550 * pad_cost), 1.0), "Q8_0": (int(850 * pad_cost), 0.1),
                     "Q4_K": (int(450 * pad_cost), 0.9), "Q6_K": (int(656 * pad_cost), 0.15),
                     "F16": (int(1600 * pad_cost), 0.0)}
        kind[n] = "experts"
    units.append(Unit("layers.0.self_attn.q_proj.weight", (8, 256), {"Q4_K": (450, 2.0), "Q8_0": (850, 0.2)}))
    return units, padded, kind


def test_solver_takes_padding_where_it_pays():
    units, padded, kind = _units(768 / 704)
    budget = 450 + 2 * 550 + 400  # room for the attention matrix's Q8_0 only when the downs shrink
    choice, pad = solve_padded(units, padded, kind, budget)
    assert pad == ("experts",)
    assert choice["layers.0.self_attn.q_proj.weight"] == "Q8_0"
    assert {choice[f"layers.{i}.experts.down_proj"] for i in range(2)} <= {"Q4_K", "Q6_K"}
    plain = solve(units, budget)
    from gemmaquant.mix_search import with_padding

    assert total(with_padding(units, padded, kind, pad), choice)[1] < total(units, plain)[1]
    assert total(with_padding(units, padded, kind, pad), choice)[0] <= budget


def test_solver_leaves_padding_where_it_does_not_pay():
    units, padded, kind = _units(2.0)  # a width of 128 padded to 256: twice the bytes
    budget = 450 + 2 * 550 + 400
    choice, pad = solve_padded(units, padded, kind, budget)
    assert pad == () and choice == solve(units, budget)
    # equal loss and bytes both ways: the unpadded model wins the tie
    same = {n: dict(u.options) for u, n in ((u, u.name) for u in units) if n in padded}
    assert solve_padded(units, same, kind, 10**6)[1] == ()
    with pytest.raises(TargetError, match="below the smallest mix"):
        solve_padded(units, padded, kind, 100)


def test_mix_file_padding_round_trip_and_bad_input(tmp_path):
    from gemmaquant.export.gguf_mix import MixError
    from gemmaquant.recipe import Recipe
    from gemmaquant.target_mix import read_mix_record
    from gemmaquant.workflow import model_config

    cfg = model_config("tiny-moe")  # experts 128 wide
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"tensor_types": {"layers.1.experts.down_proj": "Q4_K"}, "pad_to_block": ["experts"]}))
    assert read_mix_record(f, cfg) == ({"layers.1.experts.down_proj": "Q4_K"}, ("experts",))
    f.write_text(json.dumps({"tensor_types": {"layers.1.experts.down_proj": "Q4_K"}}))
    with pytest.raises(MixError, match=r"rows of 128, not a multiple of Q4_K's 256"):
        read_mix_record(f, cfg)
    f.write_text(json.dumps({"tensor_types": {}, "pad_to_block": ["ffn"]}))
    with pytest.raises(MixError, match=r"mix.json: pad_to_block: unknown MLP kind 'ffn'"):
        read_mix_record(f, cfg)
    # a resumed run compares recipes: another padding is another recipe
    r = Recipe(pad_to_block=["experts"])
    assert r.pad_to_block == ("experts",) and not r.same_as(Recipe().to_dict())
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))).same_as(r.to_dict())
    assert "pad_to_block" not in Recipe().to_dict()  # older work directories keep their recipe bytes


@pytest.mark.parametrize("args,msg", [
    (["--pad-to-block", "attn"], "--pad-to-block: unknown MLP kind 'attn'"),
    (["--pad-to-block", "all", "--target-bpw", "5"], "--pad-to-block is for the fixed mixes"),
    (["--pad-to-block", "all", "--format", "gguf,safetensors"], "add --format gguf"),
])
def test_pad_to_block_bad_input(args, msg):
    from typer.testing import CliRunner

    from gemmaquant.cli import app

    a = ["quantize", "tiny-moe", "--dry-run", "--gguf-type", "Q4_K_M", *args]
    if "--format" not in args:
        a += ["--format", "gguf"]
    r = CliRunner().invoke(app, a)
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


def test_dry_run_bytes_equal_the_padded_file(tmp_path):
    """--pad-to-block through the whole command (GPTQ on the padded experts, dead columns in down): the file's
    bytes are what the dry run says, its shapes and metadata are padded, the experts' down projections are Q4_K
    / Q6_K where the unpadded mix falls back to Q5_0 / Q8_0, and the padded weights are exact zeros."""
    import gguf

    from gemmaquant.workflow import run_quantize

    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "gptq"\nn_samples = 4\nseq_len = 64\n')
    kw = dict(formats="gguf", recipe_file=recipe, gguf_type="Q4_K_M", progress=False, pad_to_block="all")
    dry = run_quantize("tiny-moe", dry_run=True, **kw)
    assert "zero-padded 128 -> 256" in dry["text"] and dry["padding"]["padded"]["pad_to_block"] == ["experts"]
    assert dry["padding"]["unpadded"]["ffn_down_types"] == ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]  # dense 256: K-quants
    res = run_quantize("tiny-moe", out=tmp_path / "out", evaluate=False, **kw)
    path = res["files"]["gguf"]
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert sum(int(t.n_bytes) for t in tensors.values()) == dry["gguf"]["bytes"]
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert down.tensor_type.name in ("Q4_K", "Q6_K") and list(down.shape)[:2] == [256, 160]
    r = gguf.GGUFReader(path)
    assert int(r.fields["gemma4.expert_feed_forward_length"].parts[-1][0]) == 256
    assert tuple(res["recipe"]["pad_to_block"]) == ("experts",)
    import gemmaquant

    m = gemmaquant.load(path)  # GPTQ's dead columns were set to zero and zero sub-blocks stay zero
    assert not m.layers[1].experts.down_proj[..., 128:].any()
    assert not m.layers[1].experts.gate_up_proj[:, 128:256].any() and m.layers[1].experts.gate_up_proj[:, 256:].any()


def test_a_resumed_run_refuses_another_padding(tmp_path):
    from gemmaquant.quantize import QuantizeError, quantize
    from gemmaquant.recipe import Recipe

    padded = Recipe(method="rtn", gguf_type="Q4_K_M", pad_to_block=("experts",))
    quantize("tiny-moe", padded, out=tmp_path, progress=False, stop_after_layer=0)
    with pytest.raises(QuantizeError, match="holds a run with another recipe"):
        quantize("tiny-moe", Recipe(method="rtn", gguf_type="Q4_K_M"), out=tmp_path, progress=False)
    res = quantize("tiny-moe", padded, out=tmp_path, progress=False)  # the same padding resumes
    assert res.plan["layers.3.experts.down_proj"].shape == (8, 160, 256)
