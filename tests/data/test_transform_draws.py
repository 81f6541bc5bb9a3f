"""Every recipe's training transform survives tens of thousands of random draws.

timm 1.0.31's RandAugment asks Pillow 13 for a 0-bit posterize at the top of its magnitude range; with
`rand-m9-mstd0.5-inc1` (ConvNeXt) that is about 2 draws in 1,000, so a real run died within minutes.
The draws are of small images (32 px crops) so that 20,000 of them take seconds. VFM_SCALE=reduced (CI)
draws 5,000 per supervised transform, which still meets the old failure rate ~10 times on average.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment

from vfm.data.transforms import POSTERIZE_OPS, build_transform, safe_posterize
from vfm.recipes import list_recipes, load_recipe
from vfm.ssl.multicrop import MultiCropTransform

FULL = os.environ.get("VFM_SCALE", "reduced") == "full"
SUPERVISED_DRAWS = 20_000 if FULL else 5_000
MULTICROP_DRAWS = 2_000 if FULL else 200  # 12 crops a draw, and no RandAugment in DINOv2's pipeline


def _images(n: int = 8) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def _train_transforms() -> list[tuple[str, object, int]]:
    out = []
    for rid in list_recipes():
        recipe = load_recipe(rid)
        for stage, st in recipe.stages.items():
            if st.data.multicrop is not None:
                mc = st.data.multicrop.model_copy(update={"global_crops_size": 32, "local_crops_size": 16})
                out.append((f"{rid}:{stage}", MultiCropTransform(mc), MULTICROP_DRAWS))
            else:
                small = st.data.model_copy(update={"resolution": 32})
                out.append((f"{rid}:{stage}", build_transform(small, is_training=True), SUPERVISED_DRAWS))
    return out


@pytest.mark.scale
@pytest.mark.parametrize(("name", "transform", "draws"), _train_transforms(), ids=lambda v: v if isinstance(v, str) else "")
def test_training_transform_survives_many_draws(name, transform, draws):
    random.seed(0)
    torch.manual_seed(0)
    images = _images()
    for i in range(draws):
        try:
            out = transform(images[i % len(images)])
        except Exception as exc:  # name the recipe and the draw, so a failure can be replayed
            raise AssertionError(f"{name}: draw {i} raised {exc!r}") from exc
    assert out is not None


def test_every_recipe_augmentation_string_is_covered():
    strings = {load_recipe(r).stages[s].data.augment.rand_augment for r in list_recipes() for s in load_recipe(r).stages}
    assert {"rand-m9-mstd0.5-inc1", "rand-n9-m5"} <= strings


def test_zero_bit_posterize_is_black_and_registered_for_every_posterize_op():
    img = Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8))
    assert np.asarray(safe_posterize(img, 0)).max() == 0 and safe_posterize(img, 0).mode == "RGB"
    assert np.asarray(safe_posterize(img, 8)).min() == 200
    assert np.asarray(safe_posterize(img, 1)).max() == 128  # 200 keeps its top bit
    for name in POSTERIZE_OPS:
        assert auto_augment.NAME_TO_OP[name] is safe_posterize
    # the op that crashed: PosterizeIncreasing at timm's top magnitude asks for 0 bits
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert np.asarray(op(img)).max() == 0


def test_convnext_erases_with_per_pixel_noise_as_upstream():
    """facebookresearch/ConvNeXt main.py trains with --reprob 0.25 --remode pixel --recount 1 (as DeiT);
    timm's transforms_imagenet_train defaults to `const` (zeros)."""
    from timm.data.random_erasing import RandomErasing

    from vfm.data.transforms import build_transform, device_normalize
    from vfm.recipes import load_recipe

    recipe = load_recipe("convnext-xl")
    for stage in ("pretrain", "finetune"):
        data = recipe.stages[stage].data
        # erasing works on the normalised batch: on the device (timm PrefetchLoader), never in the workers
        assert not any(isinstance(x, RandomErasing) for x in build_transform(data, is_training=True).transforms)
        erase = device_normalize(data, "cpu", is_training=True).random_erasing
        assert (erase.mode, erase.max_count, erase.probability) == ("pixel", 1, 0.25)
        assert device_normalize(data, "cpu", is_training=False).random_erasing is None
    const = load_recipe("convnext-xl", ["stages.pretrain.data.augment.re_mode=const",
                                        "stages.pretrain.data.augment.re_count=2"])
    erase = device_normalize(const.stages["pretrain"].data, "cpu", is_training=True).random_erasing
    assert (erase.mode, erase.max_count) == ("const", 2)


