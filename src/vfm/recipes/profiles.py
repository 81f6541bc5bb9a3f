"""Scale profiles: `paper` is the seed as written; `smoke` shrinks any recipe to a CPU-sized run.

The smoke profile keeps what makes the recipe *that* recipe (family, stages, augmentation kinds,
crop counts, precision switches, parallelism, resolution change between stages, seeds) and shrinks
what costs time: model width/depth, resolution, batch, steps, head sizes. Tests and the local
runner use it.

Supervised stages train for a number of *epochs* of whatever data they are given, so the same profile
is a dozen steps on a test's 64 synthetic images and a real run on the local default data
(vfm.data.digits, 1,438 training digits): 6 epochs of pretraining and 4 of fine-tuning at batch 32 take
the vit-huge smoke pipeline to ≥ 90 % IN-1K-style top-1 on the digits' val split in about a minute of
training on 2 cores (measured: a depth-2 ViT-Tiny at 32 px with 16 px patches, 93 % after 270 + 180
updates). What was tuned for that, and why:
- 16 px patches (2 × 2 tokens at 32 px): with 8 px patches the same ViT needed ~3× the updates;
- augmentation strength scaled to 32 px images, every kind kept: crops keep ≥ 80 % of the image
  (a paper's 8 % crop of a 32 px digit is a few strokes), RandAugment one op at magnitude 2, colour
  jitter ≤ 0.2, no stochastic depth, and no horizontal flip (a mirrored digit is not that digit: it cost
  9 points of top-1). Measured with the paper's augmentation the model stays at chance.
DINOv2 stages keep a fixed dozen steps at batch 8 (each sample is 12 crops).
"""

from __future__ import annotations

import copy
from typing import Any

PROFILES = ("paper", "smoke")

SMOKE_WORLD = 2  # two CPU ranks under torchrun/gloo
SMOKE_RES = 32
SMOKE_RES_HIGH = 48  # a fine-tune stage at a higher resolution than pretraining stays higher
SMOKE_LOCAL_RES = 16
SMOKE_EPOCHS = {"pretrain": 6, "finetune": 4}  # supervised stages: epochs of the data given (see above)
SMOKE_BATCH = {"global_batch": 32, "micro_batch": 16}
SMOKE_SSL_BATCH = {"global_batch": 8, "micro_batch": 4}
SMOKE_SSL_STEPS = 12
SMOKE_CHECKPOINT_EVERY = 25  # a few checkpoints of a local run (each costs a DCP save); tests set their own
SMOKE_MIN_CROP = 0.8
SMOKE_RAND_AUGMENT = "rand-n1-m2"
SMOKE_COLOR_JITTER = 0.2

# paper 002's kernel × expansion grid as 2 × 2 cells of ConvNeXt-Atto on 5 of the digits' classes, each a
# couple of epochs on the smoke world (measured cost in tests/pipelines/test_ablation.py)
SMOKE_ABLATION: dict[str, Any] = {
    "variant": "convnext_atto", "kernel_sizes": [3, 7], "mlp_ratios": [2, 4],
    "subset": {"num_classes": 5, "fraction": 1.0, "seed": 0}, "resolution": SMOKE_RES, "epochs": 2, "seeds": [0],
    "gpus": SMOKE_WORLD, "micro_batch": SMOKE_BATCH["micro_batch"], "drop_path": 0.0, "concurrent_cells": 2}

# downstream (dense) stages: 64 px crops of the synthetic shapes sets (vfm.data.dense_synthetic, 96 px images, so
# the sliding window really slides), a few dozen updates on the smoke world, two seeds for a mean and a spread
SMOKE_DENSE_RES = 64
SMOKE_DENSE_SLIDE = {"crop": 64, "stride": 32}
SMOKE_DENSE_BATCH = {"global_batch": 8, "micro_batch": 4}
SMOKE_DENSE_STEPS = 40
SMOKE_DENSE_SEEDS = [0, 1]
# the synthetic shapes fill a third of a 64 px crop, not ViTDet's 3 % of 1024 px: anchors of their size, and fewer
# sampled RoIs per image, so the few positives are not drowned (measured: with ViTDet's, no box scored above 0.05)
SMOKE_DENSE_ANCHORS = [8, 16, 24, 32, 48]
SMOKE_DENSE_ROIS = 64

