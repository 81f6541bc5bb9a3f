"""Throughput of vfm's training step against a plain timm + autocast + AdamW loop, in one process.

Both sides train the same model on the same device-resident synthetic batch, so the comparison is
the step itself (data loading is measured by benchmarks/data_loader_throughput.py). Ours is the
real thing: the recipe stage's task (`vfm.tasks.task_for`) built by the trainer's own `setup`
(speed switches, DDP/FSDP2 wrap, param groups, fused AdamW, schedules) and stepped by its
`train_step`, on a world of one.

MFU = images/s × counted training FLOPs per image (`ResolvedStage.train_flops_per_sample`, the count
`vfm plan` and the loop use) / peak, against both the GPU's dense bf16 spec peak
(vfm.recipes.gpus) and a matmul peak measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from vfm import dist as vdist
from vfm.models import create_model, model_kwargs
from vfm.recipes import Recipe
from vfm.recipes.derive import resolve_stage
from vfm.recipes.gpus import GPU_SPECS
from vfm.tasks import task_for
from vfm.train.loop import AUTOCAST, Batches, train_step
from vfm.train.setup import setup


@dataclass
class Measurement:
    name: str
    micro_batch: int
    steps: int
    images_per_s: float
    step_time_s: float
    """median over the timed steps"""
    train_gflops_per_image: float
    mfu_spec: float | None
    mfu_measured_peak: float | None
    peak_memory_gb: float | None


class _RepeatBatch:
    """An endless loader of one device-resident batch (position-free, so its state is empty)."""

    def __init__(self, batch: Any):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def _uint8_image(size: int, g: torch.Generator) -> torch.Tensor:
    """What the loader's workers hand over (vfm.data.transforms): uint8 CHW, normalised by the task on the device."""
    return torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)


def _synthetic_task(recipe: Recipe, stage: str, num_classes: int, device: torch.device):
    """The recipe stage's real task, fed one synthetic device-resident batch instead of a manifest."""
    spec = task_for(recipe, stage)
    st = recipe.stages[stage]  # type: ignore[index]
    g = torch.Generator().manual_seed(0)

    def multicrop_batch(task, rank, world_size, seed):
        from vfm.ssl.multicrop import make_collate

        mc = task.crops
        samples = [({"global": [_uint8_image(mc.global_crops_size, g) for _ in range(mc.global_crops_count)],
                     "local": [_uint8_image(mc.local_crops_size, g) for _ in range(mc.local_crops_count)]}, -1)
                   for _ in range(st.batch.micro_batch)]
        batch = make_collate(task.ssl, mc, task.patch_size)(samples)
        return _RepeatBatch({k: v.to(device) if v is not None else None for k, v in batch.items()})

    def image_batch(task, rank, world_size, seed):
        res = st.data.resolution
        x = torch.stack([_uint8_image(res, g) for _ in range(st.batch.micro_batch)]).to(device)
        y = torch.randint(0, num_classes, (st.batch.micro_batch,), generator=g).to(device)
        return _RepeatBatch((x, y))

    cls = spec.task_class()
    synthetic = type(f"Synthetic{cls.__name__}", (cls,),
                     {"make_loader": multicrop_batch if spec.name == "dinov2" else image_batch})
    task = synthetic("synthetic://")
    task._manifest = SimpleNamespace(classes=[f"n{i:08d}" for i in range(num_classes)], num_samples=10**6)
    return task


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 20) -> float:
    """Achieved FLOP/s of a square matmul: the practical ceiling MFU is read against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _time(step_fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step_fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _measurement(name: str, batch: int, times: list[float], flops_per_image: float, spec: float | None,
                 measured: float | None, device: torch.device) -> Measurement:
    step = statistics.median(times)
    ips = batch / step
    return Measurement(name=name, micro_batch=batch, steps=len(times), images_per_s=ips, step_time_s=step,
                       train_gflops_per_image=flops_per_image / 1e9,
                       mfu_spec=ips * flops_per_image / spec if spec else None,
                       mfu_measured_peak=ips * flops_per_image / measured if measured else None,
                       peak_memory_gb=_peak_memory(device))


def measure_vfm(recipe: Recipe, stage: str, *, steps: int, warmup: int, num_classes: int,
                spec_peak: float | None, measured_peak: float | None) -> tuple[Measurement, float]:
    """vfm's step: the recipe's task through the loop's own pieces. Returns (measurement, FLOPs/image)."""
    info = vdist.init_distributed()
    device = info.device
    _reset_memory(device)
    task = _synthetic_task(recipe, stage, num_classes, device)
    resolved = resolve_stage(recipe, stage, 1, task.num_samples,
                             num_classes=None if task_for(recipe, stage).headless else num_classes)
    st = resolved.config
    t = setup(task, resolved, device=device, rank=0, seed=0)
    batches = Batches(t.loader)
    counter = iter(range(10**9))
    groups = task.clip_groups(t.model)

    def step() -> None:
        i = next(counter)
        t.schedules.apply(i)
        train_step(t.model, task, t.optimizer, batches, step=i, accum=1, device=device, precision=st.precision,
                   clip=st.optim.clip_grad, scaler=None, clip_groups=groups)
        task.after_update(t.model, i)

    flops = resolved.train_flops_per_sample
    times = _time(step, steps, warmup, device)
    m = _measurement(f"vfm ({st.parallelism}, {st.precision}{', compile' if st.compile else ''}"
                     f"{', act-ckpt' if st.activation_checkpointing else ''})", st.batch.micro_batch, times,
                     flops, spec_peak, measured_peak, device)
    return m, flops


