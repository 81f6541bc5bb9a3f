"""Writers of the official ImageNet archive layouts, for data that vfm makes itself (the local default
data set, ImageNet-C tarballs in tests). The readers are `vfm.data.sources`; these write exactly what
they read, so a made set goes through the same code as a user's ImageNet:

- `ILSVRC2012_img_train.tar` / `fall11_whole.tar`: one `<wnid>.tar` member per class, holding
  `<wnid>_<n>.JPEG`;
- `ILSVRC2012_img_val.tar`: flat `ILSVRC2012_val_<8 digits>.JPEG`, labelled by Kaggle's
  `LOC_val_solution.csv` (`ImageId,PredictionString`, the wnid first, then a box);
- `imagenet-r.tar`: `imagenet-r/<wnid>/<rendition>_<n>.jpg`.
"""

from __future__ import annotations

import csv
import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def tar_bytes(members: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            add_bytes(tf, name, data)
    return buf.getvalue()


def write_tar_of_tars(path: str | Path, classes: Mapping[str, Mapping[str, bytes]], gz: bool = False) -> Path:
    """ILSVRC2012_img_train.tar / fall11_whole.tar: `<wnid>.tar` members holding `<wnid>_<n>.JPEG`."""
    path = Path(path)
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for wnid, members in classes.items():
            add_bytes(tf, f"{wnid}.tar", tar_bytes(members))
    return path


def write_val_tar(tar_path: str | Path, csv_path: str | Path, images: Iterable[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """ILSVRC2012_img_val.tar + LOC_val_solution.csv from (wnid, JPEG bytes) in file order; returns
    [(image id, wnid)]."""
    rows = []
    with tarfile.open(tar_path, "w") as tf:
        for n, (wnid, data) in enumerate(images):
            image_id = f"ILSVRC2012_val_{n + 1:08d}"
            add_bytes(tf, f"{image_id}.JPEG", data)
            rows.append((image_id, wnid))
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for image_id, wnid in rows:
            writer.writerow([image_id, f"{wnid} 0 0 1 1"])  # a box is part of the format; vfm reads the wnid
    return rows


def write_imagenet_r_tar(path: str | Path, images: Mapping[str, Sequence[tuple[str, bytes]]]) -> Path:
    """imagenet-r.tar: `imagenet-r/<wnid>/<rendition>_<n>.jpg` from {wnid: [(rendition, JPEG bytes)]}."""
    path = Path(path)
    with tarfile.open(path, "w") as tf:
        for wnid, items in images.items():
            for n, (rendition, data) in enumerate(items):
                add_bytes(tf, f"imagenet-r/{wnid}/{rendition}_{n}.jpg", data)
    return path
