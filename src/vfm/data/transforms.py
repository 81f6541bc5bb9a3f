"""Recipe transforms from timm (PIL RGB in, normalised CHW float tensor out).

Training calls `transforms_imagenet_train` directly because `create_transform` does not forward
`force_color_jitter`, and timm drops colour jitter whenever RandAugment is on (timm/data/transforms_factory.py,
`transforms_imagenet_train`: `disable_color_jitter = not (force_color_jitter or '3a' in auto_augment)`).
Evaluation: resize the short side to resolution / crop_pct, then centre-crop `resolution`.
Mixup/CutMix operate on batches and belong to the trainer.

RandAugment's posterize is guarded here, once, for every augmentation string a recipe can name: timm
1.0.31 (timm/data/auto_augment.py, `posterize` and `_posterize_increasing_level_to_arg`) asks
`ImageOps.posterize` for 0 bits when the sampled magnitude reaches the top of the range
(`PosterizeIncreasing` at magnitude 10, `Posterize` at 0), and Pillow 13 (PIL/ImageOps.py `posterize`)
rejects 0 bits with "bits must be between or equal to 1 and 8". Older Pillow returned a black image for
0 bits (its mask `~(2**8 - 1)` keeps nothing), which is what timm's policies assume; `safe_posterize`
restores that for any Pillow.
"""

from __future__ import annotations

from PIL import Image, ImageOps
from timm.data import auto_augment
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

from vfm.recipes.schema import DataConfig

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def safe_posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's `posterize` with 0 bits mapped to black, as Pillow < 11 did (`ImageOps.posterize` mask)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked off: black in the image's own mode
    return ImageOps.posterize(img, bits_to_keep)


def _guard_timm_posterize() -> None:
    """Register `safe_posterize` in timm's op table; `AugmentOp` reads NAME_TO_OP when it is built."""
    missing = [n for n in POSTERIZE_OPS if n not in auto_augment.NAME_TO_OP]
    if missing:  # a timm upgrade renamed the ops: fail loudly rather than train with the crash back
        raise RuntimeError(f"timm.data.auto_augment.NAME_TO_OP lacks {missing}; update vfm.data.transforms "
                           "for this timm version")
    for name in POSTERIZE_OPS:
        auto_augment.NAME_TO_OP[name] = safe_posterize


_guard_timm_posterize()


def build_transform(data_config: DataConfig, is_training: bool):
    if is_training:
        aug = data_config.augment
        return transforms_imagenet_train(
            img_size=data_config.resolution,
            scale=tuple(aug.scale),
            hflip=aug.hflip,
            color_jitter=aug.color_jitter if aug.color_jitter is not None else 0.0,
            force_color_jitter=aug.force_color_jitter,
            auto_augment=aug.rand_augment,
            interpolation=aug.interpolation,
            mean=tuple(data_config.mean),
            std=tuple(data_config.std),
            re_prob=aug.random_erase,
            re_mode=aug.re_mode,
            re_count=aug.re_count,
        )
    return transforms_imagenet_eval(
        img_size=data_config.resolution,
        crop_pct=data_config.crop_pct,
        interpolation=data_config.augment.interpolation,
        mean=tuple(data_config.mean),
        std=tuple(data_config.std),
    )