def measure_plain(recipe: Recipe, stage: str, *, steps: int, warmup: int, num_classes: int, flops: float,
                  spec_peak: float | None, measured_peak: float | None) -> Measurement:
    """The baseline users write by hand: timm model, autocast, AdamW, cross-entropy; nothing else."""
    st = recipe.stages[stage]  # type: ignore[index]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    _reset_memory(device)
    kwargs = model_kwargs(recipe, stage, num_classes=num_classes)
    kwargs.pop("dynamic_img_size", None)
    model: nn.Module = create_model(recipe.model.timm_name, **kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    res, batch = st.data.resolution, st.batch.micro_batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    dtype = AUTOCAST[st.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _time(step, steps, warmup, device)
    m = _measurement(f"plain timm ({st.precision} autocast, AdamW)", batch, times, flops, spec_peak,
                     measured_peak, device)
    return m


def compare(recipe: Recipe, stage: str = "pretrain", *, steps: int = 20, warmup: int = 5,
            num_classes: int = 1000, matmul_n: int = 8192) -> dict[str, Any]:
    """Both measurements on this device, same model and batch, plus the peaks they are read against."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    st = recipe.stages[stage]  # type: ignore[index]
    dtype = AUTOCAST[st.precision] or torch.float32
    spec = GPU_SPECS.get(recipe.hardware.gpu, (None, None))[0] if device.type == "cuda" else None
    measured = matmul_peak(device, dtype, n=matmul_n)
    ours, flops = measure_vfm(recipe, stage, steps=steps, warmup=warmup, num_classes=num_classes,
                              spec_peak=spec, measured_peak=measured)
    rows = [ours]
    if not task_for(recipe, stage).headless:  # the plain loop is a classifier; a headless backbone has none
        rows.append(measure_plain(recipe, stage, steps=steps, warmup=warmup, num_classes=num_classes, flops=flops,
                                  spec_peak=spec, measured_peak=measured))
    speedup = rows[0].images_per_s / rows[1].images_per_s if len(rows) == 2 else None
    return {"recipe": recipe.id, "profile": recipe.profile, "stage": stage, "device": _device_name(device),
            "model": recipe.model.timm_name, "resolution": st.data.resolution, "spec_peak_tflops":
            spec / 1e12 if spec else None, "measured_matmul_tflops": measured / 1e12,
            "torch": torch.__version__, "rows": [asdict(r) for r in rows], "speedup_vs_plain": speedup}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def markdown(result: dict[str, Any]) -> str:
    head = (f"**{result['recipe']}** ({result['profile']}, {result['stage']}, {result['model']} @ "
            f"{result['resolution']} px) on {result['device']}, torch {result['torch']}; matmul peak "
            f"{result['measured_matmul_tflops']:.3g} TFLOP/s")
    lines = [head, "", "| step | micro-batch | images/s | step time (s) | MFU (spec) | MFU (measured peak) | "
             "peak memory (GB) |", "|---|---|---|---|---|---|---|"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    for r in result["rows"]:
        mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        lines.append(f"| {r['name']} | {r['micro_batch']} | {r['images_per_s']:.1f} | {r['step_time_s']:.3f} | "
                     f"{pct(r['mfu_spec'])} | {pct(r['mfu_measured_peak'])} | {mem} |")
    if result["speedup_vs_plain"] is not None:
        lines += ["", f"vfm / plain: {result['speedup_vs_plain']:.2f}×"]
    return "\n".join(lines)
