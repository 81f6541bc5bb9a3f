"""Metrics for dense downstream transfer: ADE20K semantic segmentation (mIoU) and COCO detection (box/mask AP).

Segmentation follows open-mmlab/mmsegmentation mmseg/evaluation/metrics/iou_metric.py, the evaluator that
the DINOv2, BEiT, MAE and ConvNeXt papers report ADE20K numbers with:

- per class, IoU = intersection / union and accuracy = intersection / ground-truth pixels;
- a class absent from both prediction and ground truth has union 0, so its IoU is NaN and the mean over
  classes (nanmean) leaves it out; a class absent from the ground truth alone has NaN accuracy (and IoU 0
  if it was predicted, which does count against the mean);
- `pixel_acc` (mmseg's aAcc) = correct pixels / labelled pixels; all three are in percent, as mmseg
  prints them (mmseg then rounds to 2 decimals; we do not).

The counts live in one int64 `num_classes × num_classes` confusion matrix (rows = ground truth, columns =
prediction), so a distributed evaluation sums exact integers over ranks once (`all_reduce`) and never
gathers masks.

Detection uses pycocotools (`COCO`, `COCOeval`), the reference COCO evaluator, on in-memory ground truth
and results in COCO's results format. The six headline numbers are `COCOeval.stats[0:6]` in percent.
pycocotools marks "no ground truth in this setting" (e.g. AP_small on a set with no small objects) as -1;
we report that as NaN, never as -100.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vfm.dist import all_reduce_sum

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
ADE20K_NUM_CLASSES = 150
COCO_STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")  # COCOeval.stats[0:6], maxDets=100
IOU_TYPES = ("bbox", "segm")


# ---- semantic segmentation ---------------------------------------------------------------------------------


def ade20k_target(mask: torch.Tensor) -> torch.Tensor:
    """An official ADE20K (ADEChallengeData2016) annotation PNG as a training/eval target: LongTensor, same shape.

    The PNGs use 0 for "other" (not one of the 150 classes) and 1..150 for the classes. mmseg loads them with
    `reduce_zero_label=True` (open-mmlab/mmsegmentation mmseg/datasets/transforms/loading.py, LoadAnnotations):
    0 becomes 255 (ignored) and k becomes k - 1, so the classes are 0..149.
    """
    if mask.dtype.is_floating_point or mask.dtype == torch.bool or mask.is_complex():
        raise ValueError(f"ade20k_target: mask must be an integer tensor (the PNG's uint8 values), got {mask.dtype}")
    out = mask.to(torch.int64)  # before subtracting: uint8 0 - 1 would wrap to 255
    if out.numel() and (out.min() < 0 or out.max() > ADE20K_NUM_CLASSES):
        raise ValueError(f"ade20k_target: values must lie in [0, {ADE20K_NUM_CLASSES}] (0 = other, 1..150 = classes), "
                         f"got range [{out.min().item()}, {out.max().item()}]; is this an ADEChallengeData2016 "
                         "annotation PNG, not an image or an already-converted target?")
    return torch.where(out == 0, torch.full_like(out, IGNORE_INDEX), out - 1)


class SegmentationMeter:
    """Accumulates a confusion matrix over `update` calls; `compute()` gives mIoU, aAcc and mAcc in percent.

    Distributed: every rank updates with its own disjoint images, then calls `all_reduce()` once (all ranks
    together) before `compute()`. A second `all_reduce()`, or an `update()` after it, would double count or mix
    local with global counts, so both raise; `reset()` starts over.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"SegmentationMeter: num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"SegmentationMeter: ignore_index {ignore_index} is a class id (num_classes="
                             f"{num_classes}); use a value outside [0, {num_classes}), e.g. 255")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._reduced = False

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._reduced = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: `pred` and `target` are class ids of the same shape, [N, H, W] or [H, W]."""
        if self._reduced:
            raise RuntimeError("SegmentationMeter: update() after all_reduce() would mix this rank's counts with the "
                               "global ones; call reset() to start a new evaluation")
        for name, t in (("pred", pred), ("target", target)):
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
                raise ValueError(f"SegmentationMeter: {name} must hold integer class ids, got {t.dtype}; for logits "
                                 "[N, C, H, W] pass logits.argmax(1)")
        if pred.shape != target.shape:
            raise ValueError(f"SegmentationMeter: pred shape {tuple(pred.shape)} != target shape "
                             f"{tuple(target.shape)}; pass class ids (logits.argmax(1)) resized to the target's size")
        if target.ndim not in (2, 3):
            raise ValueError(f"SegmentationMeter: expected [N, H, W] or [H, W] masks, got shape {tuple(target.shape)}")
        pred = pred.to(target.device, torch.int64).flatten()
        target = target.to(torch.int64).flatten()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return  # every pixel ignored: nothing to count
        bad = (target < 0) | (target >= self.num_classes)
        if bad.any():
            raise ValueError(f"SegmentationMeter: target value {target[bad][0].item()} is neither a class id in "
                             f"[0, {self.num_classes}) nor ignore_index {self.ignore_index}; map the dataset's labels "
                             "first (e.g. ade20k_target for ADE20K PNGs) or fix num_classes / ignore_index")
        bad = (pred < 0) | (pred >= self.num_classes)
        if bad.any():
            raise ValueError(f"SegmentationMeter: predicted class {pred[bad][0].item()} is outside "
                             f"[0, {self.num_classes}); the model's head must have num_classes={self.num_classes} "
                             "outputs")
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
        if self.confusion.device != counts.device:
            self.confusion = self.confusion.to(counts.device)
        self.confusion += counts.view(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        """Sum the confusion matrix over ranks (a no-op without torch.distributed). Call once, on every rank."""
        if self._reduced:
            raise RuntimeError("SegmentationMeter: all_reduce() was already called; a second one double counts")
        self.confusion = all_reduce_sum(self.confusion)
        self._reduced = True

    def compute(self) -> dict[str, Any]:
        """{"miou", "pixel_acc", "macc"} in percent, and "per_class_iou": list of percent (NaN = class absent)."""
        conf = self.confusion.to("cpu", torch.float64)
        total = conf.sum()
        if total == 0:
            raise ValueError("SegmentationMeter: no labelled pixels were evaluated (no update(), or every target pixel "
                             f"was ignore_index {self.ignore_index})")
        intersect = conf.diagonal()
        area_label, area_pred = conf.sum(1), conf.sum(0)
        union = area_label + area_pred - intersect
        iou = intersect / union  # 0/0 = NaN: absent from both prediction and ground truth (mmseg's convention)
        acc = intersect / area_label  # 0/0 = NaN: absent from the ground truth
        return {
            "miou": 100.0 * torch.nanmean(iou).item(),
            "pixel_acc": 100.0 * (intersect.sum() / total).item(),
            "macc": 100.0 * torch.nanmean(acc).item(),
            "per_class_iou": (100.0 * iou).tolist(),
        }


# ---- COCO detection ----------------------------------------------------------------------------------------


def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Binary instance masks [N, H, W] as COCO compressed RLEs ({"size": [H, W], "counts": str}), JSON-ready.

    pycocotools.mask.encode wants a Fortran-ordered uint8 [H, W, N] array and returns `counts` as bytes; they
    are decoded to str as in open-mmlab/mmdetection mmdet/evaluation/metrics/coco_metric.py (results2json).
    """
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks_to_rle: expected a BoolTensor [N, H, W], got {masks.dtype} of shape "
                         f"{tuple(masks.shape)}; threshold soft masks first (e.g. masks > 0.5)")
    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
        rle["size"] = [int(s) for s in rle["size"]]
    return rles


