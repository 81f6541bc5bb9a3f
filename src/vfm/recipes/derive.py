"""The numbers a run derives from its recipe stage, computed once: `vfm plan`, the training loop, the
optimiser's schedules and the throughput harness all read the same `ResolvedStage`.

    stage = resolve_stage(recipe, "pretrain", world_size=64, num_samples=manifest.num_samples)
    stage.grad_accum, stage.steps_per_epoch, stage.total_steps, stage.warmup_steps, stage.peak_lr
    stage.train_flops_per_sample        # what `vfm plan` prices and what the loop's MFU divides by

    global batch   = micro-batch × accumulation × world size
    steps / epoch  = ceil(samples / global batch)      (DINOv2: its fixed 1,250-iteration "epoch")
    total steps    = `steps`, or ceil(epochs × steps / epoch)
    warmup         = `warmup_steps`, or round(warmup_epochs × steps / epoch)
    peak lr        = `lr`, or `base_lr` scaled to the global batch (linear / sqrt / none)

Anchors: torchtitan derives gradient accumulation once from the global and local batch
(torchtitan/train.py), and its FLOP count comes from the model (`get_nparams_and_flops`); DINOv2
applies its lr scaling rule once and writes the resolved config (dinov2/train/ssl_meta_arch.py,
`apply_scaling_rules_to_cfg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from vfm.recipes.datasets import DATASET_SIZES
from vfm.recipes.errors import RecipeError
from vfm.tasks import TaskSpec, task_for

if TYPE_CHECKING:
    from vfm.recipes.schema import BatchConfig, Recipe, StageConfig


def grad_accum(batch: BatchConfig, world_size: int, where: str) -> int:
    """Micro-steps per update so that global batch = micro-batch × accumulation × world size.

    `where` names the stage in the error (`stages.pretrain`); the error says what to change."""
    per_update = batch.micro_batch * world_size
    if batch.grad_accum is not None:
        if per_update * batch.grad_accum != batch.global_batch:
            raise RecipeError(
                f"{where}.batch: micro_batch × grad_accum × world size = {batch.micro_batch} × "
                f"{batch.grad_accum} × {world_size} = {per_update * batch.grad_accum} ≠ "
                f"global_batch={batch.global_batch}; fix one of them or drop grad_accum to derive it")
        return batch.grad_accum
    if batch.global_batch % per_update:
        raise RecipeError(
            f"{where}.batch.global_batch={batch.global_batch} is not a multiple of micro_batch × world size = "
            f"{batch.micro_batch} × {world_size} = {per_update}; change global_batch, micro_batch or the "
            "number of processes (hardware.gpus)")
    return batch.global_batch // per_update


@dataclass(frozen=True)
class ResolvedStage:
    """One recipe stage on `world_size` processes, with every number the run derives from it."""

    recipe: Recipe
    name: str
    """`pretrain`, `finetune`, or a downstream stage (`ade20k`, `coco`)."""
    task: TaskSpec
    world_size: int
    num_samples: int
    """Samples in one epoch of the stage's data."""
    num_classes: int | None
    """Classes of the data when known (a manifest's); None takes the dataset's standard count."""
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    """Optimiser updates in the whole stage (the schedules span them, whatever `--max-steps` says)."""
    warmup_steps: int
    peak_lr: float

    @property
    def config(self) -> StageConfig:
        return self.recipe.stage(self.name)

    @property
    def where(self) -> str:
        """The stage's field path in the recipe, for error messages."""
        return self.recipe.stage_path(self.name)

    @cached_property
    def train_flops_per_sample(self) -> float:
        """Counted training FLOPs of one sample (3 × forward; DINOv2 adds the teacher and the heads),
        counted on the meta device: nothing is allocated."""
        return self.task.train_flops_per_sample(self.recipe, self.name, self.num_classes)


def resolve_stage(recipe: Recipe, stage: str, world_size: int, num_samples: int | None = None, *,
                  num_classes: int | None = None) -> ResolvedStage:
    """Resolve `stage` of `recipe` for `world_size` processes.

    `num_samples` is the data's size when known (the training manifest's); the stage's own
    `num_samples` wins over it, and the dataset's standard size (vfm.recipes.datasets) is the fallback."""
    if stage not in recipe.stage_names:
        raise RecipeError(f"recipe {recipe.id} has no stage `{stage}`; it has: {', '.join(recipe.stage_names)}")
    st = recipe.stage(stage)
    where = recipe.stage_path(stage)
    task = task_for(recipe, stage)
    samples = st.num_samples or num_samples or DATASET_SIZES.get(st.data.dataset, 0)
    fixed_epoch = recipe.ssl.epoch_length_steps if task.name == "dinov2" and recipe.ssl is not None else None
    if fixed_epoch:
        per_epoch = fixed_epoch
    elif samples:
        per_epoch = max(1, math.ceil(samples / st.batch.global_batch))
    else:
        raise RecipeError(f"{where}: cannot tell the epoch size of `{st.data.dataset}`; set {where}.num_samples")
    total = st.steps if st.steps is not None else math.ceil((st.epochs or 0) * per_epoch)
    o = st.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else round((o.warmup_epochs or 0.0) * per_epoch)
    return ResolvedStage(recipe=recipe, name=stage, task=task, world_size=world_size, num_samples=samples,
                         num_classes=num_classes, grad_accum=grad_accum(st.batch, world_size, where),
                         steps_per_epoch=per_epoch, total_steps=total, warmup_steps=warmup,
                         peak_lr=o.peak_lr(st.batch.global_batch))