# tiny model of the same family; depth 2 keeps a CPU step well under a second
_SMOKE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "dinov2": ("vit_small_patch14_dinov2", {"patch_size": 8, "img_size": SMOKE_RES, "depth": 2,
                                            "embed_dim": 96, "num_heads": 3}),
    "vit": ("vit_tiny_patch16_224", {"patch_size": 16, "img_size": SMOKE_RES, "depth": 2}),
    "convnext": ("convnext_atto", {}),
}


def apply_profile(data: dict[str, Any], profile: str) -> dict[str, Any]:
    if profile == "paper":
        return data
    return _smoke(copy.deepcopy(data))


def _smoke(d: dict[str, Any]) -> dict[str, Any]:
    d["profile"] = "smoke"
    model = d["model"]
    key = "dinov2" if "dinov2" in model["timm_name"] else model.get("family", "vit")
    name, kwargs = _SMOKE_MODELS[key]
    model["timm_name"], model["kwargs"] = name, dict(kwargs)
    d["hardware"] = {"gpu": "cpu", "gpus": SMOKE_WORLD, "gpus_per_node": SMOKE_WORLD}

    stages = d["stages"]
    pre_res = stages.get("pretrain", {}).get("data", {}).get("resolution", 224)
    ssl = bool(d.get("ssl"))
    for name, stage in stages.items():
        data = stage["data"]
        higher = name == "finetune" and data.get("resolution", 224) > pre_res
        data["resolution"] = SMOKE_RES_HIGH if higher else SMOKE_RES
        data["workers"] = 0  # 32 px images on a few CPU cores: the rank decodes them itself
        if data.get("multicrop"):
            data["multicrop"].update(global_crops_size=SMOKE_RES, local_crops_size=SMOKE_LOCAL_RES)
        stage.pop("epochs", None)
        stage.pop("steps", None)
        stage.pop("num_samples", None)  # epochs count the data the stage is given
        if ssl and name == "pretrain":
            stage["batch"] = dict(SMOKE_SSL_BATCH)
            stage["steps"] = SMOKE_SSL_STEPS
        else:
            stage["batch"] = dict(SMOKE_BATCH)
            stage["epochs"] = SMOKE_EPOCHS.get(name, SMOKE_EPOCHS["finetune"])
            stage["drop_path"] = 0.0
            _smoke_augment(data.setdefault("augment", {}))
        optim = stage["optim"]
        for k in ("base_lr", "warmup_epochs", "lr"):
            optim.pop(k, None)
        optim.update(lr=1e-3 if name == "pretrain" else 5e-4, warmup_steps=2, min_lr=1e-5)
        optim.pop("base_batch", None)
        optim.pop("lr_scaling", None)
        stage.update(precision="fp32", activation_checkpointing=False, compile=False,
                     checkpoint_every_steps=SMOKE_CHECKPOINT_EVERY, keep_checkpoints=2)
    if d.get("ssl"):
        d["ssl"].update(head_prototypes=256, head_hidden=64, head_bottleneck=32,
                        ibot_prototypes=256, ibot_bottleneck=32, epoch_length_steps=4,
                        teacher_temp_warmup_epochs=1, freeze_last_layer_epochs=0.5)
    ev = d.setdefault("eval", {})
    if ev.get("knn_every_steps"):
        ev["knn_every_steps"] = 6
    if d.get("ablation"):
        d["ablation"].update(SMOKE_ABLATION)
    for stage in (d.get("downstream") or {}).values():
        _smoke_downstream(stage)
    if d.get("curate"):
        _smoke_curate(d["curate"])
    return d


