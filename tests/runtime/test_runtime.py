"""The packed quantized model (gemmaquant.runtime) against the float model built from the same dequantized weights:
equal logits through the torch references, the dispatcher really called (int4 / int8 matmul, MoE experts,
attention), incremental decoding equal to the full forward, and, in Triton's interpreter, the kernels' model-level
error within the parity rule's 2x of the references' error."""

import os

import pytest
import torch

import gemmaquant
from gemmaquant import ops
from gemmaquant.formats.base import Packed
from gemmaquant.model.gemma4 import Gemma4, KVCache
from gemmaquant.quantized import QuantizedSource
from gemmaquant.runtime import PackedExperts, PackedLinear, load_quantized

SMALL = dict(method="rtn", n_samples=2, seq_len=32, batch_size=2)


@pytest.fixture(scope="module")
def works(tmp_path_factory):
    """Quantizer work directories: {(fixture, format): path}."""
    out, made = tmp_path_factory.mktemp("runtime"), {}

    def get(fixture: str, fmt: str):
        if (fixture, fmt) not in made:
            r = gemmaquant.Recipe.from_dict({**SMALL, "weight_format": fmt})
            made[fixture, fmt] = gemmaquant.quantize(fixture, r, out=out / f"{fixture}-{fmt}", progress=False).work_dir
        return made[fixture, fmt]

    return get


def dequantized_model(work) -> Gemma4:
    src = QuantizedSource(work)
    m = Gemma4(src.config)
    m.load_state_dict(src.dequantized_state(), strict=False)  # the non-persistent RoPE buffers are built
    return m.eval()


def ids_for(cfg, T=48, B=2, seed=0):  # longer than the fixtures' window (32)
    return torch.randint(3, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture,fmt", [("tiny-moe", "int4_g32_sym"), ("tiny-moe", "int4_g32_asym"),
                                         ("tiny-moe", "int8"), ("tiny-edge", "int4_g32_sym"),
                                         ("tiny-moe", "int3_g32_sym"), ("tiny-dense", "Q4_0")])
def test_packed_model_equals_dequantized_float_model(works, fixture, fmt):
    work = works(fixture, fmt)
    ref = dequantized_model(work)
    run = load_quantized(work, dtype=torch.float32)
    ids = ids_for(ref.config)
    with torch.no_grad(), ops.use("reference"):
        want, got = ref(ids), run(ids)
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), err  # summation order only (attention, MoE accumulate)
    # and it is the quantized model, not the float one it was made from
    float_logits = gemmaquant.load(fixture)(ids).detach()
    assert (got - float_logits).abs().max().item() > 100 * max(err, 1e-6)


def test_weights_stay_packed(works):
    work = works("tiny-moe", "int4_g32_sym")
    run = load_quantized(work)
    src = QuantizedSource(work)
    quantized = {n.removesuffix(".weight") for n in src.names() if isinstance(src.get(n), Packed)}
    packed = {n for n, m in run.named_modules() if isinstance(m, PackedLinear)}
    assert quantized and packed == quantized
    experts = [m for m in run.modules() if isinstance(m, PackedExperts)]
    assert len(experts) == run.config.num_hidden_layers and all(e.kind == "int4" for e in experts)
    assert experts[0].gate_up_qdata.dtype == torch.uint8  # [E, 2*Ie, H / 2]: two codes a byte
    assert experts[0].gate_up_qdata.shape == (8, 256, 80)
    packed_bytes = sum(b.numel() * b.element_size() for b in run.buffers() if not b.is_floating_point())
    assert packed_bytes > 0 and not any(torch.nn.Linear is type(m) for n, m in run.named_modules()
                                        if n in quantized)


def test_every_hot_op_goes_through_the_dispatcher(works, monkeypatch):
    calls = {"int4_matmul": 0, "int8_matmul": 0, "moe_experts": 0, "attention": 0}
    for name in calls:
        real = getattr(ops, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, spy)
    run = load_quantized(works("tiny-moe", "int4_g32_sym"), dtype=torch.float32)
    with torch.no_grad():
        run(ids_for(run.config, T=8, B=1))
    L = run.config.num_hidden_layers
    assert calls["moe_experts"] == L and calls["attention"] == L
    assert calls["int4_matmul"] >= 5 * L and calls["int8_matmul"] == 0  # q, (k, v), o, gate, up, down per layer
    run8 = load_quantized(works("tiny-moe", "int8"), dtype=torch.float32)
    with torch.no_grad():
        run8(ids_for(run8.config, T=8, B=1))
    assert calls["int8_matmul"] >= 5 * L


