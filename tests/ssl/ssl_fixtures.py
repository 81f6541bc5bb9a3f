"""Shard sets and a 2-rank `vfm train` runner for the DINOv2 tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def make_shards(root: Path, *, num_classes: int, per_class: int, seed: int, size: int = 32) -> str:
    """Synthetic learnable JPEG folder → `vfm shard folder` → manifest path."""
    from vfm.data.shard import write_dataset
    from vfm.data.sources import index_source
    from vfm.data.synthetic import make_synthetic_folder

    folder = make_synthetic_folder(root / "folder", num_classes=num_classes, per_class=per_class, size=size,
                                   seed=seed)
    report = write_dataset(index_source("folder", str(folder)), str(root / "shards"), split="train", seed=seed,
                           max_samples_per_shard=16)
    assert report.manifest is not None
    return report.manifest.location


def train(recipe: str, data: str, out: Path, *extra: str, env: dict[str, str] | None = None,
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
