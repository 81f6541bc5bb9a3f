"""A copy-detection embedding trained in the test session (a tiny ResNet, SimCLR's InfoNCE on copy-detection
augmentations of a pool disjoint from the evaluated one), saved as a vfm export: what the embedding stage of
`vfm curate` is tested with (tests/curate)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance

from tests.helpers.curate_data import make_pool
from vfm.export import ExportMeta, save_export

SIZE = 40           # input resolution of the trained model and of its export
TRAIN_IMAGES = 120  # originals of a second pool (seed 1), disjoint from the evaluated pool (seed 0)
VIEWS = 32          # augmented views per training image, drawn once
STEPS, BATCH, TAU = 150, 64, 0.1
SEED = 0
# the cosine above which two images are copies, for this model (a threshold belongs to its embedding model).
# Measured over training seeds 0-3 (seed 0 is the test's): recall 0.95-1.0 of the 5 kinds, 0-8 false pairs,
# same-class pairs at most 0.76-0.83
IMAGE_THRESHOLD = 0.88
KINDS = ("reencode", "resize", "crop", "watermark", "colour")
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}


def _view(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A copy-detection augmentation (SSCD-style, Pizzi et al. 2022): a random crop, then the eval transform's
    short-side resize and centre crop, hue/saturation/brightness, a text strip, JPEG."""
    w, h = img.size
    area, ratio = rng.uniform(0.6, 1.0) * w * h, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, round(np.sqrt(area * ratio))), min(h, round(np.sqrt(area / ratio)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    k = SIZE / min(out.size)
    out = out.resize((max(SIZE, round(out.width * k)), max(SIZE, round(out.height * k))), Image.Resampling.BICUBIC)
    left, top = (out.width - SIZE) // 2, (out.height - SIZE) // 2
    out = out.crop((left, top, left + SIZE, top + SIZE))
    if rng.uniform() < 0.8:
        hsv = np.asarray(out.convert("HSV"), np.int16).copy()
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-20, 21))) % 256
        out = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
        out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.75, 1.25))
    if rng.uniform() < 0.3:
        draw, strip, grey = ImageDraw.Draw(out), int(rng.integers(3, 9)), int(rng.integers(0, 256))
        y = 0 if rng.uniform() < 0.5 else SIZE - strip
        draw.rectangle((0, y, SIZE, y + strip), fill=(grey, grey, grey))
        draw.text((2, y), "abc", fill=(255 - grey,) * 3)
    if rng.uniform() < 0.6:
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=int(rng.integers(30, 90)))
        out = Image.open(buf).convert("RGB")
    return np.asarray(out)


def train_copy_detector(tmp_path: Path) -> str:
    """A tiny ResNet trained with InfoNCE (SimCLR's loss on the backbone's pooled features, no projection head)
    to match two augmented views of one image among the batch; saved as a vfm export (backbone only)."""
    import timm

    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    train = make_pool(tmp_path / "train", originals=TRAIN_IMAGES, seed=1, kinds=(), bad=False)
    images = []
    for name in train.originals:
        im = Image.open(train.root / name).convert("RGB")
        k = 2 * SIZE / min(im.size)  # views are cut from a 2x-size copy: cheaper, and the crop keeps detail
        images.append(im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BICUBIC))
    bank = torch.from_numpy(np.stack([[_view(im, rng) for _ in range(VIEWS)] for im in images]))
    bank = bank.permute(0, 1, 4, 2, 3).contiguous()  # (images, views, 3, S, S) uint8
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    model = timm.create_model("resnet18", pretrained=False, num_classes=0, **TINY_RESNET)
    model = model.to(memory_format=torch.channels_last)  # 1.8x faster convolutions on CPU at this size
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=STEPS, pct_start=0.1)
    g = torch.Generator().manual_seed(SEED)
    target = torch.cat([torch.arange(BATCH, 2 * BATCH), torch.arange(BATCH)])
    for _ in range(STEPS):
        idx = torch.randperm(len(bank), generator=g)[:BATCH]
        pair = torch.stack([torch.randperm(VIEWS, generator=g)[:2] for _ in idx])
        x = torch.cat([bank[idx, pair[:, 0]], bank[idx, pair[:, 1]]]).float().div(255).sub(mean).div(std)
        x = x.contiguous(memory_format=torch.channels_last)
        z = F.normalize(model(x), dim=1)
        logits = (z @ z.T / TAU).fill_diagonal_(-1e9)  # each view's positive is the other view of its image
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    meta = ExportMeta(timm_name="resnet18", kwargs=TINY_RESNET, num_classes=0, recipe_id="curate-test",
                      stage="pretrain", resolution=SIZE, crop_pct=1.0, seed=SEED, step=STEPS,
                      extra={"objective": "InfoNCE on copy-detection augmentations", "final_loss": loss.item()})
    return save_export(model.eval(), meta, tmp_path / "export")


