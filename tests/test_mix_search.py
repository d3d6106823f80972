"""The per-tensor mix solver against exhaustive search, and the bad input of --target-bpw / --gguf-mix."""

import itertools
import json
import random

import pytest

from gemmaquant.config import Gemma4Config
from gemmaquant.export.gguf_mix import MixError, gguf_mix_plan
from gemmaquant.mix_search import TargetError, Unit, candidate_types, solve, total
from gemmaquant.target_mix import budget_bytes, read_mix
from gemmaquant.workflow import model_config


def _random_units(rng: random.Random, n: int, k: int) -> list[Unit]:
    units = []
    for i in range(n):
        b, loss, opts = rng.randint(10, 30), rng.uniform(5, 20), {}
        for j in range(k):
            opts[f"T{j}"] = (b, loss)
            b += rng.randint(3, 15)
            loss *= rng.uniform(0.2, 1.05)  # mostly better for more bytes, sometimes dominated
        units.append(Unit(f"u{i}", (1, 1), opts))
    return units


def _brute(units: list[Unit], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*[list(u.options) for u in units]):
        b, loss = total(units, {u.name: t for u, t in zip(units, combo)})
        if b <= budget:
            best = min(best, loss)
    return best


def test_solver_near_exhaustive_optimum_and_feasible():
    rng = random.Random(0)
    gaps = []
    for trial in range(40):
        units = _random_units(rng, 4, 4)
        lo = sum(min(b for b, _ in u.options.values()) for u in units)
        hi = sum(max(b for b, _ in u.options.values()) for u in units)
        budget = rng.randint(lo, hi)
        choice = solve(units, budget)
        b, loss = total(units, choice)
        assert b <= budget
        opt = _brute(units, budget)
        assert loss >= opt - 1e-9
        gaps.append(loss / opt - 1 if opt > 0 else 0.0)
    # the Lagrangian allocation plus single switches: optimal in most instances, never far off
    assert sum(g < 1e-9 for g in gaps) >= 30, gaps
    assert max(gaps) < 0.25, max(gaps)


def test_solver_exact_at_the_hull_breakpoints():
    """At a budget the price-ordered hull steps reach exactly, the Lagrangian choice is optimal (Everett)."""
    rng = random.Random(1)
    for _ in range(20):
        units = _random_units(rng, 3, 4)
        steps = []
        for u in units:
            h = u.hull()
            steps += [((u.options[a][1] - u.options[c][1]) / (u.options[c][0] - u.options[a][0]),
                       u.options[c][0] - u.options[a][0]) for a, c in zip(h, h[1:])]
        budget = sum(min(b for b, _ in u.options.values()) for u in units)
        for _, extra in sorted(steps, reverse=True)[: rng.randint(1, max(1, len(steps)))]:
            budget += extra
        assert total(units, solve(units, budget))[1] == pytest.approx(_brute(units, budget))


def test_solver_loss_falls_as_the_budget_grows():
    units = _random_units(random.Random(2), 6, 5)
    lo = sum(min(b for b, _ in u.options.values()) for u in units)
    losses = [total(units, solve(units, lo + extra))[1] for extra in range(0, 200, 10)]
    assert all(a >= b - 1e-12 for a, b in zip(losses, losses[1:]))


def test_budget_below_the_cheapest_mix_is_refused():
    units = _random_units(random.Random(3), 3, 3)
    with pytest.raises(TargetError, match="below the smallest mix"):
        solve(units, 5)


def test_candidates_are_the_registered_types_that_fit():
    assert candidate_types(704) == ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "F16"]  # 32-blocks only
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"} <= set(candidate_types(2304))


class _Sens:  # what budget_bytes reads of a Sensitivity
    def __init__(self, units, fixed, weights):
        self.units, self.fixed_bytes, self.weights = units, fixed, weights


def test_budget_outside_the_grids_names_the_option():
    s = _Sens([Unit("a", (8, 32), {"Q4_0": (144, 1.0), "F16": (512, 0.0)})], 100, 256)
    with pytest.raises(TargetError, match=r"--target-bpw 1.0: below the smallest mix"):
        budget_bytes(s, 1.0, None)
    with pytest.raises(TargetError, match=r"--target-size 1.0: above the float"):
        budget_bytes(s, None, 1.0)
    assert budget_bytes(s, 10.0, None) == 320


