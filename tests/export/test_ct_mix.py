"""compressed-tensors per-layer mixes (gemmaquant.ct_mix, export/ct_targets.py): what vLLM and transformers load.

* transformers (with compressed-tensors) loads a mixed export (int4 g32 / g64 / g128, int8, bf16 units, bf16
  experts in one layer) and its logits equal `gemmaquant.load(dir)`'s (the pattern of
  test_compressed_tensors_transformers.py: experts compared after transformers' bf16 rounding);
* vLLM's lookup, replayed here from vllm/model_executor/layers/quantization/compressed_tensors/utils.py and
  compressed_tensors_moe.py on vLLM's own module names (qkv_proj, gate_up_proj fused; `moe.experts` FusedMoE),
  gives every module the mix's scheme, and every checkpoint module matches the targets of exactly one group;
* the solver keeps fused units on one scheme; a mix that splits one, names an unknown scheme or tensor, or a group
  that does not divide the inputs is refused with one line naming it; the dry run's bytes are the files' bytes.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import gemmaquant
from gemmaquant.checkpoint import Checkpoint, expected_shapes
from gemmaquant.ct_mix import (SCHEMES, CTSpace, check_ct_schemes, group_units, scheme_fits,
                               solve_one_expert_scheme, units_of)
from gemmaquant.export import FloatSource, export_compressed_tensors, load_transformers
from gemmaquant.export.gguf_mix import MixError
from gemmaquant.fixtures import FIXTURES

VLLM_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def mixed_schemes(cfg) -> dict[str, str]:
    """A mix using every scheme: units cycle through them (where the group divides the inputs); experts int8 or
    bf16 by layer (one quantized experts scheme, as transformers needs)."""
    shapes = expected_shapes(cfg)
    cycle = ["int8", "int4_g32_sym", "bf16", "int4_g128_sym", "int4_g64_sym"]
    out = {}
    for k, (unit, members) in enumerate(units_of(cfg).items()):
        if unit.endswith(".experts"):
            t = ("int8", "bf16")[k % 2]
        else:
            fits = [c for c in cycle if all(scheme_fits(c, shapes[m][-1]) for m in members)]
            t = fits[k % len(fits)]
        out.update(dict.fromkeys(members, t))
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = {}
    for fx in FIXTURES:
        src = FloatSource(FIXTURES[fx])
        schemes = mixed_schemes(src.config)
        out[fx] = (export_compressed_tensors(src, tmp_path_factory.mktemp(fx) / "ct", schemes=schemes), schemes)
    return out


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_transformers_loads_mixed_export(fixture, mixed):
    from transformers import AutoModelForCausalLM

    out, schemes = mixed[fixture]
    assert len(set(schemes.values())) >= 4  # int4 at two group sizes at least, int8, bf16
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    moe = json.loads((out / "config.json").read_text()).get("enable_moe_block")
    hf = (load_transformers(out, **kw) if moe else AutoModelForCausalLM.from_pretrained(out, **kw)).eval()
    ours = gemmaquant.load(out)
    ids = torch.arange(40, 90)[None]
    with torch.no_grad():
        hf(ids[:, :2])  # compressed-tensors decompresses dense layers on the first forward
        theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
        for name, w in ours.state_dict().items():
            if name not in theirs:
                continue
            if ".experts." in name and schemes[name] != "bf16":  # dequantized in bf16 by transformers
                assert theirs[name].dtype == torch.bfloat16
                w.copy_(w.to(torch.bfloat16).float())
            assert torch.equal(theirs[name].float(), w), name
            if name in schemes and schemes[name] == "bf16":  # unquantized: the source's bf16 weights
                assert torch.equal(w, Checkpoint(FIXTURES[fixture]).get(name).to(torch.bfloat16).float()), name
        for m in hf.modules():
            if type(m).__name__ == "Gemma4TextExperts":
                m.gate_up_proj.data, m.down_proj.data = m.gate_up_proj.float(), m.down_proj.float()
        err = (hf(ids).logits - ours(ids)).abs().max().item()
    assert err <= 1e-4, f"{fixture}: max |transformers - gemmaquant| = {err:.3g}"


# ---- vLLM's target matching, replayed (utils.py: should_ignore_layer, find_matched_target, _match_fused_layer) ----
def _is_match(value: str, target: str, contains: bool = False) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    return target.lower() in value.lower() if contains else target == value


def _vllm_ignored(layer: str, ignore: list[str]) -> bool:
    proj = layer.split(".")[-1]
    if proj in VLLM_FUSED and layer not in ignore:
        shards = {any(_is_match(layer.replace(proj, s), t) for t in ignore) for s in VLLM_FUSED[proj]}
        assert len(shards) == 1, f"{layer}: vLLM requires all shards to use the same scheme"
        return shards.pop()
    return any(_is_match(layer, t) for t in ignore)


def _vllm_scheme(qc: dict, layer: str, cls: str):
    if _vllm_ignored(layer, qc["ignore"]):
        return None
    targets = {t: g["weights"] for g in qc["config_groups"].values() for t in g["targets"]}
    hit = next((t for t in targets if _is_match(layer, t)), None) or \
        next((t for t in targets if _is_match(cls, t, contains=True)), None)
    if hit is None:
        proj = next((p for p in VLLM_FUSED if layer.endswith(p)), None)
        if proj is not None:
            shard_hits = [next((t for t in targets if _is_match(layer.replace(proj, s), t)), None)
                          for s in VLLM_FUSED[proj]]
            hit = shard_hits[0] if all(shard_hits) else None
    return None if hit is None else targets[hit]


def _vllm_moe_scheme(qc: dict, layer: str):
    """CompressedTensorsMoEMethod.get_moe_method: expert 0's gate, up and down must agree."""
    got = [_vllm_scheme(qc, f"{layer}.0.{p}", "FusedMoE") for p in ("gate_proj", "up_proj", "down_proj")]
    assert got[0] == got[1] == got[2], f"{layer}: All MoE projections need to have same quantization scheme"
    return got[0]


