"""The local default data set: scikit-learn's handwritten digits, written in the official ImageNet
archive layouts so a local run goes through the same readers as a user's ImageNet.

The 1,797 real 8×8 scans (UCI optdigits, shipped inside scikit-learn, no download) are upscaled to
`size` px and saved as JPEG. The ten digits are labelled with ten real ImageNet-1K wnids that are also
in the ImageNet-R 200 (the first ten of that list, in order: digit d → `DIGIT_WNIDS[d]`), so the IN-1K
val, ImageNet-C, ImageNet-R and k-NN suites all apply unchanged. A fixed, stratified 80/20 split gives
train (1,437) and val (360); the ImageNet-R-style set renders the val digits differently (coloured ink
on coloured paper, slightly rotated), as IN-R renders IN-1K classes as art, cartoons and sketches.

    root/ILSVRC2012_img_train.tar    <wnid>.tar of <wnid>_<n>.JPEG        (in1k layout)
    root/fall11_whole.tar            the same train images                (in22k-fall11 layout)
    root/train/<wnid>/*.JPEG         the same train images                (folder layout, SSL corpora)
    root/ILSVRC2012_img_val.tar + LOC_val_solution.csv                    (in1k-val layout)
    root/imagenet-r.tar              imagenet-r/<wnid>/<rendition>_<n>.jpg (imagenet-r layout)
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vfm.data.archives import write_imagenet_r_tar, write_tar_of_tars, write_val_tar
from vfm.data.classes import imagenet_r_wnids
from vfm.data.synthetic import jpeg_bytes

DIGIT_WNIDS: tuple[str, ...] = tuple(imagenet_r_wnids()[:10])
VAL_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsArchives:
    root: Path
    train_tar: Path
    fall11_tar: Path
    train_folder: Path
    val_tar: Path
    val_labels: Path
    imagenet_r_tar: Path
    num_train: int
    num_val: int

    def source(self, layout: str) -> str:
        """The archive of a `vfm shard` layout (what a pipeline role's `<role>_source` is)."""
        by_layout = {"in1k": self.train_tar, "in22k-fall11": self.fall11_tar, "folder": self.train_folder,
                     "in1k-val": self.val_tar, "imagenet-r": self.imagenet_r_tar}
        if layout not in by_layout:
            raise ValueError(f"no digits archive in the {layout!r} layout; have {', '.join(by_layout)}")
        return str(by_layout[layout])


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8×8 scan (0–16, ink high) → a `size` px RGB image, dark ink on white paper as scanned."""
    gray = (255 - pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    return Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).convert("RGB")


def rendition(pixels: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """The same digit drawn otherwise: coloured ink on coloured paper, turned a little."""
    ink = pixels.reshape(8, 8) / 16.0
    hue = rng.uniform()
    paper = np.array(colorsys.hsv_to_rgb(hue, 0.35, 0.95)) * 255
    pen = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.9, 0.35)) * 255
    rgb = (paper[None, None] * (1 - ink[..., None]) + pen[None, None] * ink[..., None]).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB").resize((size, size), Image.BICUBIC)
    return img.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, fillcolor=tuple(int(v) for v in paper))


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified, seeded train/val split (the same on every machine)."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(len(idx) * VAL_FRACTION)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.array(sorted(train)), np.array(sorted(val))


def make_digits_archives(root: str | Path, size: int = 32) -> DigitsArchives:
    """Write (once: a `.complete` marker guards a half-written set) the digits in every layout under `root`."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    train, val = split(digits.target)
    out = DigitsArchives(root, root / "ILSVRC2012_img_train.tar", root / "fall11_whole.tar", root / "train",
                         root / "ILSVRC2012_img_val.tar", root / "LOC_val_solution.csv", root / "imagenet-r.tar",
                         len(train), len(val))
    if (root / ".complete").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    classes: dict[str, dict[str, bytes]] = {w: {} for w in DIGIT_WNIDS}
    for i in train:
        wnid = DIGIT_WNIDS[digits.target[i]]
        classes[wnid][f"{wnid}_{i}.JPEG"] = jpeg_bytes(digit_image(digits.data[i], size), quality=95)
    write_tar_of_tars(out.train_tar, classes)
    write_tar_of_tars(out.fall11_tar, classes)
    for wnid, members in classes.items():
        (out.train_folder / wnid).mkdir(parents=True, exist_ok=True)
        for name, data in members.items():
            (out.train_folder / wnid / name).write_bytes(data)
    write_val_tar(out.val_tar, out.val_labels,
                  ((DIGIT_WNIDS[digits.target[i]], jpeg_bytes(digit_image(digits.data[i], size), quality=95))
                   for i in val))
    rng = np.random.default_rng(1)
    renditions: dict[str, list[tuple[str, bytes]]] = {w: [] for w in DIGIT_WNIDS}
    for i in val:
        renditions[DIGIT_WNIDS[digits.target[i]]].append(
            ("painting", jpeg_bytes(rendition(digits.data[i], size, rng), quality=95)))
    write_imagenet_r_tar(out.imagenet_r_tar, renditions)
    (root / ".complete").write_text("ok\n")
    return out
