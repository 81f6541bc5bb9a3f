"""Regenerate ImageNet-C from IN-1K val when the official Zenodo tarballs are absent.

The official procedure (hendrycks/robustness@8190fe3 ImageNet-C/create_c/make_imagenet_c.py): Resize(256) ->
CenterCrop(224) -> corruption at severity s -> JPEG quality 85, for the 15 benchmark corruptions plus
the 4 extra ones, severities 1..5. Corruptions come from `imagecorruptions-imaug` (19/19 work with
current numpy, numerically matching the original code). Each image's RNG is seeded from (seed,
corruption, severity, name), so a rerun (or a resumed run) produces the same bytes. The result is
"ImageNet-C (regenerated)": statistically the benchmark, not bit-identical to the published files.

Output goes through the same shard writer as `vfm shard imagenet-c`: samples named
`<corruption>/<severity>/<wnid>/<file>` with corruption/severity in their json, one manifest group
per (corruption, severity), shards never mixing groups.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import zlib
from array import array
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vfm import storage
from vfm.data.manifest import Manifest
from vfm.data.sources import SourceError, SourceIndex, index_source

BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt_jpeg(data: bytes, corruption: str, severity: int, seed: int, resize: int = 256, crop: int = 224) -> bytes:
    """The official per-image procedure; returns the corrupted image as JPEG (quality 85) bytes."""
    import random

    import torchvision.transforms.functional as F
    from imagecorruptions import corrupt

    img = Image.open(io.BytesIO(data)).convert("RGB")
    img = F.center_crop(F.resize(img, resize, interpolation=F.InterpolationMode.BILINEAR), crop)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    out = corrupt(np.asarray(img), corruption_name=corruption, severity=severity)
    buf = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(out, 0, 255))).save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()


@dataclass
class CorruptedIndex(SourceIndex):
    """Every base image once per (corruption, severity); `read` corrupts it on the fly in the shard worker."""

    base: SourceIndex | None = None
    base_entry: array = field(default_factory=lambda: array("q"))
    seed: int = 0
    resize: int = 256
    crop: int = 224

    def read(self, i: int, fds: dict[str, int | None] | None = None) -> bytes:
        meta = self.group_meta[self.groups[self.group[i]]]
        name = self.name(i)
        seed = int(np.random.SeedSequence([self.seed, zlib.crc32(name.encode())]).generate_state(1)[0])
        return corrupt_jpeg(self.base.read(self.base_entry[i], fds), meta["corruption"], meta["severity"], seed,
                            self.resize, self.crop)

    def source_of(self, i: int) -> str:
        return self.base.source_of(self.base_entry[i])


def corrupted_index(base: SourceIndex, corruptions, severities, seed: int = 0, resize: int = 256,
                    crop: int = 224) -> CorruptedIndex:
    unknown = sorted(set(corruptions) - set(ALL_CORRUPTIONS))
    if unknown:
        raise SourceError(f"unknown corruptions {unknown}; choose from {', '.join(ALL_CORRUPTIONS)}")
    bad_sev = sorted(set(severities) - set(SEVERITIES))
    if bad_sev:
        raise SourceError(f"severities must be in 1..5, got {bad_sev}")
    out = CorruptedIndex(dataset="imagenet-c", classes=list(base.classes), base=base, seed=seed, resize=resize,
                         crop=crop, groups=[])
    out.failures = list(base.failures)
    for c in corruptions:
        for s in severities:
            gid = out.group_id(f"{c}/{s}", {"corruption": c, "severity": s})
            for i in range(len(base)):
                wnid = base.classes[base.label[i]]
                out.add(-1, 0, base.size[i], base.label[i], f"{c}/{s}/{wnid}/{base.name(i).rsplit('/', 1)[-1]}", gid)
                out.base_entry.append(i)
    return out


def index_manifest_shards(manifest: Manifest, local_dir: str) -> SourceIndex:
    """A sharded IN-1K val (any store) as a random-access index: shards are copied to `local_dir` once."""
    index = SourceIndex(dataset=manifest.dataset, classes=list(manifest.classes))
    for i, shard in enumerate(manifest.shards):
        local = os.path.join(local_dir, shard.name)
        if not (os.path.exists(local) and os.path.getsize(local) == shard.bytes):
            with storage.open_read(manifest.shard_url(i)) as src, open(local, "wb") as dst:
                while chunk := src.read(storage.READ_CHUNK):
                    dst.write(chunk)
        fid = index.add_file(local)
        samples: dict[str, dict] = {}
        with tarfile.open(local, "r:") as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                entry = samples.setdefault(key, {})
                if ext in ("jpg", "png", "webp"):
                    entry["image"] = (m.offset_data, m.size, ext)
                elif ext in ("cls", "json"):
                    entry[ext] = tf.extractfile(m).read()
        for key, e in samples.items():
            if "image" not in e or "cls" not in e:
                raise SourceError(f"{manifest.shard_url(i)}: sample {key!r} lacks an image or .cls")
            name = json.loads(e["json"]).get("name", key) if "json" in e else key
            offset, size, _ = e["image"]
            index.add(fid, offset, size, int(e["cls"]), name.rsplit("/", 1)[-1])
    return index


def base_index(source: str, endpoint_url: str | None, work_dir: str) -> SourceIndex:
    """`source`: a folder-per-wnid tree of val images, or an in1k-val manifest (path or s3:// URL)."""
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, "manifest.json")):
        from vfm.data.classes import in1k_wnids

        tree = index_source("folder", source)
        # labels follow IN-1K when the folders are IN-1K wnids (the evaluator's convention)
        if set(tree.classes) <= set(in1k_wnids()):
            relabel = {w: i for i, w in enumerate(in1k_wnids())}
            for i in range(len(tree)):
                tree.label[i] = relabel[tree.classes[tree.label[i]]]
            tree.classes = list(in1k_wnids())
        return tree
    return index_manifest_shards(Manifest.load(source, endpoint_url), work_dir)


def make_imagenet_c(source: str, dest: str, *, corruptions=ALL_CORRUPTIONS, severities=SEVERITIES, seed: int = 0,
                    workers: int = 1, shard_size: int = 1_000_000_000, endpoint_url: str | None = None,
                    work_dir: str | None = None, resize: int = 256, crop: int = 224, **write_kw):
    from vfm.data.shard import write_dataset

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        base = base_index(source, endpoint_url, tmp)
        index = corrupted_index(base, list(corruptions), list(severities), seed, resize, crop)
        return write_dataset(index, dest, split="validation", seed=seed, shard_size=shard_size, workers=workers,
                             endpoint_url=endpoint_url, source=f"regenerated (imagecorruptions-imaug) from {source}",
                             **write_kw)
