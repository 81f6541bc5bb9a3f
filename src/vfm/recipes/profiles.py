"""Scale profiles: `paper` is the seed as written; `smoke` shrinks any recipe to a CPU-sized run.

The smoke profile keeps what makes the recipe *that* recipe (family, stages, augmentation kinds,
crop counts, precision switches, parallelism, resolution change between stages, seeds) and shrinks
what costs time: model width/depth, resolution, batch, steps, head sizes. Tests and the local
runner use it; a ViT-Tiny at 64 px does about 1 step/s at batch 64 on this CPU, so smoke runs use
32 px images, depth-2 models and a handful of steps.
"""

from __future__ import annotations

import copy
from typing import Any

PROFILES = ("paper", "smoke")

SMOKE_WORLD = 2  # two CPU ranks under torchrun/gloo
SMOKE_RES = 32
SMOKE_RES_HIGH = 48  # a fine-tune stage at a higher resolution than pretraining stays higher
SMOKE_LOCAL_RES = 16

# tiny model of the same family; depth 2 keeps a CPU step well under a second
_SMOKE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "dinov2": ("vit_small_patch14_dinov2", {"patch_size": 8, "img_size": SMOKE_RES, "depth": 2,
                                            "embed_dim": 96, "num_heads": 3}),
    "vit": ("vit_tiny_patch16_224", {"patch_size": 8, "img_size": SMOKE_RES, "depth": 2}),
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
    for name, stage in stages.items():
        data = stage["data"]
        higher = name == "finetune" and data.get("resolution", 224) > pre_res
        data["resolution"] = SMOKE_RES_HIGH if higher else SMOKE_RES
        stage["num_samples"] = 64
        if data.get("multicrop"):
            data["multicrop"].update(global_crops_size=SMOKE_RES, local_crops_size=SMOKE_LOCAL_RES)
        stage["batch"] = {"global_batch": 8, "micro_batch": 4}
        optim = stage["optim"]
        for k in ("base_lr", "warmup_epochs", "lr"):
            optim.pop(k, None)
        optim.update(lr=1e-3 if name == "pretrain" else 5e-4, warmup_steps=2, min_lr=1e-5)
        optim.pop("base_batch", None)
        optim.pop("lr_scaling", None)
        stage.pop("epochs", None)
        stage["steps"] = 12 if name == "pretrain" else 6
        stage.update(precision="fp32", activation_checkpointing=False, compile=False,
                     checkpoint_every_steps=4, keep_checkpoints=2)
    if d.get("ssl"):
        d["ssl"].update(head_prototypes=256, head_hidden=64, head_bottleneck=32,
                        ibot_prototypes=256, ibot_bottleneck=32, epoch_length_steps=4,
                        teacher_temp_warmup_epochs=1, freeze_last_layer_epochs=0.5)
    ev = d.setdefault("eval", {})
    if ev.get("knn_every_steps"):
        ev["knn_every_steps"] = 6
    return d
