"""Deferred (meta-device) initialisation: every task's modules come out of `setup` with exactly the
values an eager CPU build of the same seed gives (supervised, ConvNeXt with its EMA, fine-tuning from an
export with the head mapped by wnid, DINOv2 with its teacher and loss centres), the RNG stream continues
as after the eager build, and a 2-rank FSDP2 build never holds the whole model on either host."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.train.test_finetune import RESOLUTION_CHANGE, pretrained  # noqa: F401  (fixture)
from tests.train.test_loop import world1  # noqa: F401  (fixture)
from vfm.recipes import load_recipe
from vfm.recipes.derive import resolve_stage
from vfm.tasks import task_for
from vfm.train import meta_init
from vfm.train.setup import setup
from vfm.train.task import TaskContext


def _state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in modules.items():
        for k, v in list(m.named_parameters()) + list(m.named_buffers()):
            out[f"{name}.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def _both(recipe_id: str, stage: str, data: str, sets: list[str], *, init: str | None = None,
          head_from_wnids: bool = False) -> tuple[dict, dict]:
    """The task's modules built eagerly on the CPU, and deferred through the trainer's `setup`."""
    recipe = load_recipe(recipe_id, ["hardware.gpus=1", *sets], profile="smoke")
    kind = task_for(recipe, stage)
    states = []
    for deferred in (False, True):
        task = kind.task_class()(data, num_workers=0, **({"head_from_wnids": True} if head_from_wnids else {}))
        resolved = resolve_stage(recipe, stage, 1, task.num_samples,
                                 num_classes=None if kind.headless else len(task.manifest.classes))
        torch.manual_seed(7)  # setup seeds with its `seed` itself
        if deferred:
            setup(task, resolved, device=torch.device("cpu"), rank=0, seed=7, init=init)
        else:
            task.build(TaskContext(stage=resolved, device=torch.device("cpu"), rank=0, seed=7, init=init))
        states.append(_state(task.modules()))
    return states[0], states[1]


@pytest.mark.parametrize(("recipe_id", "sets"), [
    ("vit-huge-pretrain", ["stages.pretrain.parallelism=fsdp"]),
    ("convnext-xl", ["stages.pretrain.parallelism=ddp", "stages.pretrain.ema=0.999"]),
    ("dinov2-giant", ["stages.pretrain.parallelism=fsdp"]),
])
def test_deferred_build_gives_the_eager_values(world1, shards, recipe_id, sets):  # noqa: F811
    eager, deferred = _both(recipe_id, "pretrain", shards, sets)
    assert eager.keys() == deferred.keys() and len(eager) > 10
    bad = [k for k in eager if not torch.equal(eager[k], deferred[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"
    if recipe_id == "dinov2-giant":  # the teacher starts as the student
        assert all(torch.equal(v, deferred["teacher." + k[len("student."):]])
                   for k, v in deferred.items() if k.startswith("student."))


@pytest.mark.parametrize("pretrained", ["vit-huge"], indirect=True)
def test_deferred_fine_tune_loads_the_export_and_maps_the_head(world1, pretrained, shards5):  # noqa: F811
    _, export = pretrained
    eager, deferred = _both("vit-huge", "finetune", shards5, RESOLUTION_CHANGE["vit-huge"] +
                            ["stages.finetune.parallelism=fsdp"], init=export, head_from_wnids=True)
    bad = [k for k in eager if not torch.equal(eager[k], deferred[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


def test_replay_holds_storages_one_at_a_time_and_rejects_unrecorded_tensors():
    import timm

    torch.manual_seed(0)
    timm.create_model("vit_small_patch16_224", num_classes=10)
    eager_next = torch.rand(4)
    torch.manual_seed(0)
    with meta_init.record() as tape, torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224", num_classes=10)
    wanted = meta_init.targets({"m": model})
    model.to_empty(device="cpu")
    peak = meta_init.materialize(tape, wanted)
    assert torch.equal(torch.rand(4), eager_next)  # the RNG stream goes on as after the eager build
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peak <= 2 * largest < full / 10, (peak, largest, full)

    with meta_init.record() as tape, torch.device("meta"):
        inside = nn.Linear(4, 4)
    outside = nn.Linear(4, 4, device="meta")  # built after the recording ended
    wanted = meta_init.targets({"inside": inside, "outside": outside})
    with pytest.raises(RuntimeError, match=r"2 tensors were not built inside the recorded block.*weight"):
        meta_init.materialize(tape, wanted)


def test_two_rank_fsdp_build_stays_below_the_model_size_per_host(tmp_path):
    """Peak resident memory of each rank over the build stays below the full model's bytes, and an eager
    build of the same model afterwards does raise it by the full size (so the probe sees a full build)."""
    out = tmp_path / "memory.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "tests.helpers.meta_memory", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                  "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"memory.json.{rank}").read_text())
        assert r["deferred_growth"] < 0.75 * r["model_bytes"], r
        assert r["eager_growth"] > 0.9 * r["model_bytes"], r


def test_modules_built_for_real_keep_their_values_and_mixed_ones_are_refused(world1, tmp_path):  # noqa: F811
    from tests.helpers.training import MemoryTask

    recipe = load_recipe("vit-huge-pretrain", ["hardware.gpus=1"], profile="smoke")
    stage = resolve_stage(recipe, "pretrain", 1, 64)

    class Eager(MemoryTask):  # ignores init_device: its model is real when setup sees it
        def build(self, ctx):
            super().build(ctx)
            torch.manual_seed(3)
            from vfm.models import build_model

            self.model = build_model(ctx.recipe, ctx.stage.name, num_classes=4, device=ctx.device)

    task = Eager()
    setup(task, stage, device=torch.device("cpu"), rank=0, seed=0)
    torch.manual_seed(3)
    from vfm.models import build_model

    want = _state({"m": build_model(recipe, "pretrain", num_classes=4)})
    got = _state({"m": task.model})  # sharded by FSDP2 (the smoke recipe's parallelism), gathered here
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # not wiped by to_empty

    with meta_init.record(), torch.device("meta"):
        mixed = nn.Sequential(nn.Linear(2, 2))
    mixed.add_module("real", nn.Linear(2, 2, device="cpu"))
    with pytest.raises(ValueError, match=r"module 'mixed' mixes meta and real tensors \(real: \['real.bias'"):
        meta_init.targets({"mixed": mixed})
