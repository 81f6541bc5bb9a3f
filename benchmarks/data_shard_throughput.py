"""Sharding throughput of `vfm shard` against `tar` writing the same bytes (a ratio from one run).

    python benchmarks/data_shard_throughput.py [--images 2000] [--size 500] [--workers N] [--shard-size auto] [--verify header]
        [--rounds 5] [--from-s3]

Builds a tar of per-class tars (the ILSVRC2012_img_train.tar layout) from synthetic JPEGs, then times
(a) `tar -cf` over the same images extracted to a folder (pure copy into a tar: the I/O floor) and
(b) `vfm shard in1k`-equivalent `write_dataset` to a local directory: index, global shuffle, the per-image
check (`--verify`, header by default as `vfm shard`), tar writing, sample index, sha256, manifest, with
`--workers` writer processes (default: the CPUs available, as `vfm shard`). The timed section is everything a
user waits for (index + shard); both parts are printed. The two run `--rounds` times, interleaved, each to a
fresh output (a sub-second timing on a shared machine varies by tens of percent from one run to the next); it
prints the medians, MB/s and the ratio of medians with the per-round spread. Never asserts timings.
With `--from-s3` it also shards the same archive read in place from an S3 endpoint (the embedded moto
server on loopback unless AWS_ENDPOINT_URL_S3 names one): the index pass by ranged GETs with read-ahead,
each sample by one ranged GET; it prints that time and the GETs the index pass made.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset  # noqa: F401  (imported up front: its torch import is start-up cost, not throughput)

from vfm.data.classes import in1k_wnids
from vfm.data.shard import available_cpus, parse_size, write_dataset
from vfm.data.sources import index_source
from vfm.data.synthetic import jpeg_bytes, synthetic_image
from vfm.data.validate import VERIFY_MODES


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


def from_s3(outer: Path, root: Path) -> tuple[float, float, int]:
    """(total seconds, index seconds, object bytes) of sharding `outer` read in place from S3."""
    import contextlib

    from vfm import storage
    from vfm.services import s3_server

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # moto accepts any credentials
        os.environ.setdefault(key, "bench")
    with contextlib.ExitStack() as stack:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or stack.enter_context(s3_server())
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        bucket = "vfm-bench"
        with contextlib.suppress(Exception):
            storage.s3_client(endpoint).create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/raw/{outer.name}"
        storage.upload_file(outer, url, endpoint)
        t = time.perf_counter()
        index = index_source("in1k", url)
        index_s = time.perf_counter() - t
        write_dataset(index, str(root / "shards-s3"), shard_size=64_000_000, workers=1)
        return time.perf_counter() - t, index_s, storage.object_size(url)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    # 500 px synthetic JPEGs average ~95 KB, ImageNet's size (fall11_whole.tar: 1.31 TB over 14.2 M images, 92 KB;
    # IN-1K train ~110 KB); at 256 px (~25 KB) the per-image costs weigh four times what they do on the real data
    ap.add_argument("--size", type=int, default=500, help="side of the square synthetic images (px)")
    ap.add_argument("--workers", type=int, default=available_cpus())
    ap.add_argument("--verify", choices=VERIFY_MODES, default="header")
    # auto: 4 shards a worker, so every worker has work to the end; a fixed small size (8 MB) would charge each
    # ~0.1 MB of images the per-shard costs (open, rename, fsync'd index and progress record) that a real run
    # with 1 GB shards pays once per ~10k images
    ap.add_argument("--shard-size", default="auto", help="bytes per shard, or auto: 4 shards per worker")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds of tar and vfm shard")
    ap.add_argument("--from-s3", action="store_true", help="also shard the archive read in place from S3")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        outer, folder, total = build(root, args.images, args.size)
        mb = total / 1e6
        shard_size = (max(1 << 20, total // (4 * args.workers)) if args.shard_size == "auto"
                      else parse_size(args.shard_size))
        rounds = []
        for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits both sides alike
            t = time.perf_counter()
            subprocess.run(["tar", "-cf", str(root / "plain.tar"), "-C", str(folder), "."], check=True)
            tar_s = time.perf_counter() - t
            t = time.perf_counter()
            index = index_source("in1k", str(outer))
            index_s = time.perf_counter() - t
            report = write_dataset(index, str(root / "shards"), shard_size=shard_size,
                                   workers=args.workers, verify=args.verify)
            vfm_s = time.perf_counter() - t
            assert report.manifest.num_samples == len(index)
            (root / "plain.tar").unlink()
            shutil.rmtree(root / "shards")
            rounds.append((tar_s, vfm_s, index_s))
        tar_s, vfm_s, index_s = (statistics.median(r) for r in zip(*rounds, strict=True))
        ratios = sorted(t / v for t, v, _ in rounds)
        if args.from_s3:
            s3_s, s3_index_s, nbytes = from_s3(outer, root)
        print(f"images={len(index)} bytes={mb:.1f}MB avg={total / len(index) / 1e3:.1f}KB cores={os.cpu_count()} "
              f"workers={args.workers} verify={args.verify} shards={len(report.manifest.shards)} "
              f"rounds={args.rounds} (medians)")
        print(f"tar -cf:    {tar_s:.2f}s  {mb / tar_s:8.1f} MB/s")
        print(f"vfm shard:  {vfm_s:.2f}s  {mb / vfm_s:8.1f} MB/s  {len(index) / vfm_s:8.0f} images/s  "
              f"(index {index_s:.2f}s + shard {vfm_s - index_s:.2f}s)")
        print(f"ratio vfm/tar throughput: {tar_s / vfm_s:.3f}  (per round {ratios[0]:.3f}-{ratios[-1]:.3f})")
        if args.from_s3:
            from vfm.storage import RANGE_BLOCK

            print(f"vfm shard from s3://: {s3_s:.2f}s  {mb / s3_s:8.1f} MB/s  {len(index) / s3_s:8.0f} images/s "
                  f"(index pass {s3_index_s:.2f}s over {-(-nbytes // RANGE_BLOCK)} blocks of {RANGE_BLOCK >> 20} MiB, "
                  f"then one ranged GET per image)")


if __name__ == "__main__":
    main()