@pytest.mark.parametrize("fixture", ["tiny-moe", "tiny-edge"])
def test_incremental_decoding_equals_full_forward(works, fixture):
    """The sliding layers' cache keeps W-1 keys, so the attention offsets must be right past the window."""
    run = load_quantized(works(fixture, "int4_g32_sym"), dtype=torch.float32)
    ids = ids_for(run.config, T=44, B=1)
    with torch.no_grad():
        full = run(ids)
        cache = KVCache(run.config)
        steps = [run(ids[:, :30], cache=cache)] + [run(ids[:, t:t + 1], cache=cache) for t in range(30, 44)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


def test_missing_tensor_is_named(works, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    work = tmp_path / "w"
    shutil.copytree(works("tiny-dense", "int4_g32_sym"), work)
    f = work / "globals.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    t = load_file(str(f))
    del t["norm.weight"]
    save_file(t, str(f), metadata=meta)
    with pytest.raises(ValueError, match="norm.weight"):
        load_quantized(work)


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("fmt", ["int4_g32_asym", "int8"])
def test_kernels_in_the_model_keep_the_parity_rule(works, fmt):
    """bf16 model on the Triton kernels vs the same model on the torch references, both against the fp32 model of the
    dequantized weights: the kernels' logit error is at most twice the references' (tests/kernels/parity.py)."""
    work = works("tiny-moe", fmt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    exact = dequantized_model(work).to(device)
    run = load_quantized(work, dtype=torch.bfloat16, device=device)
    ids = ids_for(exact.config, T=20, B=1).to(device)
    with torch.no_grad():
        truth = exact(ids).double()
        with ops.use("reference"):
            ref_err = (run(ids).double() - truth).abs().max().item()
        with ops.use("triton"):
            out = run(ids)
    kernel_err = (out.double() - truth).abs().max().item()
    assert torch.isfinite(out).all() and ref_err > 0
    assert kernel_err <= 2 * ref_err, f"kernels {kernel_err:.3g} vs references {ref_err:.3g}"


@pytest.mark.parametrize("fixture,fmt,scheme", [("tiny-moe", "int4_g32_sym", "W4A16"), ("tiny-edge", "int8", "W8A16")])
def test_compressed_tensors_export_runs_packed(works, tmp_path, fixture, fmt, scheme):
    """What vLLM users ship: the pack-quantized export, repacked for the kernels without rounding, gives the logits of
    the same export read back dequantized (gemmaquant.load), and `gemmaquant eval` runs it packed."""
    from gemmaquant.export import export_compressed_tensors
    from gemmaquant.runtime import CompressedTensorsSource, load_for_inference
    from gemmaquant.workflow import run_eval

    ct = tmp_path / "ct"
    export_compressed_tensors(QuantizedSource(works(fixture, fmt)), ct, scheme=scheme, group_size=32)
    run = load_for_inference(ct, device="cpu")
    assert isinstance(run.layers[0].self_attn.q_proj, PackedLinear)
    kinds = {type(m.packed.fmt).__name__ for m in run.modules() if isinstance(m, PackedLinear)}
    assert kinds == {"IntGroup" if scheme == "W4A16" else "Int8Channel"}
    ref = gemmaquant.load(ct)
    ids = ids_for(ref.config)
    with torch.no_grad(), ops.use("reference"):
        want, got = ref(ids), run(ids)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # the repacked codes are the work directory's own, bit for bit
    src = CompressedTensorsSource(ct)
    name = "layers.1.mlp.down_proj.weight"
    a, b = src.get(name), QuantizedSource(works(fixture, fmt)).get(name)
    assert all(torch.equal(a.data[k], b.data[k].to(a.data[k].dtype)) for k in a.data)
    res = run_eval(fixture, ct, n_seq=2, seq_len=32)
    assert 0 < res["kl_mean"] < 0.1
