"""Shard loader images/s per core against torchvision ImageFolder + DataLoader on the same images.

    python benchmarks/data_loader_throughput.py [--images 2000] [--size 256] [--resolution 224]

Both run in the main process (num_workers=0, i.e. one core) with the same timm eval transform
(resize + centre crop + normalise) and batch size, over the same JPEG bytes: a folder tree for
ImageFolder, and that tree sharded with `vfm shard folder` for `vfm.data.loader`. Prints images/s of
each and the ratio. Never asserts timings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from vfm.data.loader import build_loader
from vfm.data.shard import write_dataset
from vfm.data.sources import index_source
from vfm.data.synthetic import make_synthetic_folder
from vfm.data.transforms import build_transform
from vfm.recipes.schema import DataConfig


def rate(batches, n_expected: int) -> float:
    t = time.perf_counter()
    n = sum(len(b[1]) for b in batches)
    dt = time.perf_counter() - t
    assert n == n_expected, (n, n_expected)
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tf = build_transform(DataConfig(dataset="folder", resolution=args.resolution), is_training=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_synthetic_folder(root / "src", num_classes=20, per_class=args.images // 20, size=args.size, seed=0)
        n = (args.images // 20) * 20
        write_dataset(index_source("folder", str(root / "src")), str(root / "shards"), shard_size=64_000_000)
        folder = DataLoader(ImageFolder(str(root / "src"), transform=tf), batch_size=args.batch, num_workers=0)
        ours = build_loader(str(root / "shards"), transform=tf, batch_size=args.batch, rank=0, world_size=1, seed=0,
                            shuffle=False, drop_last=False, num_workers=0)
        rate(ours, n)  # warm the page cache for both
        rate(folder, n)
        r_ours, r_folder = rate(ours, n), rate(folder, n)
        print(f"images={n} source={args.size}px -> {args.resolution}px, batch {args.batch}, 1 core")
        print(f"ImageFolder+DataLoader: {r_folder:8.1f} images/s/core")
        print(f"vfm shard loader:       {r_ours:8.1f} images/s/core")
        print(f"ratio vfm/ImageFolder: {r_ours / r_folder:.3f}")


if __name__ == "__main__":
    main()
