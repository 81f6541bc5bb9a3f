"""An update that does not log never waits for the device: no `.item()`, `float()`, `bool()` or `.tolist()` of
a tensor between logging steps, for the supervised and the DINOv2 task (the real tasks, in-process).

The probe is CUDA-free: it counts the Tensor methods that block the host on a GPU (on CUDA each is a
device-to-host copy that waits for the queue), except the optimiser's host-side step counters. Batches are excluded: they are made by the loader (CPU
tensors in worker processes or threads on a real run), not by the step; so is every thread but the
training loop's.
"""

from __future__ import annotations

import collections
import os
import sys
import threading

import pytest
import torch

from tests.train.test_loop import world1  # noqa: F401  (fixture)
from vfm.recipes import load_recipe
from vfm.recipes.derive import resolve_stage
from vfm.tasks import task_for
from vfm.train import loop
from vfm.train.loop import RunSpec, train

SYNCING = ("item", "tolist", "__float__", "__int__", "__bool__")
TORCH_OPTIM = os.path.dirname(torch.optim.__file__)


@pytest.fixture
def host_syncs(monkeypatch):
    """Counts of syncing Tensor calls per update (index = the update in progress, 0-based)."""
    per_step: collections.Counter = collections.Counter()
    state = {"step": -1, "on": True}
    for name in SYNCING:
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, **kw):
            if state["on"] and threading.current_thread() is threading.main_thread():
                # torch.optim keeps Adam's step counters on the host unless capturable (torch/optim/adam.py
                # `_get_value`): reading them is no device sync on a GPU either
                if not sys._getframe(1).f_code.co_filename.startswith(TORCH_OPTIM):
                    per_step[state["step"]] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counting)
    real_step, real_next = loop.train_step, loop.Batches.next

    def step(*a, step, **kw):
        state["step"] = step
        return real_step(*a, step=step, **kw)

    def next_batch(self):
        state["on"] = False
        try:
            return real_next(self)
        finally:
            state["on"] = True
    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop.Batches, "next", next_batch)
    return per_step


def _run(recipe_id: str, stage: str, manifest: str, tmp_path, *sets: str) -> None:
    recipe = load_recipe(recipe_id, ["hardware.gpus=1", f"stages.{stage}.checkpoint_every_steps=100", *sets],
                         profile="smoke")
    spec = task_for(recipe, stage)
    task = spec.task_class()(manifest, num_workers=0)
    classes = len(task.manifest.classes) if spec.name == "supervised" else None
    resolved = resolve_stage(recipe, stage, 1, task.num_samples, num_classes=classes)
    train(task, RunSpec(stage=resolved, out=str(tmp_path / "run"), log_every=4, max_steps=8))


@pytest.mark.parametrize("recipe_id,stage,sets", [
    ("vit-huge", "pretrain", ("stages.pretrain.parallelism=ddp",)),
    ("dinov2-giant", "pretrain", ("stages.pretrain.parallelism=ddp",)),
])
def test_no_host_sync_between_logging_steps(world1, host_syncs, shards, tmp_path, recipe_id, stage, sets):  # noqa: F811
    _run(recipe_id, stage, shards, tmp_path, *sets)
    # updates 0 (the first logs), 3 and 7 (log_every=4; 7 is also the last) sync; the others never do
    quiet = {s: host_syncs[s] for s in (1, 2, 4, 5, 6)}
    assert quiet == dict.fromkeys(quiet, 0), f"host syncs per update: {dict(sorted(host_syncs.items()))}"
    assert host_syncs[3] > 0 and host_syncs[7] > 0  # the probe sees the logging steps' reads