def test_mix_file_bad_input(tmp_path):
    cfg = model_config("tiny-dense")
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"tensor_types": {"layers.0.mlp.down_proj.weight": "Q9_X"}}))
    with pytest.raises(MixError, match=r"unknown type 'Q9_X' for tensor 'layers.0.mlp.down_proj.weight'"):
        read_mix(f, cfg)
    f.write_text(json.dumps({"layers.99.mlp.down_proj.weight": "Q4_0"}))
    with pytest.raises(MixError, match=r"tensor 'layers.99.mlp.down_proj.weight' does not exist in this model"):
        read_mix(f, cfg)
    f.write_text(json.dumps({"layers.0.mlp.down_proj.weight": "Q4_K"}))  # 576 % 256 != 0
    with pytest.raises(MixError, match=r"rows of 576, not a multiple of Q4_K's 256"):
        read_mix(f, cfg)
    f.write_text(json.dumps({"norm.weight": "Q8_0"}))
    with pytest.raises(MixError, match=r"norm.weight is not a tensor gemmaquant quantizes"):
        read_mix(f, cfg)
    f.write_text("{")
    with pytest.raises(MixError, match="not valid JSON"):
        read_mix(f, cfg)
    # GGUF names are accepted and map to ours
    f.write_text(json.dumps({"blk.0.ffn_down.weight": "q5_1", "token_embd.weight": "Q8_0"}))
    assert read_mix(f, cfg) == {"layers.0.mlp.down_proj.weight": "Q5_1", "embed_tokens.weight": "Q8_0"}


def test_tensor_types_override_the_mix():
    cfg: Gemma4Config = model_config("tiny-dense")
    plan = gguf_mix_plan(cfg, "Q4_K_M", tensor_types={"layers.1.mlp.up_proj.weight": "Q8_0",
                                                       "embed_tokens.weight": "Q4_0"})
    assert plan["layers.1.mlp.up_proj.weight"] == "Q8_0" and plan["embed_tokens.weight"] == "Q4_0"
    assert plan["layers.2.mlp.up_proj.weight"] == gguf_mix_plan(cfg, "Q4_K_M")["layers.2.mlp.up_proj.weight"]