def _require(obj: dict[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"coco_ap: {what} lacks {missing}; see the COCO format (cocodataset.org/#format-data)")


def _check_ground_truth(gt: dict[str, Any], iou_type: str) -> None:
    if not isinstance(gt, dict):
        raise ValueError(f"coco_ap: gt must be a COCO instances_*.json dict, got {type(gt).__name__}")
    _require(gt, ("images", "annotations", "categories"), "the ground truth")
    # COCOeval reads area (the area ranges) and iscrowd (crowd regions are matched but never count) of every
    # ground-truth object, and segm evaluation reads its segmentation
    needed = ("id", "image_id", "category_id", "bbox", "area", "iscrowd") + (("segmentation",)
                                                                             if iou_type == "segm" else ())
    for i, ann in enumerate(gt["annotations"]):
        _require(ann, needed, f"ground-truth annotation #{i} (id {ann.get('id')!r})")


def _check_detections(detections: list[dict[str, Any]], gt: dict[str, Any], iou_type: str) -> None:
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    needed = ("image_id", "category_id", "score") + (("bbox",) if iou_type == "bbox" else ("segmentation",))
    for i, det in enumerate(detections):
        _require(det, needed, f"detection #{i}")
        if det["image_id"] not in image_ids:
            raise ValueError(f"coco_ap: detection #{i} has image_id {det['image_id']!r}, which is not an image of the "
                             "ground truth; evaluate against the annotation file the images came from")
        if det["category_id"] not in category_ids:
            raise ValueError(f"coco_ap: detection #{i} has category_id {det['category_id']!r}, which is not a "
                             "ground-truth category (COCO ids are sparse, 1..90: map contiguous label indices back "
                             "through the categories list)")
        if iou_type == "bbox" and len(det["bbox"]) != 4:
            raise ValueError(f"coco_ap: detection #{i} bbox must be [x, y, w, h], got {det['bbox']!r}")


def coco_ap(gt: dict[str, Any], detections: list[dict[str, Any]], iou_type: str = "bbox") -> dict[str, float]:
    """COCO AP (IoU 0.50:0.95), AP50, AP75 and AP for small/medium/large objects, in percent, by pycocotools.

    `gt` is an instances_*.json dict (images, annotations, categories); `detections` are in COCO results format
    (image_id, category_id, score, and bbox [x, y, w, h] or, for iou_type="segm", a compressed RLE
    `segmentation`, see `masks_to_rle`). Neither is modified. A setting without ground truth is NaN.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"coco_ap: iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    _check_ground_truth(gt, iou_type)
    _check_detections(detections, gt, iou_type)
    # pycocotools writes into both: loadRes adds id/area/iscrowd to results, COCOeval sets `ignore` on ground
    # truth and turns segm ground truth into RLE in place
    gt = copy.deepcopy(gt)
    detections = copy.deepcopy(detections)
    if iou_type == "segm":
        # With a bbox present, loadRes takes the box area as the instance area, which shifts AP_small/medium/large;
        # mmdet drops it for the same reason (mmdet/evaluation/metrics/coco_metric.py, compute_metrics)
        for det in detections:
            det.pop("bbox", None)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # pycocotools prints progress and the summary table
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:
            # loadRes indexes anns[0] and fails on an empty list; an empty result set is what it would have built,
            # and COCOeval scores it 0 wherever there is ground truth
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("pycocotools %s evaluation:\n%s", iou_type, printed.getvalue())
    stats = [float(s) for s in evaluator.stats[: len(COCO_STATS)]]
    return {name: (math.nan if s < 0 else 100.0 * s) for name, s in zip(COCO_STATS, stats, strict=True)}


# ---- evaluation of a downstream export on its val manifest ---------------------------------------------------


def _eval_loader(manifest: Any, sample_fn: Any, *, batch_size: int, num_workers: int):
    """Every val sample to exactly one rank, in stored order (vfm.data.loader, drop_last=False)."""
    from vfm.data.dense_transforms import collate_list
    from vfm.data.loader import build_loader
    from vfm.dist import rank_and_world

    rank, world = rank_and_world()
    return build_loader(manifest, transform=None, batch_size=batch_size, rank=rank, world_size=world, seed=0,
                        shuffle=False, drop_last=False, num_workers=num_workers, collate_fn=collate_list,
                        sample_fn=sample_fn)


def _progress(loader: Any, what: str):
    from rich.progress import track

    from vfm.dist import rank_and_world

    rank, _ = rank_and_world()
    return track(loader, description=what, total=len(loader), disable=rank != 0)


@torch.no_grad()
def segment(model: torch.nn.Module, image: torch.Tensor, spec: Any, normalize: Any) -> torch.Tensor:
    """Class ids (H x W) of one uint8 image at its own size: mmseg's test pipeline (open-mmlab/mmsegmentation
    configs/_base_/datasets/ade20k.py `test_pipeline`): the image rescaled to a short side of the crop, sliding
    windows (`spec.slide`), the logits resized back to the image; without `slide`, the image squashed to
    `spec.resolution` and the logits resized back."""
    import torch.nn.functional as F
    import torchvision.transforms.v2.functional as TF

    from vfm.dense.models import slide_inference

    h, w = image.shape[-2:]
    if spec.slide is not None:
        crop, stride = spec.slide
        x = TF.resize(image, [crop], antialias=True)  # short side to the crop (mmseg's keep-ratio (2048, 512))
        logits = slide_inference(model, normalize(x[None]), spec.num_classes, crop, stride)
    else:
        x = TF.resize(image, [spec.resolution, spec.resolution], antialias=True)
        logits = model(normalize(x[None]))
    return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)


def evaluate_segmentation(model: torch.nn.Module, spec: Any, manifest: Any, *, device: torch.device,
                          normalize: Any, num_workers: int = 0,
                          autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """mIoU, aAcc and mAcc (percent) of a segmentation export over every sample of `manifest` (all ranks)."""
    from vfm.data.dense_transforms import seg_eval_sample

    if manifest.task != "semantic_segmentation":
        raise ValueError(f"{manifest.location}: holds {manifest.task} samples; shard the ADE20K val split with "
                         "`vfm shard ade20k --split val`")
    meter = SegmentationMeter(spec.num_classes)
    seen = 0
    model.eval()
    # one image a step: each is slid over at its own size
    for images, targets in _progress(_eval_loader(manifest, seg_eval_sample, batch_size=1,
                                                  num_workers=num_workers), "eval segmentation"):
        for image, target in zip(images, targets, strict=True):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                pred = segment(model, image.to(device), spec, normalize)
            meter.update(pred.cpu(), target)
            seen += 1
    _check_all_seen(seen, manifest)
    meter.all_reduce()
    got = meter.compute()
    return {"miou": got["miou"], "pixel_acc": got["pixel_acc"], "macc": got["macc"]}


def _check_all_seen(seen: int, manifest: Any) -> None:
    from vfm.dist import all_reduce_sum

    total = int(all_reduce_sum(torch.tensor([seen], dtype=torch.int64))[0])
    if total != manifest.num_samples:
        raise ValueError(f"evaluated {total} samples but {manifest.location} lists {manifest.num_samples}")


def coco_ground_truth(records: list[dict[str, Any]], categories: list[dict[str, Any]]) -> dict[str, Any]:
    """An instances_*.json dict from the per-image records `vfm shard coco2017` stored."""
    images = [{"id": r["image_id"], "width": r["width"], "height": r["height"]} for r in records]
    annotations, next_id = [], 1
    for r in records:
        for a in r["annotations"]:
            ann = {**a, "image_id": r["image_id"]}
            if "id" not in ann:
                ann["id"] = next_id
            if "area" not in ann:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            ann.setdefault("iscrowd", 0)
            next_id = max(next_id, int(ann["id"])) + 1
            annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}


@torch.no_grad()
def detect(model: torch.nn.Module, images: list[torch.Tensor], records: list[dict[str, Any]], spec: Any,
           device: torch.device) -> list[dict[str, Any]]:
    """COCO results (bbox, and segmentation RLE for Mask R-CNN) of uint8 images at their stored size: torchvision's
    transform fits each to the detector's size and maps its boxes and masks back to the image."""
    outputs = model([im.to(device).float().div_(255) for im in images])
    results = []
    for out, rec in zip(outputs, records, strict=True):
        boxes = out["boxes"].float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        cats = [spec.categories[int(label) - 1]["id"] for label in out["labels"].tolist()]
        scores = out["scores"].float().cpu().tolist()
        rles = masks_to_rle(out["masks"][:, 0].cpu() > 0.5) if "masks" in out else [None] * len(scores)
        for box, cat, score, rle in zip(xywh, cats, scores, rles, strict=True):
            det = {"image_id": rec["image_id"], "category_id": cat, "bbox": [round(v, 2) for v in box],
                   "score": round(score, 5)}
            if rle is not None:
                det["segmentation"] = rle
            results.append(det)
    return results


