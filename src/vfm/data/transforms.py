"""Recipe transforms from timm, in timm's prefetcher convention: PIL RGB in, uint8 CHW tensor out of the
loader's workers; `DeviceNormalize` then converts, normalises and random-erases the batch on the device.

Why the convention (timm/data/loader.py `PrefetchLoader`, `create_transform(use_prefetcher=True)`): a worker
that stops at uint8 skips the float conversion and per-image normalisation, a third of its time per image
(benchmarks/data_loader_throughput.py), and the batch it pins and copies to the GPU is 4× smaller.

Training calls `transforms_imagenet_train` directly because `create_transform` does not forward
`force_color_jitter`, and timm drops colour jitter whenever RandAugment is on (timm/data/transforms_factory.py,
`transforms_imagenet_train`: `disable_color_jitter = not (force_color_jitter or '3a' in auto_augment)`).
Evaluation: resize the short side to resolution / crop_pct, then centre-crop `resolution`: timm's eval transform,
run on the uint8 tensor that torchvision's decoder gives (`TensorEvalTransform`), not on a PIL image.
Random erasing works on the normalised batch, so it runs in `DeviceNormalize` (timm's PrefetchLoader does the
same); it draws from the trainer's RNG streams, which checkpoints save, so a resumed run erases the same boxes.
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

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from timm.data import auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train
from torchvision import transforms as tv1

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
            use_prefetcher=True,  # uint8 out; random erasing is DeviceNormalize's (see device_normalize)
        )
    return TensorEvalTransform(transforms_imagenet_eval(
        img_size=data_config.resolution,
        crop_pct=data_config.crop_pct,
        interpolation=data_config.augment.interpolation,
        mean=tuple(data_config.mean),
        std=tuple(data_config.std),
        use_prefetcher=True,
    ))


class TensorEvalTransform:
    """timm's eval transform (`transforms_imagenet_eval`: short-side resize, centre crop), run on uint8 CHW tensors
    by torchvision's v2 kernels instead of on a PIL image.

    Why: on one core the bicubic short-side resize of a 500 px image to 256 px costs 2.6 ms in PIL and 0.4 ms in v2's
    uint8 kernel (timm's own v1 `Resize` on a tensor converts to float and costs 2.9 ms), and TorchCodec decodes the
    JPEG at 1.23x PIL's speed (benchmarks/jpeg_decode.py): together the eval loader runs at about 2.4x ImageFolder
    (benchmarks/data_loader_throughput.py). The loader hands this transform the
    decoded tensor (`takes_tensor`); a PIL image is converted first, so any caller still works. Pixels are within a
    few uint8 levels of timm's PIL path (bicubic resampling rounds differently; antialiased as PIL is).

    The sizes come from timm's own Compose, so crop_pct and interpolation mean what they mean in timm; a step this
    class does not know (a timm upgrade, another crop mode) is refused rather than skipped."""

    takes_tensor = True

    def __init__(self, timm_eval: tv1.Compose):
        self.steps: list[tuple[str, dict]] = []
        for t in timm_eval.transforms:
            if isinstance(t, tv1.Resize):
                self.steps.append(("resize", {"size": [t.size] if isinstance(t.size, int) else list(t.size),
                                              "interpolation": t.interpolation, "max_size": t.max_size}))
            elif isinstance(t, tv1.CenterCrop):
                self.steps.append(("crop", {"output_size": list(t.size)}))
            elif not isinstance(t, MaybePILToTensor):
                raise TypeError(f"timm's eval transform has a step vfm does not run on tensors: {t!r}; update "
                                "vfm.data.transforms.TensorEvalTransform for it")

    def __call__(self, img: torch.Tensor | Image.Image) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = TF.pil_to_tensor(img.convert("RGB"))
        for op, kw in self.steps:
            img = TF.resize(img, antialias=True, **kw) if op == "resize" else TF.center_crop(img, **kw)
        return img

    def __repr__(self) -> str:
        return f"TensorEvalTransform({self.steps})"


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """The batch (B, C, H, W) of the workers' uint8 CHW images, in channels-last memory.

    torchvision's `pil_to_tensor` returns a CHW view of the image's HWC buffer; stacking the views as they are is
    a strided copy (4.5 ms for 50 images of 224 px on one core here), stacking the HWC buffers is a plain one
    (0.9 ms). The batch keeps the HWC layout as channels-last strides; `DeviceNormalize` makes it contiguous."""
    return torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)


class DeviceNormalize:
    """uint8 image batches (B, C, H, W) -> float32, normalised by the recipe's mean/std (and random-erased in
    training), on whatever device the batch is: the device half of timm's prefetcher convention (timm/data/loader.py
    `PrefetchLoader.__iter__`, whose arithmetic this is)."""

    def __init__(self, mean, std, random_erasing: RandomErasing | None = None):
        self.mean = torch.tensor([255 * m for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std]).view(1, -1, 1, 1)
        self.random_erasing = random_erasing

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize takes the loader's uint8 images, got {images.dtype}: build the "
                            "transform with vfm.data.transforms (timm's use_prefetcher convention)")
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        # contiguous NCHW first (the loader's batches are channels-last, see stack_images): float arithmetic over
        # channels-last strides is 2x slower on a CPU, and the models' own layout switch (channels_last) follows
        out = images.contiguous().float().sub_(self.mean).div_(self.std)
        return self.random_erasing(out) if self.random_erasing is not None else out


def device_normalize(data_config: DataConfig, device: torch.device | str, is_training: bool) -> DeviceNormalize:
    """The device half of `build_transform(data_config, is_training)`."""
    aug = data_config.augment
    erase = None
    if is_training and aug.random_erase > 0:
        erase = RandomErasing(aug.random_erase, mode=aug.re_mode, max_count=aug.re_count, device=device)
    return DeviceNormalize(data_config.mean, data_config.std, erase)
