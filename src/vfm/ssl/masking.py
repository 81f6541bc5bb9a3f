"""iBOT block masking as DINOv2 does it (`dinov2/data/masking.py`, `dinov2/data/collate.py`).

`BlockMasker` is BEiT's generator: rectangles of random area (≥ `min_num_patches`) and log-uniform
aspect ratio are added until the requested number of patches is masked (or no rectangle fits).
`batch_masks` picks which global crops are masked (`mask_sample_probability` of them) and their
ratios: the masked crops' ratios are spread over [min, max] by drawing each from its own linspace
bin, so every batch covers the whole range instead of clustering around the mean.

All randomness comes from the `random.Random` passed in, so a batch's masks are a function of the
loader's seed and position (exact resume).
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor


class BlockMasker:
    def __init__(self, grid: tuple[int, int], min_num_patches: int = 4, max_num_patches: float | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        # DINOv2 caps one rectangle at half the grid
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: Tensor, max_mask_patches: float, rng: random.Random) -> int:
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> Tensor:
        """A (height, width) bool mask with at most `num_masking_patches` True (BEiT never overshoots)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            delta = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if delta == 0:
                break
            count += delta
        return mask


def batch_masks(n_images: int, masker: BlockMasker, mask_ratio: tuple[float, float], probability: float,
                rng: random.Random) -> Tensor:
    """(n_images, num_patches) bool masks for the global crops of a micro-batch (DINOv2's collate)."""
    n = masker.num_patches
    n_masked_images = int(n_images * probability)
    lo, hi = mask_ratio
    bins = [lo + (hi - lo) * i / n_masked_images for i in range(n_masked_images + 1)] if n_masked_images else []
    masks = [masker(int(n * rng.uniform(bins[i], bins[i + 1])), rng) for i in range(n_masked_images)]
    masks += [torch.zeros(masker.height, masker.width, dtype=torch.bool)] * (n_images - n_masked_images)
    rng.shuffle(masks)
    return torch.stack(masks).flatten(1)
