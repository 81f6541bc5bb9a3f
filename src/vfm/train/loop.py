"""The training loop shared by every task (supervised classification, DINOv2).

`train(task, spec)` runs in each torchrun process: set up → resume if a complete checkpoint exists →
one optimiser update per iteration (accumulating micro-batches) → checkpoint every N updates →
export. What is trained and how its loss is computed is the `Task`'s business (vfm.train.task).

Exactness of resume: every source of randomness and order is part of the checkpoint — model,
optimiser, grad scaler, schedule, task state (EMA / teacher), the data loader's position and the
torch / numpy / python RNG states of every rank — so a run killed after a checkpoint and restarted
ends with the same parameters as one that never stopped (bit-exact on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from vfm import dist as vdist
from vfm.errors import UserError
from vfm.export import save_export
from vfm.recipes.datasets import DATASET_SIZES
from vfm.recipes.schema import Recipe
from vfm.tracking import TrackedRun, tracked_run
from vfm.train.checkpoint import Checkpointer
from vfm.train.optim import Schedules, build_optimizer
from vfm.train.parallel import apply_speed_switches, set_gradient_sync, shard, wrap
from vfm.train.signals import RETRYABLE_EXIT, StopRequest
from vfm.train.task import StatefulLoader, Task, TaskContext, batch_size_of, move_to

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: not retryable (a restart would diverge again from the same checkpoint)."""


@dataclass
class RunSpec:
    recipe: Recipe
    stage: str
    out: str
    """Local directory or s3:// prefix: checkpoints/ and export/ go under it."""
    seed: int = 0
    init: str | None = None
    max_steps: int | None = None
    """Stop after this many updates (the lr schedule still spans the recipe's full length)."""
    run_key: str | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    deterministic: bool = False
    log_every: int = 10
    peak_flops: float | None = None
    """Per-device peak for the MFU estimate; None takes the recipe's hardware.gpu from vfm.plan."""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_config(self):
        return self.recipe.stages[self.stage]  # type: ignore[index]


@dataclass
class TrainResult:
    step: int
    export: str | None
    losses: list[float]
    run_id: str | None = None


def schedule_lengths(recipe: Recipe, stage: str, dataset_samples: int | None) -> tuple[int, int]:
    """(total optimiser updates, updates per epoch) from the recipe, as `vfm plan` computes them."""
    st = recipe.stages[stage]  # type: ignore[index]
    if recipe.ssl is not None and stage == "pretrain" and recipe.ssl.epoch_length_steps:
        per_epoch = recipe.ssl.epoch_length_steps
    else:
        samples = st.num_samples or dataset_samples or DATASET_SIZES.get(st.data.dataset, 0)
        if not samples:
            raise UserError(f"stages.{stage}: cannot tell the epoch size of `{st.data.dataset}`; set "
                            f"stages.{stage}.num_samples")
        per_epoch = max(1, math.ceil(samples / st.batch.global_batch))
    total = st.steps if st.steps is not None else math.ceil((st.epochs or 0) * per_epoch)
    return total, per_epoch


def grad_accum(recipe: Recipe, stage: str, world_size: int) -> int:
    """Micro-steps per update so that global batch = micro × accumulation × world size."""
    b = recipe.stages[stage].batch  # type: ignore[index]
    if b.grad_accum is not None:
        if b.micro_batch * b.grad_accum * world_size != b.global_batch:
            raise UserError(f"stages.{stage}.batch: micro {b.micro_batch} × grad_accum {b.grad_accum} × world "
                            f"{world_size} ≠ global {b.global_batch}; drop grad_accum to derive it")
        return b.grad_accum
    if b.global_batch % (b.micro_batch * world_size):
        raise UserError(f"stages.{stage}.batch.global_batch={b.global_batch} is not a multiple of micro_batch "
                        f"{b.micro_batch} × {world_size} processes; change the batch or the process count")
    return b.global_batch // (b.micro_batch * world_size)


# ---- randomness ----------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- one update ----------------------------------------------------------------------------------
class Batches:
    """Endless batches from a stateful loader: a new epoch starts when one is exhausted."""

    def __init__(self, loader: StatefulLoader):
        self.loader = loader
        self._it: Iterator | None = None

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise UserError("the training data yields no batch: fewer samples per rank than one micro-batch? "
                        "Check the manifest and stages.<stage>.batch.micro_batch")


def train_step(model: nn.Module, task: Task, optimizer: torch.optim.Optimizer, batches: Batches, *,
               step: int, accum: int, device: torch.device, precision: str, clip: float | None,
               scaler: torch.amp.GradScaler | None) -> tuple[Tensor, Tensor, dict[str, float], int]:
    """One optimiser update over `accum` micro-batches: (summed loss, grad norm, task metrics, samples).

    Each micro-loss is divided by `accum`, so the update equals one step on the concatenated batch; the
    gradient all-reduce / reduce-scatter runs only on the last micro-step.
    """
    optimizer.zero_grad(set_to_none=True)
    dtype = AUTOCAST[precision]
    loss_sum = torch.zeros((), device=device)
    metrics: dict[str, float] = {}
    samples = 0
    for i in range(accum):
        last = i == accum - 1
        batch = move_to(batches.next(), device)
        samples += batch_size_of(batch)
        set_gradient_sync(model, last)
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, m = task.loss(model, batch, step)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v / accum
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss_sum / accum, norm, metrics, samples