def test_uint8_batches_normalised_on_the_device_match_timms_cpu_transform():
    """Workers stop at uint8 (timm's use_prefetcher convention) and DeviceNormalize finishes the batch: the result
    is timm's own CPU-normalised eval transform, up to the rounding of bicubic resampling on uint8 tensors (vfm runs
    timm's resize and crop with torchvision's v2 kernels, see TensorEvalTransform); anything but uint8 is refused
    rather than normalised twice."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    from vfm.data.transforms import device_normalize, stack_images
    from vfm.recipes.schema import DataConfig

    data = DataConfig(dataset="folder", resolution=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)) for _ in range(3)]
    batch = stack_images([build_transform(data, is_training=False)(im) for im in images])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 24, 24)
    reference = transforms_imagenet_eval(img_size=24, crop_pct=data.crop_pct, interpolation="bicubic",
                                         mean=data.mean, std=data.std)
    out = device_normalize(data, "cpu", is_training=False)(batch)
    assert out.is_contiguous()
    # back to uint8 levels: white noise is the worst case for resampling differences
    levels = ((out - torch.stack([reference(im) for im in images])) * 255 * torch.tensor(data.std).view(1, 3, 1, 1))
    assert levels.abs().max() <= 3.0 and levels.abs().mean() < 0.5
    with pytest.raises(TypeError, match="uint8"):
        device_normalize(data, "cpu", is_training=False)(out)
    erasing = data.model_copy(update={"augment": data.augment.model_copy(update={"random_erase": 1.0})})
    torch.manual_seed(0)
    random.seed(0)
    erased = device_normalize(erasing, "cpu", is_training=True)(batch)
    assert (erased != out).flatten(1).any(1).all()  # probability 1: a box in every image of the batch


def test_the_eval_transform_on_decoded_tensors_is_timms_geometry_within_rounding():
    """The loader decodes with torchvision (`decode_sample(as_tensor=True)`) and the eval transform resizes and crops
    that tensor: the same pixels as PIL's decode (libjpeg-turbo both), and within a few uint8 levels of timm's PIL
    transform on a natural-looking image; a PIL image given to the transform takes the same path."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    from vfm.data.loader import decode_sample
    from vfm.data.synthetic import jpeg_bytes, synthetic_image
    from vfm.recipes.schema import DataConfig

    data = DataConfig(dataset="folder", resolution=64)
    tf = build_transform(data, is_training=False)
    assert tf.takes_tensor
    reference = transforms_imagenet_eval(img_size=64, crop_pct=data.crop_pct, interpolation="bicubic",
                                         use_prefetcher=True)
    rng = np.random.default_rng(1)
    for size in (150, 73):
        blob = jpeg_bytes(synthetic_image(3, 10, size, rng))
        sample = {"__key__": "k", "jpg": blob, "cls": b"3"}
        tensor, label, meta = decode_sample(sample, as_tensor=True)
        pil, _, _ = decode_sample(sample)
        assert label == 3 and meta == {"key": "k"} and tensor.dtype == torch.uint8
        assert torch.equal(tensor, torch.from_numpy(np.array(pil)).permute(2, 0, 1))  # same decoded pixels
        ours, theirs = tf(tensor).int(), reference(pil).int()
        assert ours.shape == theirs.shape == (3, 64, 64)
        assert (ours - theirs).abs().max() <= 3 and (ours - theirs).abs().float().mean() < 0.5
        assert torch.equal(tf(pil), tf(tensor))
    with pytest.raises(ValueError, match="'bad'.*does not decode"):
        decode_sample({"__key__": "bad", "__url__": "s.tar", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "cls": b"0"},
                      as_tensor=True)


def test_an_eval_transform_step_vfm_cannot_run_on_tensors_is_refused():
    from timm.data.transforms_factory import transforms_imagenet_eval

    from vfm.data.transforms import TensorEvalTransform

    with pytest.raises(TypeError, match="does not run on tensors"):
        TensorEvalTransform(transforms_imagenet_eval(img_size=32, crop_mode="border"))


@pytest.mark.parametrize(("mode", "fmt"), [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
                                           ("RGB", "WEBP")])
def test_the_tensor_decoder_gives_pils_rgb_pixels_for_every_kept_format(mode, fmt):
    """Grey, CMYK, alpha, palette and WebP images come out of TorchCodec as PIL's `convert("RGB")` makes them, so
    evaluation (tensors) and training (PIL) see the same pixels of a sample."""
    from vfm.data.loader import decode_sample

    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode).save(
        buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    sample = {"__key__": "k", fmt.lower(): buf.getvalue(), "cls": b"0"}
    tensor, _, _ = decode_sample(sample, as_tensor=True)
    pil, _, _ = decode_sample(sample)
    assert torch.equal(tensor, torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1))