def _expected(scheme: str):
    bits, group = SCHEMES[scheme]
    return None if bits == 16 else (bits, group)


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_vllm_gives_every_module_its_scheme(fixture, mixed):
    out, schemes = mixed[fixture]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "Linear" not in {t for g in qc["config_groups"].values() for t in g["targets"]}
    cfg = Checkpoint(FIXTURES[fixture]).config
    for unit, members in units_of(cfg).items():
        i, kind = unit.split(".")[1], unit.split(".", 2)[2]
        base = f"model.layers.{i}"
        module, cls = {"self_attn.qkv": (f"{base}.self_attn.qkv_proj", "QKVParallelLinear"),
                       "self_attn.o_proj": (f"{base}.self_attn.o_proj", "RowParallelLinear"),
                       "mlp.gate_up": (f"{base}.mlp.gate_up_proj", "MergedColumnParallelLinear"),
                       "mlp.down_proj": (f"{base}.mlp.down_proj", "RowParallelLinear"),
                       "experts": (f"{base}.moe.experts", None),
                       "per_layer_input_gate": (f"{base}.per_layer_input_gate", "ReplicatedLinear"),
                       "per_layer_projection": (f"{base}.per_layer_projection", "ReplicatedLinear")}[kind]
        w = _vllm_moe_scheme(qc, module) if cls is None else _vllm_scheme(qc, module, cls)
        got = None if w is None else (w["num_bits"], w["group_size"])
        assert got == _expected(schemes[members[0]]), f"{module}: vLLM runs {got}, the mix says {schemes[members[0]]}"
    for name in ("model.embed_tokens", "lm_head", "model.layers.0.router.proj"):  # still ignored
        assert _vllm_scheme(qc, name, "Linear") is None, name


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_every_checkpoint_module_matches_one_group(fixture, mixed):
    """Each packed module of the files matches the targets of exactly one config group (and no ignore entry), each
    bf16 unit's module matches an ignore entry and no group."""
    from safetensors import safe_open

    out, schemes = mixed[fixture]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    packed = {k.removesuffix(".weight_packed") for k in keys if k.endswith(".weight_packed")}
    assert packed
    for module in packed:
        groups = [g for g in qc["config_groups"].values() if any(_is_match(module, t) for t in g["targets"])]
        assert len(groups) == 1, f"{module}: matched by {len(groups)} config groups"
        assert not any(_is_match(module, t) for t in qc["ignore"]), module
    floats = [n for n, s in schemes.items() if s == "bf16" and ".experts." not in n]  # bf16 experts: no module
    assert floats
    for n in floats:
        module = "model." + n.removesuffix(".weight")
        assert any(_is_match(module, t) for t in qc["ignore"]), module
        assert not any(_is_match(module, t) for g in qc["config_groups"].values() for t in g["targets"]), module