# ---- the run -------------------------------------------------------------------------------------
def train(task: Task, spec: RunSpec) -> TrainResult:
    """Entry point of every rank. SIGTERM → checkpoint + `SystemExit(143)`; NaN/inf → TrainingDiverged."""
    info = vdist.init_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"[rank{info.rank}] %(asctime)s %(name)s: %(message)s")
    stop = StopRequest().install()
    try:
        if info.is_main:
            key = spec.run_key or f"{spec.recipe.id}/{spec.stage}/seed{spec.seed}/{spec.out}"
            opened = tracked_run(spec.recipe, stage=spec.stage, run_key=key, parent_run_id=spec.parent_run_id,
                                 uri=spec.tracking_uri, run_name=f"{spec.recipe.id}-{spec.stage}-seed{spec.seed}",
                                 extra_tags={"vfm.seed": str(spec.seed)})
        else:
            opened = contextlib.nullcontext(TrackedRun(client=None, run_id=None))
        with opened as run:
            return _run(task, spec, info, stop, run)
    finally:
        stop.restore()


def _run(task: Task, spec: RunSpec, info: vdist.DistInfo, stop: StopRequest, run: TrackedRun) -> TrainResult:
    st, device = spec.stage_config, info.device
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    accum = grad_accum(spec.recipe, spec.stage, info.world_size)
    total, per_epoch = schedule_lengths(spec.recipe, spec.stage, getattr(task, "num_samples", None))
    end = min(total, spec.max_steps) if spec.max_steps else total

    # identical initialisation on every rank (FSDP2 keeps each rank's own shard of it)
    seed_all(spec.seed)
    ctx = TaskContext(recipe=spec.recipe, stage=spec.stage, device=device, rank=info.rank,
                      world_size=info.world_size, seed=spec.seed, total_steps=total, steps_per_epoch=per_epoch,
                      shard=shard if st.parallelism == "fsdp" else (lambda m: m), init=spec.init,
                      options=spec.options)
    task.build(ctx)
    model = apply_speed_switches(task.trainable(), family=spec.recipe.model.family,
                                 activation_checkpointing=st.activation_checkpointing, compile=st.compile,
                                 device=device)
    model = wrap(model, st.parallelism, device)
    peak_lr = st.optim.peak_lr(st.batch.global_batch)
    optimizer = build_optimizer(task.param_groups(model), st.optim, peak_lr, device)
    schedules = Schedules(optimizer, st.optim, peak_lr=peak_lr, total_steps=total, steps_per_epoch=per_epoch)
    scaler = _grad_scaler(st.precision, st.parallelism, device)
    loader = task.make_loader(info.rank, info.world_size, spec.seed)
    seed_all(spec.seed * 1000 + info.rank)  # per-rank randomness (drop-path, Mixup) differs across ranks

    ckpt = Checkpointer(f"{spec.out.rstrip('/')}/checkpoints", keep=st.keep_checkpoints, rank=info.rank,
                        world_size=info.world_size)
    state = TrainState(model, optimizer, task, scaler, schedules, loader)
    start = 0
    if (latest := ckpt.latest()) is not None:
        start = state.restore(ckpt, latest)
        log.info("resumed from %s/checkpoints step %d of %d", spec.out, start, total)
    run.log_params({"train.world_size": info.world_size, "train.grad_accum": accum, "train.total_steps": total,
                    "train.peak_lr": peak_lr, "train.seed": spec.seed})

    flops_per_sample = task.train_flops_per_sample()
    peak = spec.peak_flops or _peak_flops(spec.recipe.hardware.gpu, device)
    batches, losses = Batches(loader), []
    for step in range(start, end):
        t0 = time.perf_counter()
        schedules.apply(step)
        loss, norm, metrics, samples = train_step(model, task, optimizer, batches, step=step, accum=accum,
                                                  device=device, precision=st.precision, clip=st.optim.clip_grad,
                                                  scaler=scaler)
        extra = task.after_update(model, step) or {}  # e.g. DINOv2: teacher momentum, periodic k-NN
        # one collective per update: mean loss for the log and the NaN check, and whether any rank got SIGTERM
        mean_loss, stopping = vdist.mean_over_ranks([loss.item(), float(stop.requested)], device)
        done = step + 1
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"loss is {mean_loss} at step {done} (update {done} of {total}) in "
                                   f"{spec.recipe.id}/{spec.stage}; the last checkpoint under {spec.out}/checkpoints "
                                   "precedes it — lower the lr, enable clipping or check the data")
        losses.append(mean_loss)
        dt = time.perf_counter() - t0
        if info.is_main and (done % spec.log_every == 0 or done == end or done == start + 1):
            imgs = samples * info.world_size / dt
            _log_step(run, done, end, {"loss": mean_loss, "lr": schedules.current_lr(), "grad_norm": float(norm),
                                       "images_per_s": imgs, "step_time_s": dt, **metrics},
                      flops=imgs * flops_per_sample / info.world_size, peak=peak, device=device)
        if info.is_main and extra:
            run.log_metrics(extra, step=done)
        if stopping:
            state.save(ckpt, done)
            log.warning("stopped by signal at step %d; checkpoint saved, exiting %d", done, RETRYABLE_EXIT)
            raise SystemExit(RETRYABLE_EXIT)
        if done % st.checkpoint_every_steps == 0 or done == end:
            state.save(ckpt, done)
    step_reached = max(start, end)
    export = _export(task, spec, info, run, step_reached)
    vdist.barrier()
    return TrainResult(step=step_reached, export=export, losses=losses, run_id=run.run_id)


