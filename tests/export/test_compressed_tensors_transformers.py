"""transformers (with compressed-tensors installed) loads the compressed-tensors export on CPU: the weights it ends up
with are our dequantized weights, and its logits equal our dequantized model's.

Two consumer facts the test models exactly instead of loosening a tolerance:
  * dense layers: transformers holds the scales in the load dtype (float32 here), so w = q * scale is exact;
  * experts: transformers' `CompressedTensorsDequantize` multiplies in the checkpoint's scale dtype (bf16) and
    leaves the fused expert parameters in bf16 even when loading in float32, so its experts are our experts
    rounded to bf16. The logits are compared with the experts cast back to float32 on both sides.
"""

from __future__ import annotations

import pytest
import torch

import gemmaquant
from gemmaquant.export import FloatSource, export_compressed_tensors
from gemmaquant.export.compressed_tensors_reader import register_transformers_gemma4_experts
from gemmaquant.fixtures import FIXTURES

TOL = 1e-4  # tests/model/test_parity_hf.py: our reference vs transformers, fp32


@pytest.mark.parametrize("fixture", list(FIXTURES))
@pytest.mark.parametrize("scheme", ["W4A16", "W8A16"])
def test_transformers_loads_export(fixture, scheme, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_compressed_tensors(FloatSource(FIXTURES[fixture]), tmp_path / "ct", scheme=scheme)
    register_transformers_gemma4_experts()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
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
