"""What is trained, registered by name: supervised classification and DINOv2 self-distillation.

`task_for(recipe, stage)` is the one place that decides which objective a recipe stage trains; every
other module (the trainer entry point, the derived run numbers, `vfm plan`, the DAG, the throughput
harness) asks it instead of looking at `recipe.ssl` itself. It returns a `TaskSpec`: the facts about
the objective that callers need without building anything (is the export headless, is there an EMA
teacher, which timm kwargs does the objective fix) and the `Task` class that the loop trains
(`vfm.train.task` is the contract; the engine in `vfm.train` imports nothing from here).

This module imports no task: the classes load on first use, so the DAG builder and `vfm plan` stay
light. Anchors: torchtitan's `TrainSpec` registry (torchtitan/protocols/train_spec.py), timm's
`timm/task/` (one module per training objective).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vfm.recipes.schema import Recipe
    from vfm.train.task import Task


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """Registry name: `supervised`, `dinov2` or `dense`."""
    implementation: str
    """`module:Class` of the `Task` (imported by `task_class`)."""
    headless: bool = False
    """The export is a backbone without a classifier: evaluation is k-NN (or a probe), not top-1."""
    teacher: bool = False
    """An EMA teacher copy of the backbone lives beside the trained model (memory, FLOPs)."""
    exact_accumulation: bool = True
    """Whether micro-batch accumulation equals one larger batch. Not for DINOv2: centering and KoLeo
    are computed per micro-batch (upstream DINOv2 never accumulates)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """timm kwargs the objective fixes for the stage's model (DINOv2: headless, any input size)."""

    def task_class(self) -> type[Task]:
        module, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(module), name)

    def train_flops_per_sample(self, recipe: Recipe, stage: str, num_classes: int | None = None) -> float:
        """Counted training FLOPs of one sample (forward + backward, teacher and heads included)."""
        return float(self.task_class().train_flops_per_sample(recipe, stage, num_classes))


SUPERVISED = TaskSpec(name="supervised", implementation="vfm.tasks.supervised:SupervisedTask")
# DINOv2 pretrains a headless backbone; one backbone embeds the 224 px global and 98 px local crops
DINOV2 = TaskSpec(name="dinov2", implementation="vfm.tasks.dino:DinoTask", headless=True, teacher=True,
                  exact_accumulation=False, model_overrides={"num_classes": 0, "dynamic_img_size": True})
# paper 001's transfer: the backbone under a segmentation head or a detector, trained from the pretraining export
DENSE = TaskSpec(name="dense", implementation="vfm.tasks.dense:DenseTask", headless=True,
                 model_overrides={"num_classes": 0})
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (SUPERVISED, DINOV2, DENSE)}


def task_for(recipe: Recipe, stage: str) -> TaskSpec:
    """The objective `stage` of `recipe` trains: a dense transfer task for a `downstream` stage, DINOv2 for the
    pretraining of a recipe with `ssl:`, supervised classification otherwise (every fine-tune, and supervised
    pretraining)."""
    if stage in recipe.downstream:
        return TASKS["dense"]
    return TASKS["dinov2" if recipe.ssl is not None and stage == "pretrain" else "supervised"]
