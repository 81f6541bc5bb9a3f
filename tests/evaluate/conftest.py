"""Shared fixture: tiny evaluation sets sharded with the real shard writer, and two exports ("seeds")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vfm.data.classes import imagenet_r_wnids, in1k_wnids
from vfm.data.shard import write_dataset
from vfm.data.sources import index_source
from vfm.data.synthetic import jpeg_bytes, synthetic_image
from vfm.export import ExportMeta, save_export

IN1K = list(in1k_wnids())
R_WNIDS = list(imagenet_r_wnids())
CLASSES = [R_WNIDS[0], R_WNIDS[7], IN1K[0], R_WNIDS[20]]  # three IN-R classes and tench (not in IN-R)


def _write(path: Path, c: int, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(synthetic_image(c, len(CLASSES), 24, rng)))


def _shard(dataset: str, source: Path, dest: Path) -> str:
    write_dataset(index_source(dataset, str(source)), str(dest), split="val", max_samples_per_shard=5)
    return str(dest / "manifest.json")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    rng = np.random.default_rng(0)
    files: dict[str, list[tuple[Path, str]]] = {"val": [], "c": [], "r": [], "train": []}
    for c, wnid in enumerate(CLASSES):
        for i in range(3):
            p = root / "val" / wnid / f"{wnid}_{i}.JPEG"
            _write(p, c, rng)
            files["val"].append((p, wnid))
        for i in range(6):
            p = root / "train" / wnid / f"{wnid}_{i}.JPEG"
            _write(p, c, rng)
            files["train"].append((p, wnid))
        for corruption, severity in [("fog", 1), ("fog", 2), ("spatter", 3)]:
            p = root / "c" / corruption / str(severity) / wnid / f"{wnid}_0.JPEG"
            _write(p, c, rng)
            files["c"].append((p, wnid))
        if wnid in R_WNIDS:
            for i in range(2):
                p = root / "r" / "imagenet-r" / wnid / f"{i}.jpg"
                _write(p, c, rng)
                files["r"].append((p, wnid))
    # the val and train sets use the `folder` layout with the IN-1K class list, so labels are IN-1K indices
    (root / "in1k.txt").write_text("\n".join(IN1K) + "\n")
    data = {}
    for key, dataset, src in [("in1k", "folder", "val"), ("knn_train", "folder", "train")]:
        idx = index_source(dataset, str(root / src), class_file=str(root / "in1k.txt"))
        write_dataset(idx, str(root / f"shards-{src}"), split="val", max_samples_per_shard=5)
        data[key] = str(root / f"shards-{src}" / "manifest.json")
    data["in_c"] = _shard("imagenet-c", root / "c", root / "shards-c")
    data["in_r"] = _shard("imagenet-r", root / "r", root / "shards-r")

    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, img_size=32,
                              patch_size=8, depth=1).eval()
    meta = ExportMeta(timm_name="vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 8, "depth": 1},
                      num_classes=1000, recipe_id="vit-huge", stage="finetune", resolution=32, crop_pct=0.875,
                      wnids=IN1K, seed=0)
    exports = []
    for seed in (0, 1):
        for p in model.parameters():  # a second "seed" = slightly different weights
            p.data += 0.05 * seed * torch.randn_like(p)
        meta.seed = seed
        exports.append(save_export(model, meta, root / f"export-{seed}"))
    return {"root": root, "files": files, "data": data, "exports": exports, "meta": meta}


