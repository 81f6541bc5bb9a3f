"""`compile` and `channels_last` are recipe switches that change speed, not results: a few updates of the
ConvNeXt smoke recipe on CPU give the eager run's losses (inductor compiles each block on CPU here)."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_loop import world1  # noqa: F401  (fixture)
from vfm.recipes import load_recipe
from vfm.recipes.derive import resolve_stage
from vfm.tasks import task_for
from vfm.train.loop import Batches, train_step
from vfm.train.setup import setup


def _losses(manifest: str, *sets: str, steps: int = 3) -> list[float]:
    recipe = load_recipe("convnext-xl", ["hardware.gpus=1", "stages.pretrain.drop_path=0",
                                         "stages.pretrain.data.augment.random_erase=0", *sets], profile="smoke")
    task = task_for(recipe, "pretrain").task_class()(manifest, num_workers=0)
    stage = resolve_stage(recipe, "pretrain", 1, task.num_samples, num_classes=len(task.manifest.classes))
    t = setup(task, stage, device=torch.device("cpu"), rank=0, seed=0)
    batches, out = Batches(t.loader), []
    for step in range(steps):
        t.schedules.apply(step)
        loss, *_ = train_step(t.model, task, t.optimizer, batches, step=step, accum=stage.grad_accum,
                              device=torch.device("cpu"), precision="fp32", clip=stage.config.optim.clip_grad,
                              scaler=None, clip_groups=task.clip_groups(t.model))
        out.append(loss.item())
    return out


@pytest.mark.parametrize("switch", ["stages.pretrain.compile=true", "stages.pretrain.channels_last=true"])
def test_speed_switches_keep_the_losses(world1, shards, switch):  # noqa: F811
    eager = _losses(shards, "stages.pretrain.channels_last=false")
    switched = _losses(shards, switch)
    assert switched == pytest.approx(eager, rel=1e-4, abs=1e-5), (switch, eager, switched)
    assert eager[-1] != eager[0]  # it trained
