"""Helpers of the trainer tests: an in-memory `Task` that drives the loop through the protocol alone,
and the 2-rank command lines of the real entry point (supervised through vfm.train.torchrun, DINOv2
pretraining through torchrun)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from vfm.export import ExportMeta
from vfm.models import build_model, model_kwargs
from vfm.train.optim import param_groups

# ---- an in-memory task: exercises the loop through the Task protocol alone -----------------------




class MemoryLoader:
    """Deterministic epochs over in-memory tensors; the position is the number of batches yielded."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, rank: int, world: int, seed: int):
        self.x, self.y, self.batch, self.rank, self.world, self.seed = x, y, batch, rank, world, seed
        self.per_epoch = len(x) // (batch * world)
        self.yielded = 0

    def __iter__(self):
        """The rest of the current epoch; iterating again after it starts the next one."""
        epoch, k = divmod(self.yielded, self.per_epoch)
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 100 + epoch))
        for j in range(k, self.per_epoch):
            idx = order[(j * self.world + self.rank) * self.batch:][: self.batch]
            self.yielded += 1
            yield self.x[idx], self.y[idx]

    def state_dict(self):
        return {"yielded": self.yielded}

    def load_state_dict(self, state):
        self.yielded = state["yielded"]


def learnable_set(n: int = 64, classes: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    means = torch.linspace(-1, 1, classes)[:, None, None, None] * torch.tensor([1.0, -1.0, 0.5])[:, None, None]
    return means[y] + 0.5 * torch.randn(n, 3, size, size, generator=g), y


class MemoryTask:
    """Classification of `learnable_set` with the recipe's model; `nan_at` makes step N's loss NaN."""

    def __init__(self, nan_at: int | None = None, data: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.nan_at, self.data = nan_at, data or learnable_set()
        self.num_samples = len(self.data[0])

    def build(self, ctx):
        self.ctx = ctx
        self.model = build_model(ctx.recipe, ctx.stage.name, num_classes=4, device=ctx.init_device)

    def trainable(self) -> nn.Module:
        return self.model

    def modules(self):
        return {"model": self.model}

    def param_groups(self, model):
        return param_groups(model, self.ctx.config.optim)

    def make_loader(self, rank, world_size, seed):
        return MemoryLoader(*self.data, self.ctx.config.batch.micro_batch, rank, world_size, seed)

    def loss(self, model, batch, step):
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        if self.nan_at is not None and step + 1 >= self.nan_at:
            loss = loss * float("nan")
        return loss, {}

    def clip_groups(self, model):
        return None

    def after_update(self, model, step):
        return None  # a plain classifier: no EMA teacher or other per-update work

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        assert state == {}, f"this task checkpoints no extra state, got {sorted(state)}"

    def export(self):
        r = self.ctx.recipe
        kwargs = {k: v for k, v in model_kwargs(r, self.ctx.stage.name).items() if k != "num_classes"}
        return self.model, ExportMeta(timm_name=r.model.timm_name, kwargs=kwargs, num_classes=4, recipe_id=r.id,
                                      stage=self.ctx.stage.name, resolution=32)


# ---- subprocess runs ------------------------------------------------------------------------------
EASY = ("data.augment.mixup=0", "data.augment.cutmix=0", "data.augment.rand_augment=null",
        "data.augment.random_erase=0", "data.augment.label_smoothing=0", "data.augment.scale=[0.6,1.0]",
        "drop_path=0", "optim.lr=2e-3")
"""Stage overrides that make the synthetic set learnable in a dozen updates (for "the loss falls")."""


def stage_sets(stage: str, items: tuple[str, ...] | list[str]) -> list[str]:
    return [a for item in items for a in ("--set", f"stages.{stage}.{item}")]


def train_cmd(recipe: str, stage: str, data: str, out, *extra: str, nproc: int = 2) -> list[str]:
    """`python -m vfm.train.torchrun --nproc-per-node N -m vfm.trainer ...` on the smoke profile."""
    return [sys.executable, "-m", "vfm.train.torchrun", "--nproc-per-node", str(nproc), "--standalone",
            "-m", "vfm.trainer", recipe, "--stage", stage, "--data", data, "--out", str(out), "--profile", "smoke",
            "--log-every", "1", "--deterministic", *extra]


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def losses(log: str) -> list[float]:
    """Per-update losses that rank 0 logged (`step N/M loss X`)."""
    return [float(x) for x in re.findall(r"step \d+/\d+ loss (\S+)", log)]


def ssl_pretrain(recipe: str, data: str, out: Path, *extra: str, env: dict[str, str] | None = None,
                 timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m vfm.trainer RECIPE --stage pretrain` on the smoke profile (gloo, CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "vfm.trainer", recipe, "--stage", "pretrain", "--data", data, "--out", str(out),
           "--profile", "smoke", "--log-every", "1", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full_env.pop("MLFLOW_TRACKING_URI", None)  # tracking only where a test asks for it
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert proc.returncode == 0, f"vfm train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
