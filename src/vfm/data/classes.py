"""Class lists. Label = position in the dataset's sorted wnid list, the convention of torchvision
ImageFolder (torchvision/datasets/folder.py), timm (timm/data/readers/reader_image_in_tar.py, natural_key
sort) and DINOv2 (dinov2/data/datasets/image_net_22k.py `_find_class_ids`). The official lists ship with
timm (`timm/data/_info`)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path


@cache
def timm_synsets(name: str) -> tuple[str, ...]:
    """e.g. `imagenet_synsets` (IN-1K, 1000), `imagenet22k_synsets` (fall11, 21841), `imagenet_r_synsets`."""
    # located without importing timm (which imports torch: seconds of start-up for a text file)
    spec = importlib.util.find_spec("timm")
    text = (Path(spec.submodule_search_locations[0]) / "data" / "_info" / f"{name}.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def in1k_wnids() -> tuple[str, ...]:
    return timm_synsets("imagenet_synsets")


def in22k_wnids() -> tuple[str, ...]:
    return timm_synsets("imagenet22k_synsets")


def imagenet_r_wnids() -> tuple[str, ...]:
    return timm_synsets("imagenet_r_synsets")


def read_class_file(path: str) -> list[str]:
    """A user class list: one wnid/class name per line; label = line number (blank lines ignored)."""
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate class names {dupes[:5]}")
    return names
