"""gguf_mix_plan reproduces llama-quantize's per-tensor type choices for Gemma 4.

The default tests pin the facts GEMMA4_SPEC.md §3.4 states for the released shapes; the llamacpp-marked test runs
the real `llama-quantize --dry-run` on GGUFs of the tiny fixtures and of two synthetic configs with real-shaped rows
(ne0 = 2112 and 704 as in 26B-A4B, a PLE table whose rows are a multiple of 256) and compares every tensor.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from gemmaquant.config import SLIDING, FULL, VARIANTS, Gemma4Config
from gemmaquant.export.gguf_mix import MixError, check_tensor_types, fallback, gguf_mix_choices, gguf_mix_plan
from gemmaquant.export.gguf_names import gguf_name

MIXES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS",
         "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q2_K"]


def test_26b_a4b_q4_k_m_facts():
    p = gguf_mix_plan(VARIANTS["26b-a4b"], "Q4_K_M")
    assert p["embed_tokens.weight"] == "Q6_K"  # tied: TOKEN_EMBD gets the output-tensor rule
    assert p["layers.0.router.proj.weight"] == "F32" and p["layers.0.router.per_expert_scale"] == "F32"
    assert p["layers.0.layer_scalar"] == "F32" and p["layers.0.input_layernorm.weight"] == "F32"
    # ne0 = 2112 / 704 are not multiples of 256: Q6_K (more-bits layer) -> Q8_0, Q4_K -> Q5_0
    assert p["layers.0.mlp.down_proj.weight"] == "Q8_0" and p["layers.0.experts.down_proj"] == "Q8_0"
    assert p["layers.4.mlp.down_proj.weight"] == "Q5_0" and p["layers.4.experts.down_proj"] == "Q5_0"
    assert p["layers.4.experts.gate_up_proj"] == "Q4_K" and p["layers.4.self_attn.q_proj.weight"] == "Q4_K"
    assert "layers.5.self_attn.v_proj.weight" not in p  # k_eq_v full layer: no attn_v, not counted
    assert p["layers.0.self_attn.v_proj.weight"] == "Q6_K"


def test_iq4_mixes_on_the_released_shapes():
    p = gguf_mix_plan(VARIANTS["26b-a4b"], "IQ4_XS")
    assert p["layers.4.experts.down_proj"] == "IQ4_NL" and p["layers.4.mlp.down_proj.weight"] == "IQ4_NL"
    assert p["layers.0.experts.down_proj"] == "Q5_1"  # first n_layer/8 ffn_down: Q5_K, whose 256-block falls back
    assert p["layers.4.experts.gate_up_proj"] == "IQ4_XS" and p["embed_tokens.weight"] == "Q6_K"
    assert p["layers.0.self_attn.v_proj.weight"] == "IQ4_XS"  # n_gqa = 16 / 8 = 2
    e4b = gguf_mix_plan(VARIANTS["e4b"], "IQ4_NL")
    assert e4b["layers.0.self_attn.v_proj.weight"] == "Q5_K"  # n_gqa = 8 / 2 = 4
    assert e4b["layers.4.mlp.down_proj.weight"] == "Q5_K"  # the first 42 // 8 = 5 layers
    assert e4b["layers.5.mlp.down_proj.weight"] == "IQ4_NL"
    assert fallback("IQ4_XS", 704) == "IQ4_NL" and fallback("IQ4_XS", 48) == "F16"


def test_choices_name_the_rule_and_the_fallback():
    c = gguf_mix_choices(VARIANTS["26b-a4b"], "Q4_K_M")
    assert c["layers.4.experts.down_proj"] == ("Q5_0", "row of 704: 704 % 256 = 192, Q4_K impossible -> Q5_0")
    assert c["layers.0.experts.down_proj"] == ("Q8_0", "ffn_down of a use_more_bits layer -> Q6_K; row of 704: "
                                                       "704 % 256 = 192, Q6_K impossible -> Q8_0")
    assert c["layers.4.experts.gate_up_proj"] == ("Q4_K", "")
    assert {n: t for n, (t, _) in c.items()} == gguf_mix_plan(VARIANTS["26b-a4b"], "Q4_K_M")


def test_bad_types_and_tensors_in_a_mix_are_named():
    cfg = VARIANTS["26b-a4b"]
    ok = check_tensor_types(cfg, {"blk.3.ffn_down_exps.weight": "iq4_nl", "layers.3.self_attn.q_proj.weight": "Q4_K"})
    assert ok == {"layers.3.experts.down_proj": "IQ4_NL", "layers.3.self_attn.q_proj.weight": "Q4_K"}
    with pytest.raises(MixError, match=r"mix.json: unknown type 'Q7_K' for tensor 'blk.3.attn_q.weight'; valid: "):
        check_tensor_types(cfg, {"blk.3.attn_q.weight": "Q7_K"}, source="mix.json")
    with pytest.raises(MixError, match=r"mix: tensor 'blk.99.attn_q.weight' does not exist in this model"):
        check_tensor_types(cfg, {"blk.99.attn_q.weight": "Q4_K"})
    with pytest.raises(MixError, match=r"rows of 704, not a multiple of IQ4_XS's 256-element block \(704 % 256 = 192"):
        check_tensor_types(cfg, {"layers.3.experts.down_proj": "IQ4_XS"})
    with pytest.raises(MixError, match="unknown GGUF type or mix 'IQ2_XXS'"):
        gguf_mix_plan(cfg, "IQ2_XXS")


def test_e2b_ple_tables():
    p = gguf_mix_plan(VARIANTS["e2b"], "Q4_K_M")
    assert p["embed_tokens_per_layer.weight"] == "Q6_K"  # category TOKEN_EMBD, tied -> output rule
    assert p["per_layer_model_projection.weight"] == "BF16"  # never requantized: keeps the converter's type
    assert gguf_mix_plan(VARIANTS["e2b"], "Q4_K_M", keep_type="F16")["per_layer_model_projection.weight"] == "F16"
    assert p["layers.20.self_attn.q_proj.weight"] == "Q4_K" and "layers.20.self_attn.k_proj.weight" not in p


def test_float_types_and_aliases():
    cfg = VARIANTS["31b"]
    assert set(gguf_mix_plan(cfg, "F16").values()) == {"F16", "F32"}
    assert gguf_mix_plan(cfg, "q4_k") == gguf_mix_plan(cfg, "Q4_K_M")
    assert gguf_mix_plan(cfg, "q3_k") == gguf_mix_plan(cfg, "Q3_K_M")
    with pytest.raises(MixError, match="Q2_K_S"):
        gguf_mix_plan(cfg, "Q2_K_S")


def test_fallbacks():
    assert fallback("Q4_K", 2112) == "Q5_0" and fallback("Q5_K", 704) == "Q5_1" and fallback("Q6_K", 704) == "Q8_0"
    assert fallback("Q4_K", 256) == "Q4_K" and fallback("Q4_0", 48) == "F16" and fallback("Q6_K", 16) == "F16"


# ---------------------------------------------------------------------------------------------------------
# against llama-quantize itself

def _synthetic(kind: str) -> Gemma4Config:
    common = dict(vocab_size=512, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, head_dim=64,
                  global_head_dim=128, sliding_window=16, final_logit_softcapping=30.0,
                  layer_types=(SLIDING, SLIDING, SLIDING, FULL) * 2, max_position_embeddings=1024)
    if kind == "moe-rows":  # 26B-A4B's row lengths: ffn_down 2112, ffn_down_exps 704
        return Gemma4Config(**common, intermediate_size=2112, num_key_value_heads=2, num_global_key_value_heads=1,
                            attention_k_eq_v=True, hidden_size_per_layer_input=0, enable_moe_block=True,
                            num_experts=4, top_k_experts=2, moe_intermediate_size=704)
    common["layer_types"] = (SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL, SLIDING, FULL)  # producers (S, F)
    return Gemma4Config(**common, intermediate_size=512, num_key_value_heads=1, hidden_size_per_layer_input=32,
                        vocab_size_per_layer_input=512, num_kv_shared_layers=2, use_double_wide_mlp=True)


def _dry_run(bin_dir, gguf_path, mix) -> dict[str, str]:
    out = subprocess.run([str(bin_dir / "llama-quantize"), "--dry-run", str(gguf_path), mix],
                         capture_output=True, text=True, check=True)
    types = {}
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s+(\w+),.*?(?:\((\w+)\))?$", line.strip())
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return types


@pytest.fixture(scope="module")
def plan_cases(tmp_path_factory, llama_cpp, small_tokenizer_dir):
    from gemmaquant.checkpoint import save_checkpoint
    from gemmaquant.export import FloatSource, export_gguf
    from gemmaquant.fixtures import FIXTURES
    from gemmaquant.model.testing import random_model

    out = tmp_path_factory.mktemp("mix")
    cases = {}
    for name, path in FIXTURES.items():
        cases[name] = export_gguf(FloatSource(path), out / f"{name}.gguf", type="F32")
    for kind in ("moe-rows", "ple-rows"):
        ckpt = save_checkpoint(random_model(_synthetic(kind)), out / kind, dtype=torch.bfloat16,
                               tokenizer_dir=small_tokenizer_dir)
        cases[kind] = export_gguf(FloatSource(ckpt), out / f"{kind}.gguf", type="F32")
    return cases


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", ["tiny-dense", "tiny-moe", "tiny-edge", "moe-rows", "ple-rows"])
def test_plan_equals_llama_quantize(case, plan_cases, llama_cpp):
    from gemmaquant.export.gguf_reader import read_config
    import gguf

    cfg = read_config(gguf.GGUFReader(str(plan_cases[case])))
    for mix in MIXES:
        want = _dry_run(llama_cpp.bin, plan_cases[case], mix)
        got = {gguf_name(n): t for n, t in gguf_mix_plan(cfg, mix, keep_type="F32").items()}
        want.pop("rope_freqs.weight")
        diff = {g: (got.get(g), want.get(g)) for g in set(got) | set(want) if got.get(g) != want.get(g)}
        assert not diff, f"{case} {mix}: (ours, llama-quantize) differ for {sorted(diff.items())[:6]}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("mix", ["IQ4_NL", "IQ4_XS", "Q3_K_M", "Q2_K"])
def test_rtn_export_bytes_equal_llama_quantize(mix, plan_cases, llama_cpp, tmp_path):
    """The whole file: `export_gguf(..., type=mix)` (round-to-nearest) against `llama-quantize f32.gguf out mix`,
    tensor by tensor, on the MoE fixture and on 26B-A4B's row lengths: same types, same bytes."""
    import gguf
    import numpy as np

    from gemmaquant.export import FloatSource, export_gguf
    from gemmaquant.export.gguf_reader import read_config
    from gemmaquant.fixtures import FIXTURES

    for case in ("tiny-moe", "moe-rows"):
        src = plan_cases[case]
        ref_path = tmp_path / f"{case}-{mix}-llama.gguf"
        subprocess.run([str(llama_cpp.bin / "llama-quantize"), str(src), str(ref_path), mix], capture_output=True,
                       text=True, check=True)
        cfg = read_config(gguf.GGUFReader(str(src)))
        ckpt = FIXTURES[case] if case in FIXTURES else src.parent / case  # what plan_cases converted to F32
        ours = export_gguf(FloatSource(ckpt), tmp_path / f"{case}-{mix}.gguf", type=mix)
        want = {t.name: t for t in gguf.GGUFReader(str(ref_path)).tensors}
        plan = {gguf_name(n): t for n, t in gguf_mix_plan(cfg, mix, keep_type="F32").items()}
        compared = 0
        for t in gguf.GGUFReader(str(ours)).tensors:
            if t.name not in plan or plan[t.name] in ("F32", "F16", "BF16"):
                continue
            ref = want[t.name]
            assert t.tensor_type == ref.tensor_type, t.name
            assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(ref.data).view(np.uint8)), \
                f"{case} {mix}: {t.name} ({gguf.GGMLQuantizationType(t.tensor_type).name}) differs from llama-quantize"
            compared += 1
        assert compared > 0
