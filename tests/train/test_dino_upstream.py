"""DINOv2 as facebookresearch/dinov2 trains it, where the recipes say `upstream` (none of the seed papers
states otherwise): the prototype gain is trainable, only biases / norms / layer-scale gammas escape weight
decay, the backbone and heads are clipped one by one, and iBOT keeps its 2 / n_global_crops scale."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_loop import world1  # noqa: F401  (fixture)
from vfm.recipes import load_recipe
from vfm.recipes.derive import resolve_stage
from vfm.tasks import task_for
from vfm.train.loop import Batches, train_step
from vfm.train.parallel import unwrap
from vfm.train.setup import setup


def _dino(manifest: str, *sets: str):
    recipe = load_recipe("dinov2-giant", ["hardware.gpus=1", "stages.pretrain.parallelism=ddp", *sets], profile="smoke")
    task = task_for(recipe, "pretrain").task_class()(manifest, num_workers=0)
    stage = resolve_stage(recipe, "pretrain", 1, task.num_samples)
    return task, setup(task, stage, device=torch.device("cpu"), rank=0, seed=0), stage


def test_weight_decay_and_the_trainable_gain_follow_upstream(world1, shards):  # noqa: F811
    task, t, _ = _dino(shards)
    scale = {id(p): g["wd_scale"] for g in t.optimizer.param_groups for p in g["params"]}
    named = dict(unwrap(t.model).named_parameters())
    for name, p in named.items():
        exempt = name.endswith(".bias") or "norm" in name or "gamma" in name  # dinov2/utils/param_groups.py
        assert (scale[id(p)] == 0) == exempt, name
    for decayed in ("backbone.pos_embed", "backbone.cls_token", "mask_token"):
        assert scale[id(named[decayed])] > 0, decayed
    gain = named["dino_head.last_layer.parametrizations.weight.original0"]
    assert gain.requires_grad and id(gain) in scale  # trained, from 1 (dinov2/layers/dino_head.py)


def test_backbone_and_heads_are_clipped_one_by_one(world1, shards):  # noqa: F811
    task, t, stage = _dino(shards, "stages.pretrain.optim.clip_grad=1e-3")
    groups = task.clip_groups(t.model)
    bare = unwrap(t.model)
    assert {id(p) for g in groups for p in g} == {id(p) for p in bare.parameters() if p.requires_grad}
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, **kw):
        out = real(params, max_norm, **kw)
        seen.append(torch.nn.utils.get_total_norm([p.grad for p in params]).item())
        return out
    torch.nn.utils.clip_grad_norm_ = spy
    try:
        train_step(t.model, task, t.optimizer, Batches(t.loader), step=0, accum=1, device=torch.device("cpu"),
                   precision="fp32", clip=1e-3, scaler=None, clip_groups=groups)
    finally:
        torch.nn.utils.clip_grad_norm_ = real
    # each group clipped to the cap itself (one global clip would leave every group below it)
    assert len(seen) == len(groups) >= 2 and all(n == pytest.approx(1e-3, rel=0.01) for n in seen)


@pytest.mark.parametrize("n_global", [2, 4])
def test_ibot_keeps_upstreams_two_over_n_global_scale(world1, shards, monkeypatch, n_global):  # noqa: F811
    task, t, _ = _dino(shards, f"stages.pretrain.data.multicrop.global_crops_count={n_global}",
                       "ssl.koleo=false")
    def constant(loss, value: float):  # the loss term's value fixed, its teacher targets kept
        return type("Const", (), {"__call__": lambda self, *a: torch.tensor(value),
                                  "teacher_targets": loss.teacher_targets})()
    monkeypatch.setattr(task, "dino_loss", constant(task.dino_loss, 0.0))
    monkeypatch.setattr(task, "ibot_loss", constant(task.ibot_loss, 1.0))
    monkeypatch.setattr("vfm.tasks.dino.collapse_stats", lambda *a: {})
    batch = next(iter(t.loader))
    loss, _ = task.loss(t.model, batch, 0)
    assert loss.item() == pytest.approx(task.ssl.ibot_loss_weight * 2 / n_global)
