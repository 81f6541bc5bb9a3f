"""The training loop shared by every task (supervised classification, DINOv2).

`train(task, spec)` runs in each torchrun process: set up (vfm.train.setup) → resume if a complete
checkpoint exists → one optimiser update per iteration (accumulating micro-batches) → checkpoint
every N updates → export. What is trained and how its loss is computed is the `Task`'s business
(vfm.train.task); the stage's numbers (accumulation, lengths, lr, FLOPs) arrive resolved in
`RunSpec.stage`. What a checkpoint holds, and why resume is bit-exact, is vfm.train.checkpoint's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from vfm import dist as vdist
from vfm import storage
from vfm.data.manifest import Manifest
from vfm.errors import UserError
from vfm.export import export_trained
from vfm.recipes.gpus import GPU_SPECS
from vfm.registry import log_export_model
from vfm.tracking import TrackedRun, system_metrics, system_metrics_wanted, tracked_run
from vfm.train.checkpoint import Checkpointer, TrainState
from vfm.train.parallel import set_gradient_sync
from vfm.train.setup import setup
from vfm.train.signals import RETRYABLE_EXIT, StopRequest
from vfm.train.task import StatefulLoader, Task, batch_size_of, move_to

if TYPE_CHECKING:  # types only: the engine imports no task registry at run time
    from vfm.recipes.derive import ResolvedStage

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# updates between host syncs at most (whatever log_every says): how late a SIGTERM or a NaN is noticed
MAX_STEPS_BETWEEN_SYNCS = 10


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: not retryable (a restart would diverge again from the same checkpoint)."""


@dataclass
class RunSpec:
    stage: ResolvedStage
    """The recipe stage with its derived numbers, resolved for this run's world size and data."""
    out: str
    """Local directory or s3:// prefix: checkpoints/ and export/ go under it."""
    seed: int = 0
    init: str | None = None
    max_steps: int | None = None
    """Stop after this many updates (the lr schedule still spans the recipe's full length)."""
    run_key: str | None = None
    parent_run_id: str | None = None
    run_name: str | None = None
    """MLflow run name; None: `<recipe>-<stage>-seed<seed>` (an ablation cell names its cell)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags of the run (e.g. `vfm.cell`)."""
    tracking_uri: str | None = None
    deterministic: bool = False
    log_every: int = 10
    peak_flops: float | None = None
    """Per-device peak for the MFU estimate; None takes the recipe's hardware.gpu (vfm.recipes.gpus)."""
    options: dict[str, Any] = field(default_factory=dict)
    system_metrics: bool | None = None
    """MLflow system metrics from one rank per node; None: on unless the smoke profile (vfm.tracking)."""


@dataclass
class TrainResult:
    step: int
    export: str | None
    losses: list[float]
    run_id: str | None = None


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
               scaler: torch.amp.GradScaler | None, clip_groups: list[list[nn.Parameter]] | None = None,
               ) -> tuple[Tensor, Tensor, dict[str, Tensor | float], int]:
    """One optimiser update over `accum` micro-batches: (mean loss, grad norm, task metrics, samples).

    Each micro-loss is divided by `accum`, so the update equals one step on the concatenated batch; the
    gradient all-reduce / reduce-scatter runs only on the last micro-step. Loss, norm and metrics stay
    device tensors: nothing here waits for the device (fp16's GradScaler reads its inf flag, its one sync).
    """
    optimizer.zero_grad(set_to_none=True)
    dtype = AUTOCAST[precision]
    loss_sum = torch.zeros((), device=device)
    metrics: dict[str, Tensor | float] = {}
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
    groups = clip_groups or [list(model.parameters())]  # the task's groups are clipped one by one
    norms = []
    for group in groups:
        params = [p for p in group if p.grad is not None]
        if not params:
            continue
        if clip is not None:
            n = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        else:
            n = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    # the logged norm is the whole gradient's (before clipping), whatever the groups
    norm = torch.stack(norms).float().square().sum().sqrt() if norms else torch.zeros((), device=device)
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
            recipe, name = spec.stage.recipe, spec.stage.name
            key = spec.run_key or f"{recipe.id}/{name}/seed{spec.seed}/{spec.out}"
            opened = tracked_run(recipe, stage=name, run_key=key, parent_run_id=spec.parent_run_id,
                                 uri=spec.tracking_uri, run_name=spec.run_name or f"{recipe.id}-{name}-seed{spec.seed}",
                                 extra_tags={"vfm.seed": str(spec.seed), **spec.tags}, background=True)
        else:
            opened = contextlib.nullcontext(TrackedRun(client=None, run_id=None))
        with opened as run:
            # rank 0 opens the run; the first rank of every node logs its system metrics into it
            run_id = vdist.broadcast_object(run.run_id)
            wanted = system_metrics_wanted(spec.stage.recipe, spec.system_metrics) and info.local_rank == 0
            with system_metrics(run_id if wanted else None, node_id=f"node{info.node_rank}", uri=spec.tracking_uri):
                return _run(task, spec, info, stop, run)
    finally:
        stop.restore()