# ---- the solver and the checks ----
@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_solver_keeps_fused_units_on_one_scheme(fixture):
    cfg = Checkpoint(FIXTURES[fixture]).config
    skel = CTSpace().skeleton(cfg)
    g = torch.Generator().manual_seed(0)
    for u in skel.units:  # losses: random per tensor, decreasing with bytes
        scale = float(torch.rand((), generator=g)) + 0.01
        u.options = {t: (b, 0.0 if t == "bf16" else scale * 1e6 / b) for t, (b, _) in u.options.items()}
    units = group_units(cfg, skel.units)
    lo = skel.fixed_bytes + sum(min(b for b, _ in u.options.values()) for u in units)
    hi = skel.fixed_bytes + sum(max(b for b, _ in u.options.values()) for u in units)
    for frac in (0.0, 0.3, 0.7):
        budget = int(lo + frac * (hi - lo))
        choice = solve_one_expert_scheme(units, budget, skel.fixed_bytes)
        assert set(choice) == set(units_of(cfg))
        schemes = {m: choice[u] for u, ms in units_of(cfg).items() for m in ms}
        assert check_ct_schemes(cfg, schemes) == schemes  # no fused unit split, one experts scheme
        spent = skel.fixed_bytes + sum(dict((u.name, u) for u in units)[n].options[t][0] for n, t in choice.items())
        assert spent <= budget


@pytest.mark.parametrize("mix, match", [
    ({"layers.0.self_attn.q_proj.weight": "int8", "layers.0.self_attn.k_proj.weight": "int4_g32_sym",
      "layers.0.self_attn.v_proj.weight": "int8"}, r"layers\.0\.self_attn\.qkv is split across schemes"),
    ({"layers.0.mlp.gate_proj.weight": "int8"}, r"layers\.0\.mlp\.gate_up is split.*gate_up_proj"),
    ({"layers.0.self_attn.o_proj.weight": "int3"}, r"unknown compressed-tensors scheme 'int3'"),
    ({"layers.99.self_attn.o_proj.weight": "int8"}, r"'layers\.99\.self_attn\.o_proj\.weight' does not exist"),
    ({"embed_tokens.weight": "int8"}, r"embed_tokens\.weight is not a tensor the compressed-tensors export"),
    ({"layers.0.mlp.down_proj.weight": "int4_g128_sym"}, r"has 576 inputs, which int4_g128_sym's groups of 128"),
])
def test_bad_mixes_name_the_entry(mix, match):
    cfg = Checkpoint(FIXTURES["tiny-dense"]).config
    with pytest.raises(MixError, match=match):
        check_ct_schemes(cfg, mix, "m.json")


