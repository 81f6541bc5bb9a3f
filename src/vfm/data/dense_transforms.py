"""Joint image + target augmentation of the dense transfer stages, on the samples `vfm shard` writes for ADE20K
(`jpg` + `seg.png` + `json`) and COCO (`jpg` + `json` with the image's annotations).

Each function takes one raw sample and returns uint8 CHW image tensors with their targets; the loader runs it in
its workers under the per-batch seeded RNG (vfm.data.loader `ShardLoader(sample_fn=...)`), so a resumed run draws
the same scales, crops and flips. Normalisation happens on the device (vfm.data.transforms.DeviceNormalize).

- Segmentation training (mmsegmentation's ADE20K pipeline, configs/_base_/datasets/ade20k.py): random rescale by a
  ratio drawn from `scale` (the short side to `size` x ratio; mmseg's (2048, 512) keep-ratio scale is the same for
  ADE20K's landscape images), a random `size` x `size` crop (padded with the ignore label where the image is
  smaller), a horizontal flip; masks resize with nearest neighbours. Targets follow `ade20k_target`.
- Detection training (ViTDet's large-scale jitter, facebookresearch/detectron2 projects/ViTDet/configs/common/
  coco_loader_lsj.py: `ResizeScale(min_scale, max_scale, target 1024x1024)` + `FixedSizeCrop(pad=True)`): the image
  scaled to fit `size` x `size` times a ratio drawn from `scale`, a random crop to at most `size` x `size`, padded to
  exactly `size` x `size` (detectron2's pad value 128), a horizontal flip; boxes and instance masks follow; crowd
  annotations and boxes cut away by the crop are dropped, as detectron2's training filter does.
- Evaluation takes the whole image (segmentation) or the image as stored (detection: torchvision's transform fits
  it to the detector's size and maps the boxes back to the image).

Own code rather than torchvision's v2 transforms: v2 does the geometry of boxes and masks, but not mmseg's
short-side rescale with a ratio, the ignore-padded crop, or detectron2's scale-to-fit jitter; those are a few lines
of arithmetic around torchvision's `resize`.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IGNORE_INDEX = 255
LSJ_PAD_VALUE = 128  # detectron2 FixedSizeCrop's default pad_value


def _image(sample: dict[str, Any]) -> torch.Tensor:
    """The sample's image as a uint8 RGB CHW tensor (TorchCodec, as vfm.data.loader.decode_sample)."""
    from vfm.data.loader import decode_sample

    img, _, _ = decode_sample({**sample, "cls": b"0"}, as_tensor=True)
    return img


def _where(sample: dict[str, Any]) -> str:
    return f"sample {sample.get('__key__')!r} in {sample.get('__url__', '?')}"


def seg_mask(sample: dict[str, Any]) -> torch.Tensor:
    """The sample's raw mask (uint8 HxW, the PNG's values)."""
    if "seg.png" not in sample:
        raise ValueError(f"{_where(sample)} has no `seg.png` mask: is this a segmentation manifest (vfm shard "
                         "ade20k)?")
    mask = Image.open(io.BytesIO(sample["seg.png"]))
    if mask.mode not in ("L", "P"):
        raise ValueError(f"{_where(sample)}: its mask is a {mask.mode} PNG; ADE20K masks are 8-bit single channel")
    return torch.from_numpy(np.array(mask, dtype=np.uint8))


def _seg_target(mask: torch.Tensor) -> torch.Tensor:
    from vfm.evaluate.dense import ade20k_target

    return ade20k_target(mask)


def seg_train_sample(sample: dict[str, Any], *, size: int, scale: tuple[float, float], hflip: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 image 3 x size x size, int64 target size x size) of a segmentation sample, augmented (module doc)."""
    import torchvision.transforms.v2.functional as TF

    img, mask = _image(sample), seg_mask(sample)
    if img.shape[-2:] != mask.shape:
        raise ValueError(f"{_where(sample)}: image {tuple(img.shape[-2:])} and mask {tuple(mask.shape)} differ in "
                         "size; vfm shard skips such samples, so the shard is not vfm's: shard it again")
    h, w = mask.shape
    ratio = random.uniform(*scale)
    short = max(1, round(size * ratio))
    nh, nw = (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
    img = TF.resize(img, [nh, nw], antialias=True)
    mask = TF.resize(mask[None], [nh, nw], interpolation=TF.InterpolationMode.NEAREST)[0]
    target = _seg_target(mask)
    top, left = random.randint(0, max(nh - size, 0)), random.randint(0, max(nw - size, 0))
    img, target = img[:, top:top + size, left:left + size], target[top:top + size, left:left + size]
    ph, pw = size - img.shape[1], size - img.shape[2]
    if ph or pw:  # smaller than the crop: pad, the padding ignored by the loss
        img = F.pad(img, (0, pw, 0, ph))
        target = F.pad(target, (0, pw, 0, ph), value=IGNORE_INDEX)
    if random.random() < hflip:
        img, target = img.flip(-1), target.flip(-1)
    return img.contiguous(), target.contiguous()


def seg_eval_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 image, int64 target) of a segmentation sample, whole and unchanged."""
    return _image(sample), _seg_target(seg_mask(sample))


