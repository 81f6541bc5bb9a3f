"""DINOv2 multi-crop augmentation and collate (`dinov2/data/augmentations.py`, `data/collate.py`).

Per image: `global_crops_count` crops of `global_crops_size` px (scale 0.32–1) and
`local_crops_count` crops of `local_crops_size` px (scale 0.05–0.32), each
RandomResizedCrop(bicubic) + horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8,
grayscale p=0.2, then per-crop extras:
  - global crop 1 (and every odd-numbered global crop): Gaussian blur p=1.0;
  - global crop 2 (every even-numbered one): blur p=0.1 + solarisation (threshold 128) p=0.2;
  - local crops: blur p=0.5.
Upstream has exactly two global crops; with more (seed 003 read literally: 10) the two recipes
alternate so half the globals are blurred and half solarised-or-sharp, as with two.

Crops leave the workers as uint8 tensors; `DinoTask.loss` normalises them on the device (timm's prefetcher
convention, vfm.data.transforms), where upstream's `make_normalize_transform` runs per crop on the CPU: ten crops an
image make the per-crop float conversion the largest part of a worker's time after decoding.

The collate stacks crops crop-major (all images' crop 0, then crop 1, …) so `chunk(n_crops)` splits
them by crop, and draws the iBOT block masks for the global crops.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from vfm.data.transforms import stack_images
from vfm.recipes.schema import MultiCropConfig, SSLConfig
from vfm.ssl.masking import BlockMasker, batch_masks


def _blur(p: float) -> T.RandomApply:
    # kernel 9, sigma U(0.1, 2.0) as upstream's GaussianBlur(RandomApply)
    return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


class MultiCropTransform:
    """PIL image → {"global": [n_global × uint8 (3, G, G)], "local": [n_local × uint8 (3, L, L)]}."""

    def __init__(self, cfg: MultiCropConfig):
        self.cfg = cfg
        bicubic = T.InterpolationMode.BICUBIC
        self.geometric_global = T.Compose([
            T.RandomResizedCrop(cfg.global_crops_size, scale=cfg.global_crops_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(p=0.5),
        ])
        self.geometric_local = T.Compose([
            T.RandomResizedCrop(cfg.local_crops_size, scale=cfg.local_crops_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(p=0.5),
        ])
        colour = T.Compose([
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        to_uint8 = T.PILToTensor()
        self.global_1 = T.Compose([colour, _blur(1.0), to_uint8])
        self.global_2 = T.Compose([colour, _blur(0.1), T.RandomSolarize(threshold=128, p=0.2), to_uint8])
        self.local = T.Compose([colour, _blur(0.5), to_uint8])

    def __call__(self, image: Image.Image) -> dict[str, list[Tensor]]:
        image = image.convert("RGB")
        globals_ = [(self.global_1 if i % 2 == 0 else self.global_2)(self.geometric_global(image))
                    for i in range(self.cfg.global_crops_count)]
        locals_ = [self.local(self.geometric_local(image)) for _ in range(self.cfg.local_crops_count)]
        return {"global": globals_, "local": locals_}


@dataclass
class MultiCropCollate:
    """List of (crops dict, label) → the batch `DinoTask.loss` takes.

    {"labels": (B,), "global": (n_global·B, 3, G, G), "local": (n_local·B, 3, L, L) or None,
     "masks": (n_global·B, N_patches) bool}. `labels` comes first: the loop counts samples by the
    first tensor. Unlabelled data carries -1.
    """

    grid: tuple[int, int]
    mask_ratio: tuple[float, float]
    mask_probability: float
    ibot: bool = True

    def __post_init__(self) -> None:
        self.masker = BlockMasker(self.grid)

    def __call__(self, samples: list[Any]) -> dict[str, Tensor | None]:
        crops = [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
        labels = [int(s[1]) if isinstance(s, (tuple, list)) and len(s) > 1 else -1 for s in samples]
        n_global, n_local = len(crops[0]["global"]), len(crops[0]["local"])
        glob = stack_images([c["global"][i] for i in range(n_global) for c in crops])
        local = stack_images([c["local"][i] for i in range(n_local) for c in crops]) if n_local else None
        n_images = glob.shape[0]
        if self.ibot:
            # seeded from torch's RNG, which the loader seeds per worker/position like the crops'
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()))
            masks = batch_masks(n_images, self.masker, self.mask_ratio, self.mask_probability, rng)
        else:
            masks = torch.zeros(n_images, self.grid[0] * self.grid[1], dtype=torch.bool)
        return {"labels": torch.tensor(labels, dtype=torch.int64), "global": glob, "local": local, "masks": masks}


def patch_grid(crop_size: int, patch_size: int) -> tuple[int, int]:
    if crop_size % patch_size:
        raise ValueError(f"multicrop crop size {crop_size} is not a multiple of the patch size {patch_size}; "
                         "use crops of whole patches (DINOv2: 224 and 98 for patch 14)")
    return crop_size // patch_size, crop_size // patch_size


def make_collate(ssl: SSLConfig, cfg: MultiCropConfig, patch_size: int) -> MultiCropCollate:
    patch_grid(cfg.local_crops_size, patch_size)
    return MultiCropCollate(patch_grid(cfg.global_crops_size, patch_size), ssl.mask_ratio,
                            ssl.mask_sample_probability, ssl.ibot)