def test_experts_on_two_quantized_schemes_are_refused():
    cfg = Checkpoint(FIXTURES["tiny-moe"]).config
    mix = {"layers.0.experts": "int8", "layers.1.experts": "int4_g32_sym"}
    with pytest.raises(MixError, match="experts of different layers are quantized with different schemes"):
        check_ct_schemes(cfg, mix)


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_predicted_bytes_are_the_files_bytes(fixture, mixed):
    from gemmaquant.export.inspect import file_bits
    from gemmaquant.export.sizes import ct_tensor_nbytes, safetensors_size
    from gemmaquant.plan import make_plan
    from gemmaquant.recipe import Recipe

    out, schemes = mixed[fixture]
    cfg = Checkpoint(FIXTURES[fixture]).config
    predicted = safetensors_size(make_plan(cfg, Recipe(ct_schemes=schemes)))
    skel = CTSpace().skeleton(cfg)  # what the solver counts: its candidates' bytes are the exporter's
    for u in skel.units:
        assert all(b == ct_tensor_nbytes(u.name, u.shape, t) for t, (b, _) in u.options.items())
    solver_bytes = skel.fixed_bytes + sum(ct_tensor_nbytes(n, expected_shapes(cfg)[n], t) for n, t in schemes.items())
    got = file_bits(out)
    assert predicted["bytes"] == got["bytes"] == solver_bytes
    assert predicted["weights"] == got["weights"] == skel.weights


# ---- the command ----
def test_ct_mix_end_to_end(tmp_path):
    """A mix file through the whole command: GPTQ on each chosen grid, the export's modules packed in their scheme
    (bf16 ones plain), its bytes what the dry run predicts, the mix in the recipe; a resumed run with another mix
    is refused."""
    from gemmaquant.errors import GemmaquantError
    from gemmaquant.export.inspect import file_bits
    from gemmaquant.workflow import run_quantize

    mix = {"layers.0.self_attn.qkv": "int8", "layers.1.mlp.down_proj.weight": "bf16",
           "layers.2.self_attn.o_proj.weight": "int4_g64_sym", "layers.3.mlp.gate_up": "int8"}
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"ct_schemes": mix}))
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "gptq"\nn_samples = 4\nseq_len = 64\n')
    kw = dict(formats="safetensors", recipe_file=recipe, ct_mix=f, progress=False)
    dry = run_quantize("tiny-dense", dry_run=True, **kw)
    res = run_quantize("tiny-dense", out=tmp_path / "out", evaluate=False, **kw)
    out = res["files"]["safetensors"]
    assert file_bits(out)["bytes"] == dry["safetensors"]["bytes"]
    schemes = res["recipe"]["ct_schemes"]
    assert schemes["layers.0.self_attn.k_proj.weight"] == "int8" and schemes["layers.3.mlp.up_proj.weight"] == "int8"
    assert schemes["layers.5.mlp.down_proj.weight"] == "int4_g32_sym"  # not named: the recipe's grid
    from safetensors import safe_open

    with safe_open(f"{out}/model.safetensors", "pt") as st:
        keys = set(st.keys())
        k = expected_shapes(Checkpoint(FIXTURES["tiny-dense"]).config)["layers.2.self_attn.o_proj.weight"][-1]
        assert st.get_tensor("model.layers.2.self_attn.o_proj.weight_scale").shape[1] == k // 64
        assert st.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").shape[1] == 1
    assert "model.layers.1.mlp.down_proj.weight" in keys and "model.layers.1.mlp.down_proj.weight_packed" not in keys
    assert gemmaquant.load(out) is not None
    f.write_text(json.dumps({"ct_schemes": {**mix, "layers.4.mlp.down_proj.weight": "int8"}}))
    with pytest.raises(GemmaquantError, match="recipe"):
        run_quantize("tiny-dense", out=tmp_path / "out", evaluate=False, **kw)


