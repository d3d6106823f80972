"""benchmarks/bench_qat.py labels every saved run with how its recipe differs from today's default: a row that
ran an older default must not be shown as the default (the table mixes runs from several recipe versions)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from gemmaquant.qat.train import QATRecipe

_spec = importlib.util.spec_from_file_location(
    "bench_qat", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_qat.py")
bench_qat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_qat)
NOW = {"gptq_importance_params": True}  # QAT started from today's GPTQ (imatrix-style block parameters)


def test_a_run_of_todays_default_is_labelled_default():
    run = {"fixture": "tiny-moe", "steps": 1000, "recipe": dataclasses.asdict(QATRecipe()), **NOW}
    assert bench_qat.recipe_changes(run) == {}
    assert bench_qat._changes_text(bench_qat.recipe_changes(run)) == "default"


def test_a_run_from_gptq_with_absmax_parameters_says_so():
    run = {"fixture": "tiny-moe", "steps": 1000, "recipe": dataclasses.asdict(QATRecipe())}
    assert bench_qat.recipe_changes(run) == {"gptq_params": "absmax"}
    assert bench_qat.recipe_changes({**run, "gptq_importance_params": False}) == {"gptq_params": "absmax"}


def test_a_run_without_a_recorded_recipe_ran_the_past_defaults_and_its_overrides():
    run = {"fixture": "tiny-moe", "steps": 500, "overrides": {"lr": 0.0, "batch_size": 16}, **NOW}
    assert bench_qat.recipe_changes(run) == {"lr": 0.0, "batch_size": 16, "scale_lr": 0.003, "router_weight": 10.0,
                                             "average": 0.0, "expert_lr_scale": 1.0, "steps": 500,
                                             "attention_lr_scale": 1.0}


def test_router_weight_is_not_a_difference_without_a_router_and_removed_fields_only_when_set():
    recipe = dataclasses.asdict(QATRecipe()) | {"router_weight": 10.0, "block_steps": 0}  # recorded by an old run
    assert bench_qat.recipe_changes({"fixture": "tiny-dense", "steps": 1000, "recipe": recipe, **NOW}) == {}
    assert (bench_qat.recipe_changes({"fixture": "tiny-moe", "steps": 1000, "recipe": recipe, **NOW})
            == {"router_weight": 10.0})
    run = {"fixture": "tiny-moe", "steps": 1, "recipe": recipe | {"block_steps": 100},
           "overrides": {"block_steps": 100}, **NOW}
    assert bench_qat.recipe_changes(run) == {"router_weight": 10.0, "block_steps": 100, "steps": 1}


def test_a_recorded_recipe_from_before_the_average_existed_ran_without_it():
    recipe = {k: v for k, v in dataclasses.asdict(QATRecipe()).items() if k != "average"}
    assert (bench_qat.recipe_changes({"fixture": "tiny-edge", "steps": 1000, "recipe": recipe, **NOW})
            == {"average": 0.0})


def test_a_recorded_recipe_from_before_the_expert_rates_ran_them_at_one_which_matters_only_with_experts():
    recipe = {k: v for k, v in dataclasses.asdict(QATRecipe()).items() if k != "expert_lr_scale"}
    assert (bench_qat.recipe_changes({"fixture": "tiny-moe", "steps": 1000, "recipe": recipe, **NOW})
            == {"expert_lr_scale": 1.0})
    assert bench_qat.recipe_changes({"fixture": "tiny-dense", "steps": 1000, "recipe": recipe, **NOW}) == {}


def test_a_run_on_a_gguf_mix_is_labelled_by_its_bits_per_weight_and_its_grid_is_not_a_recipe_change():
    recipe = dataclasses.asdict(QATRecipe(gguf_type="Q4_K_M"))
    run = {"fixture": "tiny-moe", "steps": 1000, "recipe": recipe, "format": "Q4_K_M", "bits": 5.95, **NOW}
    assert bench_qat.recipe_changes(run) == {}
    assert bench_qat._bits_text(run) == "5.95 bpw" and bench_qat._bits_text({"format": "q4_0", "bits": 4}) == "4"
    # llama.cpp's mix on tiny-moe's 160- and 128-wide rows: mostly 32-block fallbacks (Q5_0, Q8_0), so ~6 bits
    assert 5.5 < bench_qat.mix_bits("tiny-moe", "Q4_K_M") < 6.5
    assert bench_qat.is_mix("Q4_K_M") and not bench_qat.is_mix("q4_0") and not bench_qat.is_mix("int4_g32_sym")


def test_the_share_removed_shows_its_interval_where_the_run_recorded_one():
    run = {"gptq": {"kl_mean": 0.02}, "qat": {"kl_mean": 0.009}}
    assert bench_qat._removed_text(run) == "55.0%"
    assert bench_qat._removed_text({**run, "gap_removed": None}) == "55.0%"  # a run with no held-out windows
    assert bench_qat._removed_text({**run, "gap_removed": {"share": 0.55, "ci95": [0.521, 0.584]}}) == "55.0% (52-58)"
    # one decimal: a run at 49.8% must not read as the goal's 50%
    assert bench_qat._removed_text({"gptq": {"kl_mean": 0.0173}, "qat": {"kl_mean": 0.008693}}) == "49.8%"


def test_the_default_batch_is_per_fixture_and_older_moe_runs_read_batch_8():
    """tiny-moe's default batch is 32 since session 19: a tiny-moe run recorded at 8, or one from before recipes
    were recorded, reads batch_size=8; a tiny-dense run at 8 is its default; one at 32 on tiny-moe is too."""
    at = {b: dataclasses.asdict(QATRecipe(batch_size=b)) for b in (8, 32)}
    assert bench_qat.recipe_changes({"fixture": "tiny-moe", "steps": 1000, "recipe": at[8], **NOW}) == {"batch_size": 8}
    assert bench_qat.recipe_changes({"fixture": "tiny-moe", "steps": 1000, "recipe": at[32], **NOW}) == {}
    assert bench_qat.recipe_changes({"fixture": "tiny-dense", "steps": 1000, "recipe": at[8], **NOW}) == {}
    assert bench_qat.recipe_changes({"fixture": "tiny-dense", "steps": 1000, "recipe": at[32], **NOW}) == {
        "batch_size": 32}
    assert bench_qat.recipe_changes({"fixture": "tiny-moe", "steps": 500, **NOW})["batch_size"] == 8


def test_attention_at_a_quarter_is_the_moe_default_and_older_runs_read_one():
    """Since session 20 an MoE model's attention trains at 0.25x the rates: a tiny-moe run recorded before the field
    existed, or at 1x, reads attention_lr_scale=1; on tiny-dense 1x is the default and 0.25 a change."""
    now = dataclasses.asdict(QATRecipe(batch_size=32, attention_lr_scale=0.25))
    before = {k: v for k, v in now.items() if k != "attention_lr_scale"}
    assert bench_qat.recipe_changes({"fixture": "tiny-moe", "steps": 1000, "recipe": now, **NOW}) == {}
    assert bench_qat.recipe_changes({"fixture": "tiny-moe", "steps": 1000, "recipe": before, **NOW}) == {
        "attention_lr_scale": 1.0}
    dense = dataclasses.asdict(QATRecipe(batch_size=8))
    assert bench_qat.recipe_changes({"fixture": "tiny-dense", "steps": 1000, "recipe": dense, **NOW}) == {}
    assert bench_qat.recipe_changes({"fixture": "tiny-dense", "steps": 1000,
                                     "recipe": dense | {"attention_lr_scale": 0.25}, **NOW}) == {"attention_lr_scale": 0.25}
