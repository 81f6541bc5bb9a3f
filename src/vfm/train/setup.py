"""Everything a run builds before its first update, in the order that makes it reproducible: the
task's modules (identical on every rank), the speed switches, DDP / FSDP2, the optimiser and its
schedules, the fp16 grad scaler, and the rank's data loader.

The modules are built on the meta device and sharded there; only then does each rank materialise its own
shards (vfm.train.meta_init), with the values an eager CPU build of the same seed gives, whatever the mesh.

`vfm.train.loop` trains what `setup` returns; the throughput harness (vfm.throughput) times the same
pieces, so what it measures is the trainer's step and not a copy of it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vfm.train import meta_init
from vfm.train.optim import Schedules, build_optimizer
from vfm.train.parallel import SHARDED, apply_speed_switches, sharding, uses_channels_last, wrap
from vfm.train.task import StatefulLoader, Task, TaskContext

if TYPE_CHECKING:  # types only: the engine imports no task registry at run time
    from vfm.recipes.derive import ResolvedStage

log = logging.getLogger(__name__)


@dataclass
class Trainee:
    """The wrapped model and what steps it, as `setup` built them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    scaler: torch.amp.GradScaler | None
    loader: StatefulLoader


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(task: Task, stage: ResolvedStage, *, device: torch.device, rank: int, seed: int,
          init: str | None = None, options: dict[str, Any] | None = None) -> Trainee:
    """Build `task` for `stage` on this rank and wrap it for training."""
    st = stage.config
    # identical initialisation on every rank (FSDP2 keeps each rank's own shard of it)
    seed_all(seed)
    sharded = st.parallelism in SHARDED
    how = sharding(st.parallelism, st.precision, device, world_size=stage.world_size,
                   shard_size=st.hsdp_shard_size or stage.recipe.hardware.procs_per_node)
    to_shard: list[nn.Module] = []  # what the task asks to be sharded like the trainable module
    ctx = TaskContext(stage=stage, device=device, rank=rank, seed=seed, init=init, options=dict(options or {}),
                      shard=(lambda m: to_shard.append(m) or m) if sharded else _identity, deferred=True)
    with meta_init.record() as tape:
        task.build(ctx)
    modules = task.modules()
    if not any(task.trainable() is m for m in modules.values()):
        raise TypeError(f"{type(task).__name__}.modules() must include the trainable module")
    wanted = meta_init.targets(modules)
    model = apply_speed_switches(task.trainable(), activation_checkpointing=st.activation_checkpointing,
                                 compile=st.compile,
                                 channels_last=uses_channels_last(st.channels_last, stage.recipe.model.family, device))
    if sharded:  # on meta: each rank only ever allocates its own shards
        for m in to_shard:
            how(m)
        model = wrap(model, st.parallelism, device, how)
    for m in meta_init.deferred(modules, wanted):
        m.to_empty(device=device)
    peak = meta_init.materialize(tape, wanted)
    log.info("materialised %s on %s: peak %.1f MB on the host for %.1f MB of parameters and buffers",
             ", ".join(modules), device, peak / 2**20, sum(t.spec.nbytes for t in wanted) / 2**20)
    if not sharded:
        model = wrap(model, st.parallelism, device, how)
    optimizer = build_optimizer(task.param_groups(model), st.optim, stage.peak_lr, device)
    schedules = Schedules(optimizer, st.optim, peak_lr=stage.peak_lr, total_steps=stage.total_steps,
                          warmup_steps=stage.warmup_steps)
    scaler = grad_scaler(st.precision, st.parallelism, device)
    loader = task.make_loader(rank, stage.world_size, seed)
    seed_all(seed * 1000 + rank)  # per-rank randomness (drop-path, Mixup) differs across ranks
    return Trainee(model=model, optimizer=optimizer, schedules=schedules, scaler=scaler, loader=loader)


def _identity(module: nn.Module) -> nn.Module:
    return module


def grad_scaler(precision: str, parallelism: str, device: torch.device) -> torch.amp.GradScaler | None:
    if precision != "fp16":
        return None
    if parallelism in SHARDED:
        # all-reduces the inf check across ranks, since each rank only sees its own gradient shards
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)

