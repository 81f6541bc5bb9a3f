"""The five seed recipes as typed data: loading, profiles, overrides and the bad-input contract."""

from __future__ import annotations

import pytest

from vfm.models import build_model
from vfm.recipes import RecipeError, list_recipes, load_recipe
from vfm.recipes.derive import resolve_stage

SEEDS = ["convnext-xl", "dinov2-giant", "meta-dinov2-giant", "vit-huge", "vit-huge-pretrain"]


def test_five_seed_recipes():
    assert list_recipes() == SEEDS


@pytest.mark.parametrize("rid", SEEDS)
def test_every_seed_validates_in_both_profiles(rid):
    paper = load_recipe(rid)
    smoke = load_recipe(rid, profile="smoke")
    assert paper.profile == "paper" and smoke.profile == "smoke"
    assert list(paper.stages) == list(smoke.stages)
    pre = smoke.stages["pretrain"]
    # a dozen updates on a test's 64 images: SSL by steps, supervised by epochs of the data given
    assert smoke.hardware.gpus == 2 and (pre.steps or 0) <= 20 and (pre.epochs or 0) * 64 / pre.batch.global_batch <= 20
    # the smoke model is of the same family and actually runs on CPU
    assert smoke.model.family == paper.model.family
    model = build_model(smoke, "pretrain", num_classes=10)
    import torch

    res = smoke.stages["pretrain"].data.resolution
    out = model(torch.randn(2, 3, res, res))
    assert out.shape == (2, 10)


def test_override_changes_a_field():
    r = load_recipe("vit-huge", ["stages.pretrain.batch.micro_batch=16", "stages.pretrain.precision=fp16"])
    assert r.stages["pretrain"].batch.micro_batch == 16
    assert resolve_stage(r, "pretrain", r.hardware.gpus).grad_accum == 2
    assert r.stages["pretrain"].precision == "fp16"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.pretrain.optim.lrr=1e-3", "unknown field `stages.pretrain.optim.lrr`; did you mean `lr`?"),
        ("stages.pretrain.epochs=ninety", "field `stages.pretrain.epochs`"),
        ("stages.pretrain.batch.micro_batch=48", "not a multiple of micro_batch × world size = 48 × 64"),
        ("model.timm_name=vit_hugee_patch14_224", "field `model.timm_name`: unknown timm model"),
        ("stages.pretrain.batch.grad_accum=3", "micro_batch × grad_accum × world size = 8 × 3 × 64"),
        ("stages.pretrain.precision=fp8", "field `stages.pretrain.precision`"),
        ("noequals", "expected FIELD=VALUE"),
    ],
)
def test_bad_input_names_the_field(override, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe("vit-huge", [override])
    assert expected in str(err.value)


def test_unknown_recipe_suggests():
    with pytest.raises(RecipeError, match="did you mean `vit-huge`"):
        load_recipe("vit-hug")


def test_mixup_needs_even_micro_batch():
    with pytest.raises(RecipeError, match="must be even with Mixup/CutMix"):
        load_recipe("convnext-xl", ["stages.pretrain.batch.micro_batch=1", "stages.pretrain.batch.grad_accum=1",
                                    "stages.pretrain.batch.global_batch=128"])


def test_seed_must_be_three_digits():
    with pytest.raises(RecipeError, match="paper.seed"):
        load_recipe("vit-huge", ["paper.seed=1"])


def test_ablation_grid_is_validated():
    with pytest.raises(RecipeError, match="must be odd"):
        load_recipe("convnext-xl", ["ablation.kernel_sizes=[3, 4]"])
    with pytest.raises(RecipeError, match="ablation.variant.*unknown timm model"):
        load_recipe("convnext-xl", ["ablation.variant=convnext_tinyy"])
    with pytest.raises(RecipeError, match="not a ConvNeXt"):
        load_recipe("convnext-xl", ["ablation.variant=vit_tiny_patch16_224"])


def test_stated_reads_provenance():
    r = load_recipe("vit-huge")
    assert not r.stated("hardware.gpus") and r.stated("hardware.gpu")
    assert not r.stated("stages.finetune.data.augment.rand_augment")  # under a section marked as a default
    assert r.stated("stages.pretrain.optim.warmup_steps")


def test_a_duration_override_replaces_the_other_duration():
    r = load_recipe("vit-huge", ["stages.pretrain.steps=4"], profile="smoke")  # smoke sets epochs
    assert (r.stages["pretrain"].steps, r.stages["pretrain"].epochs) == (4, None)
    r = load_recipe("meta-dinov2-giant", ["stages.pretrain.epochs=2"])  # the paper sets steps
    assert (r.stages["pretrain"].steps, r.stages["pretrain"].epochs) == (None, 2)


def test_downstream_stages_are_recipe_stages_validated_like_the_rest():
    r = load_recipe("vit-huge-pretrain")
    assert r.stage_names == ["pretrain", "ade20k", "ade20k_linear", "coco"]
    assert r.stage("coco") is r.downstream["coco"] and r.stage_path("coco") == "downstream.coco"
    coco = resolve_stage(r, "coco", r.downstream["coco"].gpus)
    assert coco.grad_accum == 1 and coco.total_steps == 75 * -(-118_287 // 64)  # 75 epochs of train2017
    assert coco.task.name == "dense" and resolve_stage(r, "ade20k", 8).total_steps == 160_000
    assert not r.stated("downstream.ade20k.optim.lr")  # the paper says nothing of how it transferred
    assert r.stated("downstream.coco.task") and r.stated("downstream.ade20k.data.dataset")  # only which tasks
    smoke = load_recipe("vit-huge-pretrain", profile="smoke")
    assert {n: (d.gpus, d.data.resolution, d.steps, d.seeds) for n, d in smoke.downstream.items()} == {
        n: (2, 64, 40, [0, 1]) for n in ("ade20k", "ade20k_linear", "coco")}


@pytest.mark.parametrize(("override", "expected"), [
    ("downstream.coco.data.dataset=ade20k", "task=object_detection on ade20k"),
    ("downstream.ade20k.head=mask_rcnn", "not a semantic_segmentation head"),
    ("downstream.ade20k_linear.freeze_backbone=false", "frozen-backbone protocol"),
    ("downstream.coco.batch.micro_batch=3", "downstream.coco.batch.global_batch=64 is not a multiple"),
    ("downstream.ade20k.parallelism=fsdp", "downstream stages train with ddp"),
    ("downstream.ade20k.slide.stride=600", "leaves pixels no window covers"),
    ("downstream.coco.anchor_sizes=[8, 16]", "one size per pyramid level"),
])
def test_a_bad_downstream_stage_names_what_to_change(override, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe("vit-huge-pretrain", [override])
