"""The five seed recipes as typed data: loading, profiles, overrides and the bad-input contract."""

from __future__ import annotations

import pytest

from vfm.models import build_model
from vfm.recipes import RecipeError, list_recipes, load_recipe

SEEDS = ["convnext-xl", "dinov2-giant", "meta-dinov2-giant", "vit-huge", "vit-huge-pretrain"]


def test_five_seed_recipes():
    assert list_recipes() == SEEDS


@pytest.mark.parametrize("rid", SEEDS)
def test_every_seed_validates_in_both_profiles(rid):
    paper = load_recipe(rid)
    smoke = load_recipe(rid, profile="smoke")
    assert paper.profile == "paper" and smoke.profile == "smoke"
    assert list(paper.stages) == list(smoke.stages)
    assert smoke.hardware.gpus == 2 and smoke.stages["pretrain"].steps <= 20
    # the smoke model is of the same family and actually runs on CPU
    assert smoke.model.family == paper.model.family
    model = build_model(smoke, "pretrain", num_classes=10)
    import torch

    res = smoke.stages["pretrain"].data.resolution
    out = model(torch.randn(2, 3, res, res))
    assert out.shape == (2, 10)


def test_paper_facts_are_carried():
    vh = load_recipe("vit-huge")
    assert vh.model.timm_name == "vit_huge_patch14_224" and vh.model.kwargs["patch_size"] == 16
    assert vh.stages["finetune"].data.resolution == 512
    aug = vh.stages["pretrain"].data.augment
    assert (aug.rand_augment, aug.mixup, aug.cutmix, aug.force_color_jitter) == ("rand-m9-mstd0.5", 0.8, 1.0, True)
    assert vh.stages["pretrain"].optim.warmup_steps == 10_000 and vh.stages["pretrain"].optim.min_lr == 1e-6
    assert vh.claims.top1 == 89.1 and vh.claims.duration_text == "3 weeks"

    meta = load_recipe("meta-dinov2-giant")
    assert (meta.ssl.momentum_start, meta.ssl.momentum_schedule) == (0.996, "linear")
    assert meta.claims.params_millions == 450 and meta.claims.knn_top1 == 78.5
    fields = {n.field for n in meta.upstream}
    assert {"ssl.momentum_start", "stages.pretrain.data.multicrop", "claims.params_millions"} <= fields

    up = load_recipe("dinov2-giant")
    assert (up.ssl.momentum_start, up.ssl.momentum_schedule) == (0.994, "cosine")
    assert up.stages["pretrain"].checkpoint_every_steps == 5000
    mc = up.stages["pretrain"].data.multicrop
    assert (mc.global_crops_count, mc.global_crops_size, mc.local_crops_count, mc.local_crops_size) == (2, 224, 8, 98)

    cx = load_recipe("convnext-xl")
    ft = cx.stages["finetune"]
    assert (ft.epochs, ft.optim.lr, ft.batch.global_batch) == (100, 2e-4, 2048)
    notes = {n.field: n.upstream for n in cx.upstream}
    assert notes["stages.finetune.epochs"] == "30" and notes["stages.finetune.optim.lr"] == "5e-5"


def test_override_changes_a_field():
    r = load_recipe("vit-huge", ["stages.pretrain.batch.micro_batch=16", "stages.pretrain.precision=fp16"])
    assert r.stages["pretrain"].batch.micro_batch == 16 and r.grad_accum("pretrain") == 2
    assert r.stages["pretrain"].precision == "fp16"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.pretrain.optim.lrr=1e-3", "unknown field `stages.pretrain.optim.lrr`; did you mean `lr`?"),
        ("stages.pretrain.epochs=ninety", "field `stages.pretrain.epochs`"),
        ("stages.pretrain.batch.micro_batch=48", "not a multiple of micro_batch × world size = 48 × 64"),
        ("model.timm_name=vit_hugee_patch14_224", "field `model.timm_name`: unknown timm model"),
        ("stages.pretrain.batch.grad_accum=3", "micro_batch × grad_accum × world size = 32 × 3 × 64"),
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
        load_recipe("vit-huge", ["stages.pretrain.batch.micro_batch=1", "stages.pretrain.batch.global_batch=64"])
