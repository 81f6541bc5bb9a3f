"""Recipe transforms from timm (PIL RGB in, normalised CHW float tensor out).

Training calls `transforms_imagenet_train` directly because `create_transform` does not forward
`force_color_jitter`, and timm drops colour jitter whenever RandAugment is on (recipes.md §1.4).
Evaluation: resize the short side to resolution / crop_pct, then centre-crop `resolution`.
Mixup/CutMix operate on batches and belong to the trainer.
"""

from __future__ import annotations

from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

from vfm.recipes.schema import DataConfig


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
        )
    return transforms_imagenet_eval(
        img_size=data_config.resolution,
        crop_pct=data_config.crop_pct,
        interpolation=data_config.augment.interpolation,
        mean=tuple(data_config.mean),
        std=tuple(data_config.std),
    )
