"""ImageNet-C regeneration from an IN-1K-val-like set, and through the shard reader with metadata."""

from __future__ import annotations

import collections
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vfm.data.classes import in1k_wnids
from vfm.data.imagenet_c import ALL_CORRUPTIONS, corrupt_jpeg, make_imagenet_c
from vfm.data.loader import build_loader
from vfm.data.manifest import Manifest
from vfm.data.shard import write_dataset
from vfm.data.sources import SourceError, index_source
from vfm.data.synthetic import make_synthetic_val_tar
from vfm.data.transforms import build_transform
from vfm.recipes.schema import DataConfig

EVAL_TF = build_transform(DataConfig(dataset="imagenet-c", resolution=32), is_training=False)


def test_from_an_s3_val_manifest_with_metadata(tmp_path, s3_endpoint, bucket):
    wnids = [in1k_wnids()[i] for i in (3, 500)]
    make_synthetic_val_tar(tmp_path / "val.tar", tmp_path / "LOC_val_solution.csv", num_classes=2, per_class=1,
                           size=40, wnids=wnids)
    val = write_dataset(index_source("in1k-val", str(tmp_path / "val.tar"), labels=str(tmp_path / "LOC_val_solution.csv")),
                        f"s3://{bucket}/val", split="validation", endpoint_url=s3_endpoint)
    report = make_imagenet_c(f"s3://{bucket}/val", f"s3://{bucket}/c", corruptions=["gaussian_noise", "fog"],
                             severities=[1, 5], endpoint_url=s3_endpoint, shard_size=10**9)
    m = Manifest.load(f"s3://{bucket}/c")
    assert m.dataset == "imagenet-c" and sorted(m.groups) == ["fog/1", "fog/5", "gaussian_noise/1", "gaussian_noise/5"]
    assert m.num_samples == 4 * val.manifest.num_samples == 8 and "regenerated" in m.source
    loader = build_loader(m, transform=EVAL_TF, batch_size=3, rank=0, world_size=1, seed=0, shuffle=False,
                          drop_last=False, with_meta=True)
    seen = collections.Counter()
    for batch in loader:
        for label, meta in zip(batch["label"].tolist(), batch["meta"], strict=True):
            assert m.classes[label] == meta["wnid"] and meta["wnid"] in wnids
            seen[(meta["corruption"], meta["severity"])] += 1
    assert seen == {("gaussian_noise", 1): 2, ("gaussian_noise", 5): 2, ("fog", 1): 2, ("fog", 5): 2}
    assert report.written == len(m.shards)


def test_procedure_size_quality_determinism_and_severity():
    rng = np.random.default_rng(0)
    src = io.BytesIO()
    Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)).save(src, format="JPEG")
    clean = np.asarray(Image.open(io.BytesIO(corrupt_jpeg(src.getvalue(), "brightness", 1, 0))), dtype=float)
    out1 = corrupt_jpeg(src.getvalue(), "gaussian_noise", 1, seed=7)
    img = Image.open(io.BytesIO(out1))
    assert img.format == "JPEG" and img.size == (224, 224)
    assert out1 == corrupt_jpeg(src.getvalue(), "gaussian_noise", 1, seed=7)  # seeded: reproducible
    assert out1 != corrupt_jpeg(src.getvalue(), "gaussian_noise", 1, seed=8)
    err = [np.abs(np.asarray(Image.open(io.BytesIO(corrupt_jpeg(src.getvalue(), "contrast", s, 0))), dtype=float)
                  - clean).mean() for s in (1, 5)]
    assert err[1] > err[0]


@pytest.mark.scale
def test_all_19_corruptions_work(tmp_path):
    """Every corruption at severity 1 (VFM_SCALE=full: all 5 severities) on one image, through the CLI."""
    root = tmp_path / "val"
    (root / in1k_wnids()[7]).mkdir(parents=True)
    Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8)).save(
        root / in1k_wnids()[7] / "ILSVRC2012_val_00000001.JPEG")
    sevs = "1,2,3,4,5" if os.environ.get("VFM_SCALE") == "full" else "1"
    r = subprocess.run([sys.executable, "-m", "vfm.data.cli", "make-imagenet-c", "--source", str(root), "--dest",
                        str(tmp_path / "c"), "--severities", sevs, "--workers", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = Manifest.load(str(tmp_path / "c"))
    assert len(m.groups) == 19 * len(sevs.split(",")) and m.num_samples == len(m.groups) and not m.failures
    assert {g["corruption"] for g in m.groups.values()} == set(ALL_CORRUPTIONS)
    assert m.classes[0] == in1k_wnids()[0]  # IN-1K labels kept


def test_bad_corruption_names_are_user_errors(tmp_path):
    (tmp_path / "v" / "n01440764").mkdir(parents=True)
    with pytest.raises(SourceError, match="unknown corruptions"):
        make_imagenet_c(str(tmp_path / "v"), str(tmp_path / "c"), corruptions=["rain"])
