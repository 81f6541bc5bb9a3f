"""Small, *learnable* image sets written as real JPEG files, for the local pipeline and tests.

Class c gets its own hue and stripe orientation/frequency, plus per-image noise, jitter and phase, so
a tiny model can learn it in a few steps while no two images are identical. Folder names look like
wnids (`n00000000`, ...) so the same code paths as ImageNet apply (`vfm shard folder`).
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_wnid(c: int) -> str:
    return f"n{c:08d}"


def synthetic_image(c: int, num_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    hue = c / max(1, num_classes)
    base = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    angle = np.pi * (c % 4) / 4 + rng.normal(0, 0.05)
    freq = 2 + (c // 4) % 3
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    img = base[None, None, :] * (0.65 + 0.35 * stripes[..., None])
    img += rng.normal(0, 12, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_synthetic_folder(root: str | Path, num_classes: int = 10, per_class: int = 16, size: int = 32,
                          seed: int = 0) -> Path:
    """Write <root>/n0000000c/n0000000c_<i>.JPEG; returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = root / synthetic_wnid(c)
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (d / f"{synthetic_wnid(c)}_{i}.JPEG").write_bytes(jpeg_bytes(synthetic_image(c, num_classes, size, rng)))
    return root


def make_synthetic_val_tar(tar_path: str | Path, csv_path: str | Path, num_classes: int = 10, per_class: int = 4,
                           size: int = 32, seed: int = 1, wnids: list[str] | None = None) -> list[tuple[str, str]]:
    """An IN-1K-val-like set: a flat tar of ILSVRC2012_val_<n>.JPEG plus a LOC_val_solution.csv.

    `wnids` picks the class wnids (default `n0000000c`); returns [(image id, wnid)] in file order.
    """
    from vfm.data.archives import write_val_tar

    rng = np.random.default_rng(seed)
    wnids = wnids or [synthetic_wnid(c) for c in range(num_classes)]

    def images():
        for _ in range(num_classes * per_class):
            c = int(rng.integers(num_classes))
            yield wnids[c], jpeg_bytes(synthetic_image(c, num_classes, size, rng))

    return write_val_tar(tar_path, csv_path, images())
