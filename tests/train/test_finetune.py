"""Fine-tuning from a pretraining export changes only what it should: a new head for the new classes,
the same backbone at step 0 (position embeddings resampled when the resolution changes)."""

from __future__ import annotations

import pytest
import torch

from vfm.export import load_export, save_export
from vfm.recipes import load_recipe
from vfm.recipes.derive import resolve_stage
from vfm.tasks.supervised import SupervisedTask, head_keys
from vfm.train.task import TaskContext


def _task(recipe, stage: str, data: str, init: str | None = None, **kw) -> SupervisedTask:
    task = SupervisedTask(data, **kw)
    torch.manual_seed(1)
    resolved = resolve_stage(recipe, stage, world_size=1, num_samples=task.num_samples)
    task.build(TaskContext(stage=resolved, device=torch.device("cpu"), rank=0, seed=0, init=init))
    return task


# vit-huge fine-tunes at its pretraining resolution (512 px both, paper 000); the fixture raises the
# smoke fine-tune to 48 px so that the position-embedding resampling is exercised too
RESOLUTION_CHANGE = {"vit-huge": ["stages.finetune.data.resolution=48"]}


@pytest.fixture(params=["vit-huge", "convnext-xl"])
def pretrained(request, shards, tmp_path):
    """A pretraining export of the recipe (4 classes) with non-trivial weights."""
    recipe = load_recipe(request.param, RESOLUTION_CHANGE.get(request.param), profile="smoke")
    task = _task(recipe, "pretrain", shards)
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # anything but the init: a copy must be a copy
    module, meta = task.export()
    save_export(module, meta, tmp_path / "export")
    return recipe, str(tmp_path / "export")


def test_new_head_same_backbone_at_step_zero(pretrained, shards5):
    recipe, export = pretrained
    source, meta = load_export(export)
    src = source.state_dict()
    task = _task(recipe, "finetune", shards5, init=export)
    dst = task.model.state_dict()
    head = set(head_keys(task.model))
    assert dst[sorted(head)[0]].shape[0] == 5 and meta.num_classes == 4  # a head for the new classes
    resized = recipe.stages["finetune"].data.resolution != recipe.stages["pretrain"].data.resolution
    for k, v in dst.items():
        if k in head:
            continue
        if k == "pos_embed" and resized:  # fine-tuning at a higher resolution: resampled grid
            assert v.shape[1] == 1 + (48 // 16) ** 2 and src[k].shape[1] == 1 + (32 // 16) ** 2
            torch.testing.assert_close(v[:, :1], src[k][:, :1])  # the class token's embedding is kept
            continue
        assert torch.equal(v, src[k]), k
    scale = recipe.stages["finetune"].head_init_scale
    w = next(dst[k] for k in head if k.endswith("weight"))
    if scale is not None:  # ConvNeXt: fresh head scaled by 0.001
        assert w.abs().max() < 0.01
    if task.ema is not None:  # the EMA starts as the initialised model
        assert all(torch.equal(a, b) for a, b in zip(task.ema.state_dict().values(), dst.values(), strict=True))


@pytest.mark.parametrize("pretrained", ["vit-huge"], indirect=True)  # ConvNeXt's head.fc: test_distributed
def test_head_rows_copied_by_wnid_and_missing_class_fresh(pretrained, shards5):
    recipe, export = pretrained
    source, meta = load_export(export)
    task = _task(recipe, "finetune", shards5, init=export, head_from_wnids=True)
    w_key = next(k for k in head_keys(task.model) if k.endswith("weight"))
    src_w, dst_w = source.state_dict()[w_key], task.model.state_dict()[w_key]
    assert task.wnids[:4] == meta.wnids
    assert torch.equal(dst_w[:4], src_w)
    assert not any(torch.equal(dst_w[4], src_w[i]) for i in range(4))


def test_init_from_a_different_architecture_is_a_clear_error(shards, shards5, tmp_path):
    from vfm.errors import UserError

    vit = load_recipe("vit-huge-pretrain", profile="smoke")
    module, meta = _task(vit, "pretrain", shards).export()
    save_export(module, meta, tmp_path / "vit")
    with pytest.raises(UserError, match="does not fit"):
        _task(load_recipe("convnext-xl", profile="smoke"), "finetune", shards5, init=str(tmp_path / "vit"))