# ---- the command line: one-line errors, exit 2, before any measurement ----
@pytest.mark.parametrize("args, msg", [
    (["--target-bpw", "5"], "compressed-tensors cannot hold"),  # default formats include safetensors
    (["--format", "gguf", "--target-bpw", "1.0"], "--target-bpw 1.0: below the smallest mix"),
    (["--format", "gguf", "--target-bpw", "40"], "--target-bpw 40.0: above the float (F16) size"),
    (["--format", "gguf", "--target-size", "1"], "--target-size 1.0: above the float (F16) size"),
    (["--format", "gguf", "--target-bpw", "-2"], "must be a positive number"),
    (["--format", "gguf", "--target-bpw", "5", "--target-size", "1"], "exclude each other"),
    (["--format", "gguf", "--method", "awq", "--target-bpw", "5"], "AWQ"),
])
def test_target_bad_input(args, msg):
    from typer.testing import CliRunner

    from gemmaquant.cli import app

    r = CliRunner().invoke(app, ["quantize", "tiny-dense", "--dry-run", *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


def test_gguf_mix_file_dry_run_and_bad_file(tmp_path):
    from typer.testing import CliRunner

    from gemmaquant.cli import app

    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"tensor_types": {"layers.0.mlp.down_proj.weight": "Q8_0", "embed_tokens.weight": "Q4_0"}}))
    r = CliRunner().invoke(app, ["quantize", "tiny-dense", "--dry-run", "--format", "gguf", "--gguf-mix", str(f),
                                 "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["recipe"]["tensor_types"]["layers.0.mlp.down_proj.weight"] == "Q8_0"
    f.write_text(json.dumps({"layers.0.mlp.down_proj.weight": "Q7_K"}))
    r = CliRunner().invoke(app, ["quantize", "tiny-dense", "--dry-run", "--format", "gguf", "--gguf-mix", str(f)])
    assert r.exit_code == 2 and "unknown type 'Q7_K'" in r.output and str(f) in r.output
    r = CliRunner().invoke(app, ["quantize", "tiny-dense", "--dry-run", "--format", "gguf", "--gguf-mix",
                                 str(tmp_path / "nope.json")])
    assert r.exit_code == 2 and "mix file not found" in r.output


def test_hessian_error_is_the_mean_output_error():
    """tr(dW H dW^T) with H = X^T X / n is the mean squared output error of the quantized matrix on X."""
    import torch

    from gemmaquant.sensitivity import _matrix_err

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 64, generator=g), torch.randn(500, 64, generator=g) * torch.linspace(0.1, 3, 64)
    H = (x.double().T @ x.double() / x.shape[0]).float()
    for t in ("Q4_0", "Q5_1", "Q8_0"):
        err, q = _matrix_err(w, H, t)
        direct = ((x.double() @ (w.double() - q.double()).T) ** 2).sum(1).mean()
        assert err == pytest.approx(float(direct), rel=1e-5)
    assert _matrix_err(w, H, "Q4_0")[0] > _matrix_err(w, H, "Q5_0")[0] > _matrix_err(w, H, "Q8_0")[0]


@pytest.mark.slow
def test_measure_on_a_model_object_leaves_it_and_scales_by_the_kl():
    """On a caller's model object (the edge fixture: PLE tables too): the object is unchanged, every searchable
    tensor has its candidates, and each loss at the reference type is the KL measured with that tensor alone."""
    import torch

    import gemmaquant
    from gemmaquant.fixtures import fixture_path
    from gemmaquant.recipe import Recipe
    from gemmaquant.sensitivity import measure

    model = gemmaquant.load("tiny-edge")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = measure(model, Recipe(n_samples=4, seq_len=64, batch_size=4), tokenizer_dir=fixture_path("tiny-edge"),
                kl_sequences=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = {u.name for u in s.units}
    assert {"embed_tokens.weight", "embed_tokens_per_layer.weight"} <= names
    assert "per_layer_model_projection.weight" not in names
    for u in s.units:
        ref = s.reference_type[u.name]
        assert u.options[ref][1] == pytest.approx(s.kl[u.name])
        assert u.options["F16"][1] == 0.0
        assert s.kl[u.name] >= 0


def test_gguf_mix_end_to_end(tmp_path):
    """A mix file through the whole command: GPTQ on each chosen grid, each tensor written in its type, the file's
    bits per weight what the dry run predicts, the mix in the recipe and the report; llama.cpp loads the file
    (when LLAMA_CPP_DIR points at a build)."""
    import os
    import subprocess

    import gguf

    from gemmaquant.export.gguf_names import gguf_name
    from gemmaquant.export.inspect import file_bits
    from gemmaquant.workflow import run_quantize

    mix = {"layers.0.self_attn.q_proj.weight": "Q8_0", "layers.1.mlp.down_proj.weight": "Q4_1",
           "layers.2.self_attn.o_proj.weight": "Q4_K", "layers.3.mlp.gate_proj.weight": "F16",
           "embed_tokens.weight": "Q5_0"}
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"tensor_types": mix}))
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "gptq"\nn_samples = 4\nseq_len = 64\n')
    kw = dict(formats="gguf", recipe_file=recipe, gguf_mix=f, progress=False)
    dry = run_quantize("tiny-dense", dry_run=True, **kw)
    res = run_quantize("tiny-dense", out=tmp_path / "out", evaluate=False, **kw)
    path = res["files"]["gguf"]
    assert path.endswith("tiny-dense-mix.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    for name, t in mix.items():
        assert types[gguf_name(name)] == t
    assert types[gguf_name("layers.0.self_attn.k_proj.weight")] == "Q4_0"  # the rest: the file type's rule
    assert file_bits(path)["bits_per_weight"] == pytest.approx(dry["gguf"]["bits_per_weight"], abs=1e-12)
    assert res["recipe"]["tensor_types"] == mix
    d = os.environ.get("LLAMA_CPP_DIR")
    ppl = os.path.join(d or "", "build", "bin", "llama-perplexity")
    if d and os.path.isfile(ppl):
        text = tmp_path / "t.txt"
        text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
        out = subprocess.run([ppl, "-m", path, "-f", str(text), "-c", "64", "-b", "64", "--chunks", "2", "-t", "1"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "PPL" in out.stdout + out.stderr, out.stderr[-2000:]


def test_prior_weights_by_role_and_position():
    from gemmaquant.sensitivity import prior_weight, role

    assert role("layers.2.experts.gate_up_proj") == "experts" and role("embed_tokens_per_layer.weight") == \
        "per-layer embedding table"
    first, middle, last = (prior_weight(f"layers.{i}.self_attn.q_proj.weight", 30) for i in (0, 15, 29))
    assert first > middle > last  # measured on every fixture: the first layer is the most sensitive per unit
    assert prior_weight("layers.3.mlp.up_proj.weight", 30) < middle
