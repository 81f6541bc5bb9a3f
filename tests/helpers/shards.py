"""Tiny learnable shard sets, made with vfm.data itself (synthetic JPEG folder → `vfm shard folder` →
manifest), for the trainer and DINOv2 tests."""

from __future__ import annotations

from pathlib import Path


def make_shards(root: Path, *, num_classes: int = 4, per_class: int = 16, size: int = 32, seed: int = 0,
                samples_per_shard: int = 16) -> str:
    """Write a synthetic folder tree under `root` and shard it; returns the manifest path."""
    from vfm.data.shard import write_dataset
    from vfm.data.sources import index_source
    from vfm.data.synthetic import make_synthetic_folder

    folder = make_synthetic_folder(root / "folder", num_classes=num_classes, per_class=per_class, size=size, seed=seed)
    report = write_dataset(index_source("folder", str(folder)), str(root / "shards"), split="train", seed=seed,
                           max_samples_per_shard=samples_per_shard)
    assert report.manifest is not None
    return report.manifest.location