def evaluate_detection(model: torch.nn.Module, spec: Any, manifest: Any, *, device: torch.device,
                       batch_size: int = 1, num_workers: int = 0,
                       autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Box AP (and mask AP for Mask R-CNN), AP50, AP75 and AP by object size in percent over every sample of
    `manifest` (a size range the val set has no objects of is left out): each rank detects its share, rank 0
    scores all of them with pycocotools, every rank returns the same numbers."""
    from vfm.data.dense_transforms import det_eval_sample
    from vfm.dist import all_gather_objects, broadcast_object, rank_and_world

    if manifest.task != "object_detection":
        raise ValueError(f"{manifest.location}: holds {manifest.task} samples; shard the COCO val split with "
                         "`vfm shard coco2017 --split val`")
    records: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    model.eval()
    for images, recs in _progress(_eval_loader(manifest, det_eval_sample, batch_size=batch_size,
                                               num_workers=num_workers), "eval detection"):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            detections += detect(model, images, recs, spec, device)
        records += recs
    _check_all_seen(len(records), manifest)
    all_records = [r for part in all_gather_objects(records) for r in part]
    all_detections = [d for part in all_gather_objects(detections) for d in part]
    metrics: dict[str, float] = {}
    rank, _ = rank_and_world()
    if rank == 0:
        gt = coco_ground_truth(all_records, spec.categories)
        kinds = [("box", "bbox")] + ([("mask", "segm")] if spec.head == "mask_rcnn" else [])
        for name, iou_type in kinds:
            got = coco_ap(gt, all_detections, iou_type)
            # a size range without ground truth (NaN) is left out: pipelines pass results as JSON, which has no NaN
            metrics.update({f"{name}_{k}": v for k, v in got.items() if not math.isnan(v)})
        metrics["detections"] = float(len(all_detections))
    return broadcast_object(metrics)