def _log_step(run: TrackedRun, done: int, end: int, m: dict[str, float], *, flops: float, peak: float | None,
              device: torch.device) -> None:
    """Rank 0: metrics to MLflow (`train/...`) and a progress line. `flops` = achieved FLOP/s per device."""
    m = {**m, "tflops_per_device": flops / 1e12, "peak_memory_gb": _peak_memory_gb(device)}
    if peak:
        m["mfu"] = flops / peak  # counted training FLOPs (3 × forward) over the device's dense peak
    run.log_metrics({f"train/{k}": v for k, v in m.items()}, step=done)
    log.info("step %d/%d loss %.4f lr %.3g grad-norm %.3g %.1f img/s %.2fs", done, end, m["loss"], m["lr"],
             m["grad_norm"], m["images_per_s"], m["step_time_s"])


def _grad_scaler(precision: str, parallelism: str, device: torch.device) -> torch.amp.GradScaler | None:
    if precision != "fp16":
        return None
    if parallelism == "fsdp":
        # all-reduces the inf check across ranks, since each rank only sees its own gradient shards
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


@dataclass
class TrainState:
    """Everything a checkpoint holds, saved and restored together (see the module docstring)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    task: Task
    scaler: torch.amp.GradScaler | None
    schedules: Schedules
    loader: StatefulLoader

    def _tensors(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # DCP-ready under DDP and FSDP2
        return {"model": model_sd, "optim": optim_sd, "task": self.task.state_dict()}

    def save(self, ckpt: Checkpointer, step: int) -> None:
        objects = {"step": step, "scaler": self.scaler.state_dict() if self.scaler else None,
                   "schedule": self.schedules.state_dict()}
        ckpt.save(step, self._tensors(), objects, {"rng": rng_state(), "loader": self.loader.state_dict()})

    def restore(self, ckpt: Checkpointer, step: int) -> int:
        tensors = self._tensors()
        objects, mine = ckpt.load(step, tensors)
        set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optim"])
        self.task.load_state_dict(tensors["task"])
        if self.scaler is not None and objects["scaler"] is not None:
            self.scaler.load_state_dict(objects["scaler"])
        self.schedules.load_state_dict(objects["schedule"])
        try:
            self.loader.load_state_dict(mine["loader"])
        except ValueError as exc:  # e.g. another world size / worker count: the position does not transfer
            raise UserError(f"checkpoint step {step}: cannot restore the data position: {exc}") from None
        set_rng_state(mine["rng"])
        return int(objects["step"])


class _FullState(nn.Module):
    """Presents an already gathered state dict through `state_dict()` for `save_export`."""

    def __init__(self, state: dict[str, Tensor]):
        super().__init__()
        self._full = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return self._full


def _export(task: Task, spec: RunSpec, info: vdist.DistInfo, run: TrackedRun, step: int) -> str | None:
    module, meta = task.export()
    meta.step, meta.seed = step, spec.seed
    # collective: every rank takes part in gathering sharded (DTensor) weights; only rank 0 receives
    # them, in CPU memory, so a sharded ViT-g is never materialised on every GPU
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    dest = f"{spec.out.rstrip('/')}/export"
    view = _FullState(full)
    if run.enabled:
        with tempfile.TemporaryDirectory() as tmp:
            save_export(view, meta, Path(tmp))
            run.log_artifact(tmp, "export")
    save_export(view, meta, dest)
    log.info("exported %s (step %d) to %s", meta.timm_name, step, dest)
    return dest


def _peak_flops(gpu: str, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from vfm.plan import GPU_SPECS

    return GPU_SPECS.get(gpu, (None, None))[0]


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # CPU: the process's peak resident set (kilobytes on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 if sys.platform != "darwin" else 0.0
