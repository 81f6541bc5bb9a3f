"""The loop in-process (a world of one on gloo): accumulation equivalence under no wrapper / DDP /
FSDP2, the NaN stop, and a run through the Task protocol alone (the contract the DINOv2 task uses)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.helpers.training import MemoryTask, learnable_set
from vfm.models import build_model
from vfm.recipes import load_recipe
from vfm.recipes.derive import resolve_stage
from vfm.train.loop import Batches, RunSpec, TrainingDiverged, train, train_step
from vfm.train.optim import build_optimizer, param_groups
from vfm.train.parallel import wrap


@pytest.fixture
def world1(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting other processes
    yield
    torch.set_num_threads(threads)
    dist.destroy_process_group()


class _CE:
    def loss(self, model, batch, step):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y), {}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _updated(parallelism: str, micro: int, accum: int, steps: int = 2):
    """(parameters, gradients of the last update) after `steps` updates of `micro` × `accum` samples."""
    # AdamW's eps well above float noise: gradients that are zero in exact arithmetic (the key bias of
    # attention) are ±1e-9 noise, which eps=1e-8 would normalise into full ±lr steps
    r = load_recipe("vit-huge-pretrain", ["hardware.gpus=1", "stages.pretrain.drop_path=0",
                                          "stages.pretrain.optim.eps=1e-4"], profile="smoke")
    o = r.stages["pretrain"].optim
    torch.manual_seed(0)
    bare = build_model(r, "pretrain", num_classes=4)
    model = wrap(bare, parallelism, torch.device("cpu")) if parallelism != "none" else bare
    opt = build_optimizer(param_groups(model, o), o, peak_lr=1e-3, device=torch.device("cpu"))
    x, y = learnable_set(n=8 * steps)
    batches = Batches([(x[i:i + micro], y[i:i + micro]) for i in range(0, len(x), micro)])
    for step in range(steps):
        train_step(model, _CE(), opt, batches, step=step, accum=accum, device=torch.device("cpu"),
                   precision="fp32", clip=None, scaler=None)
    params = {k: _full(v) for k, v in bare.named_parameters()}
    return params, {k: _full(v.grad) for k, v in bare.named_parameters()}


@pytest.mark.parametrize("parallelism", ["none", "ddp", "fsdp"])
def test_accumulated_micro_batches_give_the_update_of_one_big_batch(world1, parallelism):
    big, big_grads = _updated(parallelism, micro=8, accum=1)
    small, small_grads = _updated(parallelism, micro=2, accum=4)
    torch.manual_seed(0)
    before = build_model(load_recipe("vit-huge-pretrain", ["hardware.gpus=1"], profile="smoke"), "pretrain",
                         num_classes=4).state_dict()
    assert not torch.equal(big["head.weight"], before["head.weight"])  # it did update
    for k in big:
        # the gradient is the mean over the whole batch (not a sum of micro-means) ...
        torch.testing.assert_close(small_grads[k], big_grads[k], rtol=1e-4, atol=1e-6, msg=k)
        # ... and so are the updated parameters
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


def _spec(tmp_path, *sets: str, **kw) -> RunSpec:
    r = load_recipe("vit-huge-pretrain", ["hardware.gpus=1", "stages.pretrain.parallelism=ddp", *sets],
                    profile="smoke")
    stage = resolve_stage(r, "pretrain", world_size=1, num_samples=len(learnable_set()[0]))
    return RunSpec(stage=stage, out=str(tmp_path / "run"), deterministic=True, log_every=1, **kw)


def test_nan_loss_stops_naming_the_step_and_keeps_earlier_checkpoints(world1, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 6 .*checkpoint"):
        train(MemoryTask(nan_at=6), _spec(tmp_path, "stages.pretrain.checkpoint_every_steps=4"))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000004"]


def test_protocol_task_trains_resumes_exactly_and_exports(world1, tmp_path):
    """Through the Task protocol alone: stop at 6 of 12 (checkpoint at 4 and 6), continue, compare."""
    straight = train(MemoryTask(), _spec(tmp_path / "a", "stages.pretrain.checkpoint_every_steps=3"))
    assert straight.step == 12 and sum(straight.losses[-3:]) < sum(straight.losses[:3])
    first = train(MemoryTask(), _spec(tmp_path / "b", "stages.pretrain.checkpoint_every_steps=3", max_steps=7))
    assert first.step == 7
    # the restarted process resumes from the newest complete checkpoint (step 7) and finishes
    rest = train(MemoryTask(), _spec(tmp_path / "b", "stages.pretrain.checkpoint_every_steps=3"))
    assert rest.step == 12 and rest.losses == straight.losses[7:]
    a = torch.load(tmp_path / "a" / "run" / "export" / "weights.pt")
    b = torch.load(tmp_path / "b" / "run" / "export" / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a restart after the end only re-exports
    again = train(MemoryTask(), _spec(tmp_path / "b", "stages.pretrain.checkpoint_every_steps=3"))
    assert again.step == 12 and again.losses == []


@pytest.mark.parametrize(("parallelism", "precision", "extra"), [
    ("ddp", "bf16", "stages.pretrain.activation_checkpointing=true"),
    ("fsdp", "fp16", "stages.pretrain.optim.clip_grad=1.0"),  # sharded grad scaler
])
def test_precisions_and_switches_train(world1, tmp_path, parallelism, precision, extra):
    spec = _spec(tmp_path, f"stages.pretrain.parallelism={parallelism}", f"stages.pretrain.precision={precision}",
                 extra, "stages.pretrain.steps=6")
    result = train(MemoryTask(), spec)
    assert result.step == 6 and all(v == v for v in result.losses)
    assert sum(result.losses[-2:]) < sum(result.losses[:2])


def test_checkpoints_and_export_on_s3_resume(world1, tmp_path, bucket, s3_endpoint, monkeypatch):
    from vfm.export import load_export
    from vfm.storage import s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    spec = _spec(tmp_path, "stages.pretrain.steps=6", max_steps=4)
    spec.out = f"s3://{bucket}/runs/a"
    assert train(MemoryTask(), spec).step == 4
    spec.max_steps = None
    assert len(train(MemoryTask(), spec).losses) == 2  # resumed at 4 of 6 from S3
    keys = {o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket, Prefix="runs/a/")["Contents"]}
    assert "runs/a/checkpoints/step-000006/COMPLETE" in keys and "runs/a/export/weights.pt" in keys
    _, meta = load_export(f"s3://{bucket}/runs/a/export")
    assert meta.step == 6


def test_fsdp2_gathers_bf16_parameters_and_reduces_fp32_gradients(world1):
    """torchtitan's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on bf16 stages: the blocks
    compute with bf16 weights while the sharded fp32 master weights and their gradients stay fp32."""
    from vfm.train.parallel import shard, sharding

    r = load_recipe("vit-huge-pretrain", ["hardware.gpus=1"], profile="smoke")
    how = sharding("fsdp", "bf16", torch.device("cpu"), world_size=1, shard_size=None)
    assert (how.mp.param_dtype, how.mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert sharding("fsdp", "fp32", torch.device("cpu"), world_size=1, shard_size=None).mp is None
    model = shard(build_model(r, "pretrain", num_classes=4), how)
    seen = []
    model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    x, y = learnable_set(n=4)
    nn.functional.cross_entropy(model(x).float(), y).backward()
    assert seen == [torch.bfloat16]
    w = model.blocks[0].attn.qkv.weight
    assert w.dtype == torch.float32 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("asynchronous", [False, True])
def test_resume_through_s3_is_bit_exact_with_direct_and_async_checkpoints(world1, tmp_path, bucket, s3_endpoint,
                                                                          monkeypatch, asynchronous):
    """Every rank writes its shards straight to S3 and reads back its own byte ranges (no staging); with
    async_checkpoint the periodic saves are written in the background while training goes on."""
    from vfm import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    sets = ("stages.pretrain.checkpoint_every_steps=3", f"stages.pretrain.async_checkpoint={asynchronous}")
    straight = train(MemoryTask(), _spec(tmp_path / "a", *sets))
    spec = _spec(tmp_path / "b", *sets, max_steps=7)
    spec.out = f"s3://{bucket}/runs/async-{asynchronous}"
    first = train(MemoryTask(), spec)
    assert first.losses == straight.losses[:7]
    # the run's last save (step 7, written before it ended) goes: the resume starts from step 6, a
    # periodic save, written in the background under async_checkpoint while steps 7 ran
    storage.delete_prefix(f"{spec.out}/checkpoints/step-000007")
    spec.max_steps = None
    rest = train(MemoryTask(), spec)
    assert rest.losses == straight.losses[6:]
    keys = set(storage.list_prefix(f"{spec.out}/checkpoints"))
    assert f"{spec.out}/checkpoints/step-000012/COMPLETE" in keys
    assert any(k.endswith(".distcp") for k in keys) and f"{spec.out}/checkpoints/step-000012/.metadata" in keys
