"""Fabricate tiny archives in the official layouts read by `vfm.data.sources`, with the known bad members."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from vfm.data.archives import add_bytes, tar_bytes, write_tar_of_tars  # noqa: F401  (re-exported for the tests)
from vfm.data.synthetic import jpeg_bytes, synthetic_image


def tiny_jpeg(seed: int, size: int = 20) -> bytes:
    return jpeg_bytes(synthetic_image(seed % 7, 7, size, np.random.default_rng(seed)))


def png_bytes(seed: int) -> bytes:
    out = io.BytesIO()
    synthetic_image(1, 7, 16, np.random.default_rng(seed)).save(out, format="PNG")
    return out.getvalue()


def cmyk_jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    synthetic_image(2, 7, 16, np.random.default_rng(seed)).convert("CMYK").save(out, format="JPEG")
    return out.getvalue()


BAD_MEMBERS = {
    "zero": (b"", "zero-byte image"),
    "gzip": (None, "gzip-compressed member"),
    "png": (None, "PNG data named"),
    "cmyk": (None, "CMYK JPEG"),
    "garbage": (b"\xff\xd8\xff\xe0 this is not really a jpeg", "undecodable image"),
    "truncated": (None, "undecodable image"),
}


def bad_member(kind: str, seed: int = 0) -> bytes:
    if kind == "gzip":
        return gzip.compress(tiny_jpeg(seed), mtime=0)
    if kind == "png":
        return png_bytes(seed)
    if kind == "cmyk":
        return cmyk_jpeg(seed)
    if kind == "truncated":
        return tiny_jpeg(seed, size=48)[:300]
    return BAD_MEMBERS[kind][0]


def write_tree_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.write_bytes(tar_bytes(members))
    return path


def class_images(wnid: str, n: int, seed: int) -> dict[str, bytes]:
    return {f"{wnid}_{i}.JPEG": tiny_jpeg(seed * 1000 + i) for i in range(n)}


def write_devkit(path: Path, wnids_in_meta_order: list[str], gt_ids: list[int]) -> Path:
    """ILSVRC2012_devkit_t12.tar.gz with data/meta.mat (synsets struct) and the validation ground truth."""
    import scipy.io

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
             ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    synsets = np.zeros((len(wnids_in_meta_order), 1), dtype=dtype)
    for i, w in enumerate(wnids_in_meta_order):
        synsets[i, 0] = (i + 1, w, f"class {w}", "", 0, np.zeros((0,)), 0, 10)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    gt = ("\n".join(str(i) for i in gt_ids) + "\n").encode()
    with tarfile.open(path, "w:gz") as tf:
        add_bytes(tf, "ILSVRC2012_devkit_t12/data/meta.mat", buf.getvalue())
        add_bytes(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)
    return path


def decode_ok(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except Exception:
        return False
