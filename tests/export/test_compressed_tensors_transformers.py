"""transformers (with compressed-tensors installed) loads the compressed-tensors export on CPU: the weights it ends up
with are our dequantized weights, and its logits equal our dequantized model's. A dense export loads with plain
`AutoModelForCausalLM.from_pretrained(dir)`; an MoE export with `gemmaquant.export.load_transformers(dir)` (plain
transformers has no merge of per-expert names into Gemma 4's fused experts: it leaves them random with a warning,
which the canary below pins), which fails loudly on any weight transformers did not load.

Two consumer facts the test models exactly instead of loosening a tolerance:
  * dense layers: transformers holds the scales in the load dtype (float32 here), so w = q * scale is exact;
  * experts: transformers' `CompressedTensorsDequantize` multiplies in the checkpoint's scale dtype (bf16) and
    leaves the fused expert parameters in bf16 even when loading in float32, so its experts are our experts
    rounded to bf16. The logits are compared with the experts cast back to float32 on both sides.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmaquant
from gemmaquant.export import FloatSource, export_compressed_tensors, load_transformers
from gemmaquant.export.compressed_tensors_reader import CompressedTensorsError
from gemmaquant.fixtures import FIXTURES

TOL = 1e-4  # tests/model/test_parity_hf.py: our reference vs transformers, fp32


@pytest.mark.parametrize("fixture", list(FIXTURES))
@pytest.mark.parametrize("scheme", ["W4A16", "W8A16"])
def test_transformers_loads_export(fixture, scheme, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_compressed_tensors(FloatSource(FIXTURES[fixture]), tmp_path / "ct", scheme=scheme)
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    moe = json.loads((out / "config.json").read_text()).get("enable_moe_block")
    hf = (load_transformers(out, **kw) if moe else AutoModelForCausalLM.from_pretrained(out, **kw)).eval()
    ours = gemmaquant.load(out)
    ids = torch.arange(40, 90)[None]  # 50 tokens: longer than the fixtures' 32-token sliding window
    with torch.no_grad():
        hf(ids[:, :2])  # compressed-tensors decompresses dense layers on the first forward
        theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
        for name, w in ours.state_dict().items():
            if ".experts." in name:
                assert theirs[name].dtype == torch.bfloat16
                assert torch.equal(theirs[name], w.to(torch.bfloat16)), name
                w.copy_(w.to(torch.bfloat16).float())
            elif name in theirs:
                assert torch.equal(theirs[name].float(), w), name
        for m in hf.modules():  # the bf16 expert parameters, for an fp32 forward like ours
            if type(m).__name__ == "Gemma4TextExperts":
                m.gate_up_proj.data, m.down_proj.data = m.gate_up_proj.float(), m.down_proj.float()
        err = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"{fixture} {scheme}: max |transformers - gemmaquant| = {err:.2e}")
    assert err <= TOL, f"{fixture} {scheme}: max |transformers - gemmaquant| = {err:.3g}"


@pytest.fixture(scope="module")
def moe_export(tmp_path_factory):
    return export_compressed_tensors(FloatSource(FIXTURES["tiny-moe"]), tmp_path_factory.mktemp("moe") / "ct")


def test_canary_plain_transformers_cannot_load_gemma4_experts_yet(moe_export):
    """When this fails, transformers merges per-expert names into Gemma 4's fused experts by itself: say in the
    README that a plain from_pretrained loads an MoE export."""
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    assert get_checkpoint_conversion_mapping("gemma4_text") is None  # load_transformers leaves no mapping behind
    _, info = AutoModelForCausalLM.from_pretrained(moe_export, output_loading_info=True)
    assert {k.split(".experts.")[1] for k in info["missing_keys"] if ".experts." in k} == {"gate_up_proj", "down_proj"}


def test_load_transformers_refuses_an_export_missing_expert_tensors(moe_export, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(moe_export, broken)
    f = broken / "model.safetensors"
    t = {k: v for k, v in load_file(f).items() if ".layers.1.experts." not in k or "down_proj" not in k}
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CompressedTensorsError, match=r"missing keys \(1\): model\.layers\.1\.experts\.down_proj"):
        load_transformers(broken)


def test_export_readme_tells_transformers_users_how_to_load(moe_export, tmp_path):
    """The directory's README.md (what a Hugging Face user reads first) names the loader an MoE export needs, and the
    plain from_pretrained for a dense one; its scheme lines come from config.json's quantization_config."""
    card = (moe_export / "README.md").read_text()
    assert "load_transformers" in card and "randomly initialised" in card
    assert "int4 symmetric, group of 32, targets `Linear`" in card
    dense = export_compressed_tensors(FloatSource(FIXTURES["tiny-dense"]), tmp_path / "dense", scheme="W8A16")
    card = (dense / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card and "load_transformers" not in card
    assert "int8 symmetric, per channel" in card
