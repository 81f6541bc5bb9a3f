"""vfm's linear probe (vfm.evaluate.linear) against scikit-learn's LogisticRegression on the same features.

The features are the CLS tokens of a random-init ViT-Tiny (2 blocks, 32 px, patch 8; seed 0) on the local
digits (vfm.data.digits, train 1,438 / val 359 images). The probe solves one head per weight decay of its
grid by L-BFGS on standardised features and picks one on a held-out tenth of train; scikit-learn fits the
same fit split (StandardScaler + LogisticRegression with C = 1 / (wd · n)) at every weight decay of the grid.
Prints held-out and val top-1 of both and the wall times. Figures only: nothing here asserts.

    .venv/bin/python benchmarks/linear_probe_vs_sklearn.py [--workdir /tmp/vfm-linear-probe]
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from vfm.data.digits import make_digits_archives
from vfm.data.manifest import Manifest
from vfm.data.shard import write_dataset
from vfm.data.sources import index_source
from vfm.evaluate.classify import align_classes
from vfm.evaluate.linear import HELDOUT_BUCKETS, ProbeConfig, _mix, extract, linear_probe, probe_features
from vfm.evaluate.suite import _loader, _normalize
from vfm.export import ExportMeta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vfm-linear-probe"))
    args = ap.parse_args()
    root = args.workdir
    digits = make_digits_archives(root / "digits")
    if not (root / "train/manifest.json").exists():
        write_dataset(index_source("folder", str(digits.train_folder)), str(root / "train"), split="val",
                      max_samples_per_shard=500)
        write_dataset(index_source("in1k-val", str(digits.val_tar), labels=str(digits.val_labels)), str(root / "val"),
                      split="val", max_samples_per_shard=500)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              depth=2).eval()
    meta = ExportMeta(timm_name="vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
                      num_classes=0, recipe_id="dinov2-giant", stage="pretrain", resolution=32, crop_pct=1.0,
                      wnids=[], seed=0)
    dev = torch.device("cpu")
    tm, vm = Manifest.load(str(root / "train/manifest.json")), Manifest.load(str(root / "val/manifest.json"))
    kw = dict(device=dev, autocast_dtype=None, normalize=_normalize(meta, dev))
    fn = partial(probe_features, n_last_blocks=1, avgpool=False)
    train = extract(model, _loader(tm, meta, batch_size=128, num_workers=0, with_meta=True), fn, description="train",
                    **kw)
    val = extract(model, _loader(vm, meta, batch_size=128, num_workers=0, with_meta=True), fn, description="val", **kw)
    _, label_map = align_classes(tm.classes, vm.classes, where="val")
    val_labels = label_map[val[1]] if label_map is not None else val[1]
    print(f"features: train {tuple(train[0].shape)}, val {tuple(val[0].shape)}")

    cfg = ProbeConfig()
    t = time.perf_counter()
    metrics, _ = linear_probe(train, (val[0], val_labels), len(tm.classes), cfg, device=dev)
    print(f"vfm probe ({len(cfg.weight_decays)} heads, L-BFGS ≤ {cfg.max_iter} it): {metrics} "
          f"in {time.perf_counter() - t:.1f} s")

    held = (_mix(train[2], 0x5EED) % np.uint64(HELDOUT_BUCKETS)) == 0
    x, y = train[0][~held].double().numpy(), train[1][~held].numpy()
    scaler = StandardScaler().fit(x)
    for wd in cfg.weight_decays:
        t = time.perf_counter()
        clf = LogisticRegression(C=1 / (wd * len(y)), max_iter=10000, tol=1e-8).fit(scaler.transform(x), y)
        held_top1 = 100 * clf.score(scaler.transform(train[0][held].double().numpy()), train[1][held].numpy())
        val_top1 = 100 * clf.score(scaler.transform(val[0].double().numpy()), val_labels.numpy())
        print(f"scikit-learn wd {wd:g} (C {1 / (wd * len(y)):.4g}): held-out {held_top1:.2f}, val {val_top1:.2f} "
              f"in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
