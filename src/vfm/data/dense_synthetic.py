"""Small synthetic dense-transfer datasets written in the official layouts, for tests and as a pipeline's local
default data: they go through the very readers a real ADE20K / COCO download does (vfm.data.dense_sources).

Every image is a textured background (a per-image hue, stripes and noise) with 1-3 shapes (discs, squares,
triangles), each shape kind standing for one class with its own colour, so a small model can learn them.

- `write_ade20k_zip`: ADEChallengeData2016.zip with images/{training,validation}/ADE_{train,val}_<8 digits>.jpg and
  annotations/<split>/<same stem>.png, an 8-bit grayscale mask of ADE20K class ids (the background is "wall" (1), a
  2-pixel image border is 0, unlabelled, as ADE's own masks leave unlabelled pixels 0).
- `write_coco_zips`: train2017.zip, val2017.zip and annotations_trainval2017.zip (annotations/instances_*.json with
  images, annotations (bbox [x, y, w, h], polygon segmentation, area, iscrowd, category_id) and categories with
  COCO's own non-contiguous ids: person 1, car 3, dog 18). A quarter of the images hold no shape, so no annotation,
  as COCO has images without annotations.

Deterministic for a seed: pixels, JPEG bytes and zip bytes (members dated 1980-01-01) are the same on every run.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vfm.data.synthetic import jpeg_bytes

SHAPES = ("disc", "square", "triangle")
# shape -> (ADE20K class id, name in objectInfo150), (COCO category id, name, supercategory)
ADE_CLASS_OF = {"disc": 13, "square": 21, "triangle": 5}  # person, car, tree
COCO_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 18, "name": "dog", "supercategory": "animal"}]
COCO_CATEGORY_OF = {"disc": 1, "square": 3, "triangle": 18}
ADE_BACKGROUND = 1  # wall
SHAPE_COLOR = {"disc": (230, 40, 40), "square": (40, 200, 60), "triangle": (40, 60, 230)}
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "disc":  # a 24-gon: drawn and annotated as the same polygon
        return [(cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24)) for k in range(24)]
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]


def _scene(width: int, height: int, rng: np.random.Generator, num_shapes: int
           ) -> tuple[Image.Image, list[tuple[str, list[tuple[float, float]]]]]:
    """A textured background with `num_shapes` shapes drawn over it (later ones on top); the shapes' polygons."""
    hue = rng.uniform(0, 1)
    base = np.array(colorsys.hsv_to_rgb(hue, 0.25, 0.6)) * 255
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = np.sin(2 * np.pi * (xx * rng.uniform(0.05, 0.15) + yy * rng.uniform(0.02, 0.1)))
    pixels = base[None, None, :] * (0.8 + 0.2 * stripes[..., None]) + rng.normal(0, 10, (height, width, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    shapes = []
    for _ in range(num_shapes):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        r = float(rng.uniform(0.12, 0.25) * min(width, height))
        cx, cy = float(rng.uniform(r + 2, width - r - 2)), float(rng.uniform(r + 2, height - r - 2))
        poly = [(round(x, 2), round(y, 2)) for x, y in _polygon(kind, cx, cy, r)]
        draw.polygon(poly, fill=SHAPE_COLOR[kind])
        shapes.append((kind, poly))
    return img, shapes


def _zip_write(zf: zipfile.ZipFile, name: str, data: bytes, compression: int) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = compression
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _size(size: int, k: int) -> tuple[int, int]:
    """(width, height): not square, so a swapped width and height shows."""
    return size + 8 * (k % 3), size + 4 * ((k + 1) % 2)


def ade20k_mask(width: int, height: int, shapes: list[tuple[str, list[tuple[float, float]]]]) -> bytes:
    """The PNG mask of a scene: background wall, shapes by their ADE20K class, a 2-pixel border of 0."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    draw.rectangle((2, 2, width - 3, height - 3), fill=ADE_BACKGROUND)
    for kind, poly in shapes:
        draw.polygon(poly, fill=ADE_CLASS_OF[kind])
    draw.rectangle((0, 0, width - 1, height - 1), outline=0, width=2)
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def write_ade20k_zip(path: str | Path, n_train: int, n_val: int, size: int = 64, seed: int = 0, *,
                     compression: int = zipfile.ZIP_DEFLATED) -> dict[str, dict[str, list[int]]]:
    """ADEChallengeData2016.zip at `path`; returns {split: {stem: the class ids its mask holds, sorted}}."""
    rng = np.random.default_rng(seed)
    drawn: dict[str, dict[str, list[int]]] = {}
    with zipfile.ZipFile(path, "w") as zf:
        for split, prefix, n in (("training", "train", n_train), ("validation", "val", n_val)):
            drawn[split] = {}
            for k in range(n):
                stem = f"ADE_{prefix}_{k + 1:08d}"
                width, height = _size(size, k)
                img, shapes = _scene(width, height, rng, int(rng.integers(1, 4)))
                mask = ade20k_mask(width, height, shapes)
                _zip_write(zf, f"ADEChallengeData2016/images/{split}/{stem}.jpg", jpeg_bytes(img), compression)
                _zip_write(zf, f"ADEChallengeData2016/annotations/{split}/{stem}.png", mask, compression)
                drawn[split][stem] = sorted(set(np.unique(np.asarray(Image.open(io.BytesIO(mask)))).tolist()))
        _zip_write(zf, "ADEChallengeData2016/objectInfo150.txt", b"Idx\tRatio\tTrain\tVal\tName\n", compression)
    return drawn


def _polygon_area(poly: list[tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1], strict=True))) / 2


def write_coco_zips(dest: str | Path, n_train: int, n_val: int, size: int = 64, seed: int = 0, *,
                    compression: int = zipfile.ZIP_DEFLATED) -> dict[str, Path]:
    """train2017.zip, val2017.zip and annotations_trainval2017.zip in `dest`; returns their paths by name
    ("train2017", "val2017", "annotations")."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    instances: dict[str, dict[str, Any]] = {}
    ann_id = 1
    paths: dict[str, Path] = {}
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        images, annotations = [], []
        paths[split] = dest / f"{split}.zip"
        with zipfile.ZipFile(paths[split], "w") as zf:
            for k in range(n):
                image_id = int(rng.integers(1, 600_000))
                while any(i["id"] == image_id for i in images):
                    image_id += 1
                width, height = _size(size, k)
                img, shapes = _scene(width, height, rng, 0 if k % 4 == 3 else int(rng.integers(1, 4)))
                file_name = f"{image_id:012d}.jpg"
                _zip_write(zf, f"{split}/{file_name}", jpeg_bytes(img), compression)
                images.append({"license": 1, "file_name": file_name, "coco_url": "", "height": height,
                               "width": width, "date_captured": "2013-11-14 16:28:13", "flickr_url": "",
                               "id": image_id})
                for kind, poly in shapes:
                    xs, ys = [x for x, _ in poly], [y for _, y in poly]
                    bbox = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
                    annotations.append({"segmentation": [[c for point in poly for c in point]],
                                        "area": round(_polygon_area(poly), 2), "iscrowd": 0, "image_id": image_id,
                                        "bbox": bbox, "category_id": COCO_CATEGORY_OF[kind], "id": ann_id})
                    ann_id += 1
        instances[split] = {"info": {"description": "vfm synthetic COCO-format data", "version": "1.0",
                                     "year": 2017},
                            "licenses": [{"url": "", "id": 1, "name": "synthetic"}],
                            "images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    paths["annotations"] = dest / "annotations_trainval2017.zip"
    with zipfile.ZipFile(paths["annotations"], "w") as zf:
        for split, d in instances.items():
            _zip_write(zf, f"annotations/instances_{split}.json", json.dumps(d).encode(), compression)
    return paths
