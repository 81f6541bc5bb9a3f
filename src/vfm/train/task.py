"""The contract between the training loop and what is being trained.

`vfm.train.loop.train` owns everything that is the same for every kind of training: distributed setup,
wrapping (DDP / FSDP2), precision (autocast, fp16 grad scaler), gradient accumulation with `no_sync`,
clipping, the optimiser and its lr / weight-decay schedules stepped per update, checkpoint save/resume
of every stateful part (model, optimiser, scaler, step, RNG, data position and the task's own state),
SIGTERM handling, the NaN check, MLflow tracking and the final export.

A `Task` owns what differs: which modules exist, which of them are trained, the loss of a batch,
hooks after each optimiser update (an EMA teacher), its own per-step schedules (teacher temperature,
momentum) and what evaluation receives. `SupervisedTask` and the DINOv2 `DinoTask` (vfm.tasks)
implement it; `vfm.tasks.task_for` picks one. Nothing in vfm.train imports a task.

Call order, per process:

    task.build(ctx)                      # modules on ctx.init_device (meta); non-trained ones sharded with ctx.shard
    model = wrap(task.trainable())       # FSDP2 shards on meta; then every module in task.modules() is
                                         # materialised on ctx.device (vfm.train.meta_init); DDP wraps after
    opt = AdamW(task.param_groups(model))
    loader = task.make_loader(rank, world, seed)
    [resume: model, opt, scaler, loader, task.load_state_dict, RNG]
    for step in range(start, total):     # `step` = optimiser updates done before this one
        for each micro-batch:            # batch already moved to ctx.device
            loss, metrics = task.loss(model, batch, step)    # under autocast
        ... clip, optimiser step, schedules ...
        task.after_update(model, step)   # step = the update just done
    module, meta = task.export()         # rank 0 saves it (full state dict gathered by the loop)

The numbers both sides share (accumulation, steps per epoch, total steps, warmup, peak lr, FLOPs per
sample) are resolved once, before the loop starts (`vfm.recipes.derive.resolve_stage`), and reach the
task as `ctx.stage`.

Param-group keys the loop understands (besides `params`, `weight_decay`):
  - `lr_scale` (timm's layer decay convention): group lr = scheduled lr × lr_scale;
  - `wd_scale`: group weight decay = scheduled weight decay × wd_scale (default: 1 if the group's
    `weight_decay` > 0 else 0, so timm's no-decay groups stay at 0 under a weight-decay schedule);
  - `frozen_until_step`: the group's lr is 0 for updates with step < this (DINOv2 last-layer freezing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from vfm.export import ExportMeta

if TYPE_CHECKING:  # types only: the engine imports no task registry at run time
    from vfm.recipes.derive import ResolvedStage
    from vfm.recipes.schema import Recipe, StageConfig


@runtime_checkable
class StatefulLoader(Protocol):
    """An iterable of batches whose exact position can be saved and restored (for bit-exact resume).

    Iterating again after exhaustion starts the next epoch; `state_dict()` taken between batches and
    loaded into a fresh loader makes it yield exactly the batches the original would have yielded next.
    """

    def __iter__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TaskContext:
    """What a task may know about the run when it builds its modules."""

    stage: ResolvedStage
    """The recipe stage with its derived numbers (total steps, steps per epoch, world size, ...)."""
    device: torch.device
    rank: int
    seed: int
    shard: Callable[[nn.Module], nn.Module] = field(default=lambda m: m)
    """Shard a module the way the trainable one is sharded (FSDP2 `fully_shard` per block; identity
    under DDP). An EMA teacher sharded like its student can be updated shard by shard."""
    init: str | None = None
    """Export directory (local or s3://) to initialise from (fine-tuning), or None."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific command-line options (e.g. `head_from_wnids`)."""
    deferred: bool = False
    """Build on the meta device: `vfm.train.setup` records the build and materialises `Task.modules()` on
    `device` after sharding (vfm.train.meta_init), so no rank ever holds the whole model."""

    @property
    def init_device(self) -> torch.device:
        """Where `Task.build` creates its modules (parameters, buffers): meta when deferred, else `device`."""
        return torch.device("meta") if self.deferred else self.device

    @property
    def recipe(self) -> Recipe:
        return self.stage.recipe

    @property
    def config(self) -> StageConfig:
        return self.stage.config

    @property
    def world_size(self) -> int:
        return self.stage.world_size


class Task(Protocol):
    def build(self, ctx: TaskContext) -> None:
        """Create all modules on `ctx.init_device` (and load `ctx.init` if given). Called once, before wrapping.
        Under deferred init (the trainer's default) the values come from replaying this build, so it must be
        deterministic given the RNG and build every tensor a module owns here."""
        ...

    def modules(self) -> dict[str, nn.Module]:
        """Every module `build` made, by name (the trainable one, an EMA or teacher, loss modules with
        buffers): the ones deferred init materialises."""
        ...

    def trainable(self) -> nn.Module:
        """The module wrapped by DDP/FSDP2 and optimised (the student for DINOv2)."""
        ...

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimiser groups of the *wrapped* trainable module: weight-decay exclusions, layer decay
        (`lr_scale`), multipliers, `frozen_until_step` flags (see module docstring)."""
        ...

    def make_loader(self, rank: int, world_size: int, seed: int) -> StatefulLoader:
        """This rank's training batches: micro-batch sized, deterministic for (rank, world_size, seed)."""
        ...

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Scalar loss of one micro-batch and metrics to log. `model` is the wrapped trainable module
        (call it, not `trainable()`, so DDP/FSDP hooks fire); runs under the loop's autocast. Metrics are
        detached device tensors (or plain floats): never `.item()` them here, the loop reads them back only
        on logging steps, so an update that does not log never waits for the device."""
        ...

    def clip_groups(self, model: nn.Module) -> list[list[nn.Parameter]] | None:
        """Parameter groups whose gradients are clipped separately (each to `optim.clip_grad`), e.g.
        DINOv2's backbone and heads; None clips one norm over every parameter."""
        ...

    def after_update(self, model: nn.Module, step: int) -> dict[str, float] | None:
        """Called after optimiser update `step` (0-based) on every rank, e.g. the EMA teacher update.
        Metrics it returns (rank 0's): `train/*` scalars are logged with the next logging step; others
        (a periodic k-NN of the teacher) at this step."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Extra state not in the trainable module (teacher, centers, EMA). Tensors may be DTensors;
        the loop saves it with torch.distributed.checkpoint next to the model."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @classmethod
    def train_flops_per_sample(cls, recipe: Recipe, stage: str, num_classes: int | None) -> float:
        """Counted training FLOPs of one sample (forward + backward and any extra forward), from the
        recipe alone, on the meta device: the one count `vfm plan` prices and the loop's MFU divides by
        (through `ResolvedStage.train_flops_per_sample`)."""
        ...

    def export(self) -> tuple[nn.Module, ExportMeta]:
        """The module evaluation receives (classifier; teacher backbone) and its metadata. The loop
        gathers a full state dict from it if it is sharded and rank 0 writes it."""
        ...


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (images for (images, labels))."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, Iterable):
        return batch_size_of(next(iter(batch)))
    raise TypeError(f"cannot tell the batch size of {type(batch).__name__}")
