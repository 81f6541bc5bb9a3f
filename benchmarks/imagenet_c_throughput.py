"""`vfm make-imagenet-c` images per second with 1 worker process against N (default: the CPUs available).

    python benchmarks/imagenet_c_throughput.py [--images 64] [--corruptions gaussian_noise,contrast,jpeg_compression]

Makes a folder of synthetic 320 px validation JPEGs (one per wnid folder, as `vfm make-imagenet-c` accepts),
then regenerates the chosen corruptions at all 5 severities into local shards small enough that every worker
gets several, once per worker count. Prints images/s (corrupted images written) and the speed-up.
Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vfm.data.imagenet_c import make_imagenet_c
from vfm.data.shard import available_cpus
from vfm.data.synthetic import make_synthetic_folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--corruptions", default="gaussian_noise,contrast,jpeg_compression")
    ap.add_argument("--workers", type=int, default=available_cpus())
    args = ap.parse_args()
    if args.images < 8:
        ap.error("--images must be at least 8 (one per class of the 8 synthetic classes)")
    corruptions = args.corruptions.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        src = make_synthetic_folder(Path(tmp) / "val", num_classes=8, per_class=args.images // 8, size=320, seed=0)
        n = (args.images // 8) * 8 * len(corruptions) * 5
        # warm-up outside the timing: the corruption libraries' imports and first-call setup
        make_imagenet_c(str(src), str(Path(tmp) / "warm"), corruptions=corruptions, severities=[1], workers=1)
        rates = {}
        for workers in sorted({1, args.workers}):
            t = time.perf_counter()
            report = make_imagenet_c(str(src), str(Path(tmp) / f"c{workers}"), corruptions=corruptions,
                                     workers=workers, shard_size=n * 15_000 // (4 * max(2, args.workers)))
            s = time.perf_counter() - t
            assert report.manifest is not None and report.manifest.num_samples == n
            rates[workers] = n / s
            print(f"workers={workers}: {n} images in {s:.1f}s = {n / s:.1f} images/s "
                  f"({len(report.manifest.shards)} shards)")
        if len(rates) > 1:
            print(f"speed-up {args.workers} workers / 1: {rates[args.workers] / rates[1]:.2f}×")


if __name__ == "__main__":
    main()