def _run(task: Task, spec: RunSpec, info: vdist.DistInfo, stop: StopRequest, run: TrackedRun) -> TrainResult:
    stage, device = spec.stage, info.device
    st, recipe, total, accum = stage.config, stage.recipe, stage.total_steps, stage.grad_accum
    if stage.world_size != info.world_size:
        raise UserError(f"{stage.where} was resolved for {stage.world_size} processes but this run has "
                        f"{info.world_size}; resolve it with the run's world size")
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    end = min(total, spec.max_steps) if spec.max_steps else total
    t = setup(task, stage, device=device, rank=info.rank, seed=spec.seed, init=spec.init, options=spec.options)
    model, optimizer, schedules = t.model, t.optimizer, t.schedules

    ckpt = Checkpointer(f"{spec.out.rstrip('/')}/checkpoints", keep=st.keep_checkpoints, rank=info.rank,
                        world_size=info.world_size)
    state = TrainState(model, optimizer, task, t.scaler, schedules, t.loader)
    start = 0
    if (latest := ckpt.latest()) is not None:
        start = state.restore(ckpt, latest)
        log.info("resumed from %s/checkpoints step %d of %d", spec.out, start, total)
    if isinstance(manifest := getattr(t.loader, "manifest", None), Manifest):  # a vfm shard loader's data
        run.log_dataset(manifest, "training")
    run.log_params({"train.world_size": info.world_size, "train.grad_accum": accum, "train.total_steps": total,
                    "train.peak_lr": stage.peak_lr, "train.seed": spec.seed})

    flops_per_sample = stage.train_flops_per_sample
    peak = spec.peak_flops or _peak_flops(recipe.hardware.gpu, device)
    batches, losses = Batches(t.loader), []
    clip_groups = task.clip_groups(model)
    pending: list[Tensor] = []  # per-update losses not yet read back (read on sync steps only)
    sync_every = min(spec.log_every, MAX_STEPS_BETWEEN_SYNCS)
    t_log, samples_since = time.perf_counter(), 0
    for step in range(start, end):
        schedules.apply(step)
        loss, norm, metrics, samples = train_step(model, task, optimizer, batches, step=step, accum=accum,
                                                  device=device, precision=st.precision, clip=st.optim.clip_grad,
                                                  scaler=t.scaler, clip_groups=clip_groups)
        extra = task.after_update(model, step) or {}  # e.g. DINOv2: teacher momentum, periodic k-NN
        pending.append(loss)
        samples_since += samples
        done = step + 1
        logging_step = done % spec.log_every == 0 or done == end or done == start + 1
        checkpoint_step = done % st.checkpoint_every_steps == 0 or done == end
        # a task's `train/*` scalars ride with the logging steps; anything else (an evaluation such as the
        # periodic k-NN) is logged at its own step
        if info.is_main and (events := {k: v for k, v in extra.items() if logging_step or not k.startswith("train/")}):
            run.log_metrics(events, step=done)
        if not (logging_step or checkpoint_step or done % sync_every == 0):
            continue  # no host sync on this update
        # the one sync of these updates: one collective for their losses (the log and the NaN check)
        # and for whether any rank got SIGTERM, read back once
        reduced = vdist.mean_tensor_over_ranks(torch.cat([torch.stack(pending).float().reshape(-1),
                                                          torch.tensor([float(stop.requested)], device=device)]))
        *step_losses, stopping = reduced.tolist()
        first = done - len(pending) + 1
        pending = []
        for i, value in enumerate(step_losses):
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss is {value} at step {first + i} (update {first + i} of {total}) in "
                                       f"{recipe.id}/{stage.name}; the last checkpoint under {spec.out}/checkpoints "
                                       "precedes it — lower the lr, enable clipping or check the data")
        losses += step_losses
        if info.is_main and logging_step:
            dt, n = time.perf_counter() - t_log, len(step_losses)
            imgs = samples_since * info.world_size / dt
            _log_step(run, done, end, {"loss": step_losses[-1], "lr": schedules.current_lr(), "grad_norm": float(norm),
                                       "images_per_s": imgs, "step_time_s": dt / n,
                                       **{k: float(v) for k, v in metrics.items()}},
                      flops=imgs * flops_per_sample / info.world_size, peak=peak, device=device)
        if logging_step:
            t_log, samples_since = time.perf_counter(), 0
        if stopping:
            state.save(ckpt, done)  # synchronous (after any save in flight): the process exits next
            log.warning("stopped by signal at step %d; checkpoint saved, exiting %d", done, RETRYABLE_EXIT)
            raise SystemExit(RETRYABLE_EXIT)
        if checkpoint_step:
            state.save(ckpt, done, asynchronous=st.async_checkpoint and done != end)
    ckpt.wait()
    step_reached = max(start, end)
    module, meta = task.export()
    meta.step, meta.seed = step_reached, spec.seed
    # collective: every rank takes part in gathering sharded weights; rank 0 writes them
    # storage.join, as the pipeline names it (steps.train): the export's URL is how the registry finds its run
    export = export_trained(module, meta, storage.join(spec.out, "export"), is_main=info.is_main, run=run)
    if export is not None and run.enabled:
        try:  # the export as an MLflow LoggedModel of this run, its final loss linked to it (a key of its own:
            # a second train/loss point at the last step would add to the curve the loop already logged)
            log_export_model(run.client, run.run_id, export, name=f"{recipe.id}-{stage.name}-seed{spec.seed}",
                             tags={"vfm.recipe": recipe.id, "vfm.stage": stage.name, "vfm.seed": str(spec.seed)},
                             metrics={"train/final_loss": losses[-1]} if losses else {}, step=step_reached)
        except Exception as exc:  # the export stands; only its model record is missing
            log.warning("the export %s could not be logged as an MLflow model of run %s: %s", export, run.run_id, exc)
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


def _peak_flops(gpu: str, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return GPU_SPECS.get(gpu, (None, None))[0]


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # CPU: the process's peak resident set (kilobytes on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 if sys.platform != "darwin" else 0.0