# `vfm curate` on the local default pool (vfm.data.digits: 32 px scans, upscaled from 8 px, so soft and small): the
# same stages at thresholds such images pass unless they are really constant or tiny. The embedding stage runs a
# randomly initialised (seeded) ResNet-10-T, as nothing can be downloaded here: its features put distinct digits at
# cosine > 0.999 of each other (measured: at 0.999 it removed 1,277 of the 1,438), so its thresholds are 1.0 and the
# stage runs end to end without removing what only a trained model could call a copy
SMOKE_CURATE_QUALITY = {"min_side": 16, "min_bytes": 100, "min_entropy": 1.0, "min_laplacian_var": 1.0}
SMOKE_CURATE_EMBEDDING = {"model": "timm:resnet10t", "image_size": 32, "threshold": 1.0, "k": 8}
SMOKE_CURATE_RAY = {"part_size": 256, "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0,
                    "memory_per_worker": "2Gi", "shard_size": "8MB"}


def _smoke_curate(c: dict[str, Any]) -> None:
    c.update(SMOKE_CURATE_RAY)
    for stage, values in (("quality", SMOKE_CURATE_QUALITY), ("embedding", SMOKE_CURATE_EMBEDDING)):
        if c.get(stage, {}).get("enabled", True):
            c.setdefault(stage, {}).update(values)
    if c.get("decontaminate", {}).get("enabled"):
        c["decontaminate"]["threshold"] = SMOKE_CURATE_EMBEDDING["threshold"]


def _smoke_downstream(stage: dict[str, Any]) -> None:
    """A downstream stage at CPU size: same task, head, freezing and augmentation kinds; small crops and steps."""
    stage["gpus"] = SMOKE_WORLD
    data = stage["data"]
    data["resolution"] = SMOKE_DENSE_RES
    data["workers"] = 0
    lo, hi = data.setdefault("augment", {}).get("scale", (0.5, 2.0))
    data["augment"]["scale"] = [max(lo, 0.75), min(hi, 1.5)]  # jitter kept, mild at 64 px
    stage.pop("epochs", None)
    stage.pop("num_samples", None)
    stage["steps"] = SMOKE_DENSE_STEPS
    stage["batch"] = dict(SMOKE_DENSE_BATCH)
    stage["seeds"] = list(SMOKE_DENSE_SEEDS)
    stage["drop_path"] = 0.0
    if stage.get("slide"):
        stage["slide"] = dict(SMOKE_DENSE_SLIDE)
    stage["fpn_channels"] = 32
    if stage.get("task") == "object_detection":
        stage.update(anchor_sizes=list(SMOKE_DENSE_ANCHORS), roi_batch_per_image=SMOKE_DENSE_ROIS)
    optim = stage["optim"]
    for k in ("base_lr", "warmup_epochs", "base_batch", "lr_scaling"):
        optim.pop(k, None)
    optim.update(lr=1e-3, warmup_steps=2, min_lr=1e-5)
    stage.update(precision="fp32", activation_checkpointing=False, compile=False,
                 checkpoint_every_steps=SMOKE_CHECKPOINT_EVERY, keep_checkpoints=2)


def _smoke_augment(aug: dict[str, Any]) -> None:
    """Every augmentation kind the recipe names, at a strength a 32 px image survives (see the module doc)."""
    lo, hi = aug.get("scale", (0.08, 1.0))
    aug["scale"] = [max(lo, SMOKE_MIN_CROP), hi]
    aug["hflip"] = 0.0
    if aug.get("rand_augment"):
        aug["rand_augment"] = SMOKE_RAND_AUGMENT + ("-inc1" if "inc1" in aug["rand_augment"] else "")
    if aug.get("color_jitter", 0.4) is not None:
        aug["color_jitter"] = min(aug.get("color_jitter", 0.4), SMOKE_COLOR_JITTER)