@pytest.mark.parametrize("args, msg", [
    (["--format", "gguf", "--ct-mix", "MIX"], "has no GGUF file"),
    (["--format", "safetensors", "--ct-mix", "MIX", "--target-bpw", "8"], "exclude each other"),
    (["--format", "safetensors", "--target-bpw", "5"], "below the smallest compressed-tensors mix"),
    (["--format", "safetensors", "--target-bpw", "30"], "above the bf16 size"),
    (["--format", "safetensors", "--method", "awq", "--target-bpw", "8"], "AWQ"),
    (["--format", "safetensors", "--ct-mix", "BAD"], "layers.0.self_attn.qkv is split across schemes"),
    (["--format", "safetensors", "--ct-mix", "GGUF"], "a GGUF mix (tensor_types)"),
    (["--format", "gguf", "--target-bpw", "5", "--per-layer-experts"], "--per-layer-experts applies to a"),
])
def test_cli_bad_input(args, msg, tmp_path):
    from typer.testing import CliRunner

    from gemmaquant.cli import app

    files = {"MIX": {"ct_schemes": {"layers.0.self_attn.qkv": "int8"}},
             "BAD": {"layers.0.self_attn.q_proj.weight": "int8"},
             "GGUF": {"tensor_types": {"layers.0.mlp.down_proj.weight": "Q8_0"}}}
    for key, data in files.items():
        (tmp_path / key).write_text(json.dumps(data))
    args = [str(tmp_path / a) if a in files else a for a in args]
    r = CliRunner().invoke(app, ["quantize", "tiny-dense", "--dry-run", *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_mixed_export_runs_packed(fixture, mixed):
    """`gemmaquant eval` / `bench` run a mixed export packed (each module in its own scheme, bf16 ones float): the
    logits of the same export read back dequantized."""
    from gemmaquant import ops
    from gemmaquant.runtime import PackedLinear, load_for_inference

    out, schemes = mixed[fixture]
    run = load_for_inference(out, device="cpu")
    kinds = {(type(m.packed.fmt).__name__, getattr(m.packed.fmt, "group_size", None)) for m in run.modules()
             if isinstance(m, PackedLinear)}
    assert ("Int8Channel", None) in kinds and ("IntGroup", 32) in kinds
    ref = gemmaquant.load(out)
    ids = torch.arange(40, 90)[None]
    with torch.no_grad(), ops.use("reference"):
        want, got = ref(ids), run(ids)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_per_layer_experts_load_in_gemmaquant_and_are_refused_by_load_transformers(tmp_path):
    """--per-layer-experts: each layer's experts their own scheme (what vLLM loads): the export reads back with
    each layer in its scheme, vLLM's lookup gives each FusedMoE its own, and load_transformers refuses it (plain
    transformers would dequantize every layer's experts with the first experts group)."""
    from gemmaquant.export.compressed_tensors_reader import CompressedTensorsError

    src = FloatSource(FIXTURES["tiny-moe"])
    cfg = src.config
    schemes = {m: ("int8" if u == "layers.0.experts" else "int4_g32_sym") for u, ms in units_of(cfg).items()
               for m in ms}
    with pytest.raises(MixError, match="experts of different layers"):
        check_ct_schemes(cfg, schemes)
    assert check_ct_schemes(cfg, schemes, shared_experts=False) == schemes
    out = export_compressed_tensors(src, tmp_path / "ct", schemes=schemes)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert _vllm_moe_scheme(qc, "model.layers.0.moe.experts")["num_bits"] == 8
    assert _vllm_moe_scheme(qc, "model.layers.1.moe.experts")["num_bits"] == 4
    ours = gemmaquant.load(out).state_dict()
    w = Checkpoint(FIXTURES["tiny-moe"]).get("layers.0.experts.down_proj").float()
    from gemmaquant.formats import get_format

    fmt = get_format("int8")
    assert torch.equal(ours["layers.0.experts.down_proj"], torch.stack([fmt.dequantize(fmt.quantize(w[e]))
                                                                         for e in range(w.shape[0])]))
    with pytest.raises(CompressedTensorsError, match="experts are quantized with 2 schemes"):
        load_transformers(out)
