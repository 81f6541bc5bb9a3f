"""Sharding throughput of `vfm shard` against `tar` writing the same bytes (a ratio from one run).

    python benchmarks/data_shard_throughput.py [--images 2000] [--size 256] [--workers 1]

Builds a tar of per-class tars (the ILSVRC2012_img_train.tar layout) from synthetic JPEGs, then times
(a) `tar -cf` over the same images extracted to a folder (pure copy into a tar: the I/O floor) and
(b) `vfm shard in1k`-equivalent `write_dataset` to a local directory: index, global shuffle, per-image
decode check, tar writing, sha256, manifest. Prints MB/s of both and the ratio. Never asserts timings.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset  # noqa: F401  (imported up front: its torch import is start-up cost, not throughput)

from vfm.data.classes import in1k_wnids
from vfm.data.shard import write_dataset
from vfm.data.sources import index_source
from vfm.data.synthetic import jpeg_bytes, synthetic_image


def build(root: Path, images: int, size: int, classes: int = 20) -> tuple[Path, Path, int]:
    rng = np.random.default_rng(0)
    folder = root / "folder"
    total = 0
    outer = root / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer, "w") as out:
        for c in range(classes):
            wnid = in1k_wnids()[c]
            (folder / wnid).mkdir(parents=True)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(images // classes):
                    data = jpeg_bytes(synthetic_image(c, classes, size, rng))
                    (folder / wnid / f"{wnid}_{i}.JPEG").write_bytes(data)
                    ti = tarfile.TarInfo(f"{wnid}_{i}.JPEG")
                    ti.size = len(data)
                    inner.addfile(ti, io.BytesIO(data))
                    total += len(data)
            ti = tarfile.TarInfo(f"{wnid}.tar")
            ti.size = buf.tell()
            buf.seek(0)
            out.addfile(ti, buf)
    return outer, folder, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        outer, folder, total = build(root, args.images, args.size)
        mb = total / 1e6
        t = time.perf_counter()
        subprocess.run(["tar", "-cf", str(root / "plain.tar"), "-C", str(folder), "."], check=True)
        tar_s = time.perf_counter() - t
        t = time.perf_counter()
        index = index_source("in1k", str(outer))
        report = write_dataset(index, str(root / "shards"), shard_size=64_000_000, workers=args.workers)
        vfm_s = time.perf_counter() - t
        assert report.manifest.num_samples == len(index)
        shutil.rmtree(root / "shards")
        print(f"images={len(index)} bytes={mb:.1f}MB avg={total / len(index) / 1e3:.1f}KB cores={os.cpu_count()} "
              f"workers={args.workers}")
        print(f"tar -cf:    {tar_s:.2f}s  {mb / tar_s:8.1f} MB/s")
        print(f"vfm shard:  {vfm_s:.2f}s  {mb / vfm_s:8.1f} MB/s  {len(index) / vfm_s:8.0f} images/s")
        print(f"ratio vfm/tar throughput: {tar_s / vfm_s:.3f}")


if __name__ == "__main__":
    main()
