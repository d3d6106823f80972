"""prepare_qat under FSDP2 (`torch.distributed.fsdp.fully_shard`), the way a model too large for one device trains:
two CPU processes (gloo) each hold half of every weight and its learnable scales, train on half of each batch, and
end where one process training on the whole batch ends; the distributed state-dict call (`get_model_state_dict`,
which reads every parametrized weight outside the forward pass) gathers a checkpoint that resumes sharded training
exactly (loaded before sharding, or with `set_model_state_dict` into the sharded model) and loads into an
unsharded prepared model, which converts to the same quantized model."""

import datetime

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from gemmaquant.config import TINY_VARIANTS
from gemmaquant.model.testing import random_model
from gemmaquant.qat import convert, prepare_qat

MOE = TINY_VARIANTS["tiny-26b-a4b"]
WORLD, STEPS = 2, 3
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def batch():
    return torch.randint(0, MOE.vocab_size, (2 * WORLD, 24), generator=torch.Generator().manual_seed(1))


def train(model, ids, steps=STEPS):
    """SGD on the mean squared logit (any loss will do): with FSDP the gradients are averaged over the ranks, so
    each rank's mean over its half of the batch gives the whole batch's gradient. Small steps: a straight-through
    step that flips a code turns a 1e-9 difference in the reduction order into a visible one."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    for _ in range(steps):
        opt.zero_grad()
        model(ids).float().pow(2).mean().backward()
        opt.step()


def prepared():
    model = random_model(MOE)
    prepare_qat(model, "int4_g32_sym", learnable_scales=True)
    return model


def sharded_worker(rank: int, init_file: str, out: str):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))  # a rank left waiting fails instead of hanging
    def sharded(state=None):
        model = prepared()
        if state is not None:
            model.load_state_dict(state, strict=True)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model, ids = sharded(), batch()[2 * rank:2 * rank + 2]
        local = model.layers[0].self_attn.q_proj.parametrizations.weight.original
        assert type(local).__name__ == "DTensor" and local.to_local().shape[0] * WORLD == local.shape[0]
        train(model, ids)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
        if rank == 0:
            save_file({k: v.contiguous().clone() for k, v in state.items()}, out)
        # resume mid-training: the gathered checkpoint loaded before sharding, or into the sharded model
        resumed, into_sharded = sharded(state), sharded()
        set_model_state_dict(into_sharded, state, options=StateDictOptions(full_state_dict=True))
        for other in (resumed, into_sharded):
            with torch.no_grad():
                assert torch.equal(other(ids), model(ids))
        for m in (model, resumed, into_sharded):
            train(m, ids, 1)
        with torch.no_grad():
            want = model(ids)
            assert torch.equal(resumed(ids), want) and torch.equal(into_sharded(ids), want), "training continues alike"
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_qat_trains_and_checkpoints_like_one_process(tmp_path):
    out = tmp_path / "fsdp.safetensors"
    mp.start_processes(sharded_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    ref = prepared()
    train(ref, batch())
    want = ref.state_dict()
    got = load_file(str(out))
    assert set(got) == set(want)
    assert [k for k in got if k.endswith("_qat_scale")]  # the learnable scales, sharded and gathered too
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=k)
    start = prepared().state_dict()
    for kind in ("_qat_scale", "proj.weight"):  # both moved, by far more than the tolerance
        assert max(float((v - start[k]).abs().max()) for k, v in want.items() if k.endswith(kind)) > 2e-5, kind
    again = prepared()
    again.load_state_dict(got, strict=True)
    ids = batch()
    with torch.no_grad():
        a, b = again(ids), ref(ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    packed_a, packed_b = convert(again), convert(ref)
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    pairs = [(a, b) for n in packed_b for a, b in zip(as_list(packed_a[n]), as_list(packed_b[n]))]
    differ = sum(int((a.data["qdata"] != b.data["qdata"]).sum()) for a, b in pairs)
    total = sum(b.data["qdata"].numel() for _, b in pairs)
    assert differ <= 1e-4 * total, f"{differ} of {total} packed bytes differ"  # rounding-order ties at most
