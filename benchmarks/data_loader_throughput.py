"""Shard loader images/s per core against torchvision ImageFolder + DataLoader on the same images.

    python benchmarks/data_loader_throughput.py [--images 2000] [--size 500] [--resolution 224] [--rounds 5]
        [--boundary-epochs 4] [--step-ms 150]

Both run in the main process (num_workers=0, i.e. one core) with the same timm eval transform
(resize + centre crop + normalise) and batch size, over the same JPEG bytes: a folder tree for
ImageFolder, and that tree sharded with `vfm shard folder` for `vfm.data.loader`. ImageFolder runs timm's
transform as timm builds it (PIL decode, PIL resize); vfm decodes with TorchCodec and runs the same resize and
crop on the uint8 tensor with torchvision's v2 kernels (`TensorEvalTransform`, pixels within a few levels).
vfm's workers stop at uint8 (timm's prefetcher convention) and `DeviceNormalize` finishes each batch on the
device, which is this CPU here: it is inside the timed loop, so both sides time the same normalised float
batches. Prints images/s of each and the ratio. Never asserts timings.

Then the epoch boundary of a training stream (2 workers, the recipe's train transform, a consumer that
sleeps `--step-ms` per batch as a stand-in for the GPU step): the wait for each loader epoch's first batch
when the DataLoader starts over every epoch (`loader.close()` before each, which is what the loader did
before it kept one iterator) against vfm's one iterator across epochs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timm.data.transforms_factory import transforms_imagenet_eval
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from vfm.data.loader import build_loader
from vfm.data.shard import write_dataset
from vfm.data.sources import index_source
from vfm.data.synthetic import make_synthetic_folder
from vfm.data.transforms import build_transform, device_normalize
from vfm.recipes.schema import DataConfig


def rate(batches, n_expected: int, finish=lambda images: images) -> float:
    t = time.perf_counter()
    n = 0
    for images, labels in batches:
        assert finish(images).dtype == torch.float32
        n += len(labels)
    dt = time.perf_counter() - t
    assert n == n_expected, (n, n_expected)
    return n / dt


def boundary_waits(loader, epochs: int, step_s: float, restart: bool) -> list[float]:
    """Seconds from each loader epoch's `iter()` to its first batch, after the first epoch."""
    waits = []
    for _ in range(epochs):
        if restart:
            loader.close()
        t = time.perf_counter()
        it = iter(loader)
        next(it)
        waits.append(time.perf_counter() - t)
        for _ in it:
            time.sleep(step_s)
    return waits[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    # 500 px: ImageNet-sized JPEGs (~95 KB), which timm's Resize(256) really resizes; at 256 px that resize is a
    # no-op (torchvision/transforms/functional.py `resize` returns an image already at the size), so both
    # loaders would skip the largest per-image cost
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--boundary-epochs", type=int, default=4, help="loader epochs of the boundary test (0: skip)")
    ap.add_argument("--step-ms", type=float, default=150.0, help="the stand-in GPU step of the boundary test")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = DataConfig(dataset="folder", resolution=args.resolution)
    tf = build_transform(data, is_training=False)
    normalize = device_normalize(data, "cpu", is_training=False)
    reference = transforms_imagenet_eval(img_size=args.resolution, crop_pct=data.crop_pct,
                                         interpolation=data.augment.interpolation, mean=data.mean, std=data.std)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_synthetic_folder(root / "src", num_classes=20, per_class=args.images // 20, size=args.size, seed=0)
        n = (args.images // 20) * 20
        write_dataset(index_source("folder", str(root / "src")), str(root / "shards"), shard_size=64_000_000)
        folder = DataLoader(ImageFolder(str(root / "src"), transform=reference), batch_size=args.batch, num_workers=0)
        ours = build_loader(str(root / "shards"), transform=tf, batch_size=args.batch, rank=0, world_size=1, seed=0,
                            shuffle=False, drop_last=False, num_workers=0)
        rate(ours, n, normalize)  # warm the page cache for both
        rate(folder, n)
        rounds = [(rate(ours, n, normalize), rate(folder, n)) for _ in range(args.rounds)]  # interleaved
        r_ours, r_folder = (statistics.median(r) for r in zip(*rounds, strict=True))
        ratios = sorted(o / f for o, f in rounds)
        print(f"images={n} source={args.size}px -> {args.resolution}px, batch {args.batch}, 1 core, "
              f"{args.rounds} interleaved rounds (medians)")
        print(f"ImageFolder+DataLoader: {r_folder:8.1f} images/s/core")
        print(f"vfm shard loader:       {r_ours:8.1f} images/s/core")
        print(f"ratio vfm/ImageFolder: {r_ours / r_folder:.3f}  (per round {ratios[0]:.3f}-{ratios[-1]:.3f})")
        if args.boundary_epochs > 1:
            train_tf = build_transform(data, is_training=True)
            per_epoch = 8 * 16  # 8 batches of 16 a loader epoch
            waits = {}
            for restart in (True, False):
                train = build_loader(str(root / "shards"), transform=train_tf, batch_size=16, rank=0, world_size=1,
                                     seed=0, shuffle=True, epoch_length=per_epoch, num_workers=2)
                waits[restart] = boundary_waits(train, args.boundary_epochs, args.step_ms / 1e3, restart)
                train.close()
            print(f"epoch boundary, 2 workers, batch 16, step {args.step_ms:.0f} ms: first-batch wait "
                  f"{statistics.mean(waits[True]) * 1e3:.0f} ms restarting the DataLoader each epoch, "
                  f"{statistics.mean(waits[False]) * 1e3:.1f} ms with one iterator across epochs "
                  f"(mean of {len(waits[True])} boundaries)")


if __name__ == "__main__":
    main()