def collate_seg(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])


# ---- detection ---------------------------------------------------------------------------------------------


def det_record(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's COCO record: {"image_id", "width", "height", "annotations": [...]} as `vfm shard coco2017`
    stored it."""
    if "json" not in sample:
        raise ValueError(f"{_where(sample)} has no `json` member with its annotations: is this a detection manifest "
                         "(vfm shard coco2017)?")
    record = json.loads(sample["json"])
    if "annotations" not in record:
        raise ValueError(f"{_where(sample)}: its json has no `annotations`; is this a detection manifest?")
    return record


def instance_masks(annotations: list[dict[str, Any]], height: int, width: int) -> torch.Tensor:
    """uint8 N x H x W masks of COCO annotations (polygons or RLE), through pycocotools as COCO.annToMask does
    (cocodataset/cocoapi PythonAPI/pycocotools/coco.py `annToRLE`)."""
    from pycocotools import mask as mask_utils

    out = np.zeros((len(annotations), height, width), dtype=np.uint8)
    for k, ann in enumerate(annotations):
        seg = ann.get("segmentation")
        if not seg:
            continue
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE (crowd)
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        out[k] = mask_utils.decode(rle)
    return torch.from_numpy(out)


def det_train_sample(sample: dict[str, Any], *, size: int, scale: tuple[float, float], hflip: float,
                     label_of: dict[int, int], masks: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(uint8 image 3 x size x size, torchvision target {"boxes" xyxy, "labels", "masks"?}) with large-scale jitter
    (module doc). `label_of` maps COCO category ids to the detector's labels 1..K."""
    import torchvision.transforms.v2.functional as TF

    record = det_record(sample)
    img = _image(sample)
    h, w = img.shape[-2:]
    anns = [a for a in record["annotations"] if not a.get("iscrowd", 0) and a["category_id"] in label_of]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    m = instance_masks(anns, h, w) if masks else None
    f = min(size / h, size / w) * random.uniform(*scale)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    img = TF.resize(img, [nh, nw], antialias=True)
    boxes *= torch.tensor([nw / w, nh / h, nw / w, nh / h])
    if m is not None and len(anns):
        m = TF.resize(m, [nh, nw], interpolation=TF.InterpolationMode.NEAREST)
    top, left = random.randint(0, max(nh - size, 0)), random.randint(0, max(nw - size, 0))
    img = img[:, top:top + size, left:left + size]
    boxes -= torch.tensor([left, top, left, top], dtype=torch.float32)
    ch, cw = img.shape[-2:]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
    if m is not None:
        m = m[:, top:top + size, left:left + size] if len(anns) else m.new_zeros((0, ch, cw))
    img = F.pad(img, (0, size - cw, 0, size - ch), value=LSJ_PAD_VALUE)
    if m is not None:
        m = F.pad(m, (0, size - cw, 0, size - ch))
    if random.random() < hflip:
        img = img.flip(-1)
        boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
        if m is not None:
            m = m.flip(-1)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)  # cut away by the crop
    target = {"boxes": boxes[keep], "labels": torch.tensor([label_of[a["category_id"]] for a in anns],
                                                          dtype=torch.int64).reshape(-1)[keep]}
    if m is not None:
        target["masks"] = m[keep].contiguous()
    return img.contiguous(), target


def det_eval_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(uint8 image as stored, its COCO record)."""
    return _image(sample), det_record(sample)


def collate_det(items: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Training batches: the fixed-size images stacked, the targets a list (their box counts differ)."""
    return torch.stack([i for i, _ in items]), [t for _, t in items]


def collate_list(items: list[tuple[torch.Tensor, Any]]) -> tuple[list[torch.Tensor], list[Any]]:
    """Evaluation batches: images of different sizes, as lists."""
    return [i for i, _ in items], [t for _, t in items]

