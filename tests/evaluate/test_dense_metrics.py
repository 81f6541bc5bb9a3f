"""Known-answer tests for the dense-transfer metrics: mIoU / aAcc / mAcc pinned against torchmetrics and by
hand, ADE20K's label mapping, and COCO AP through pycocotools on constructed ground truth with answers derived
from COCO's 101-point interpolated precision. Imports stay light because the spawned gloo ranks re-import this
module (torchmetrics is imported inside its one test)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from vfm.evaluate.dense import SegmentationMeter, ade20k_target, coco_ap, masks_to_rle

# ---- semantic segmentation -----------------------------------------------------------------------------------


def _random_batch(gen: torch.Generator, num_classes: int, shape=(2, 24, 24)) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.randint(0, num_classes, shape, generator=gen)
    pred = torch.where(torch.rand(shape, generator=gen) < 0.6, target, torch.randint(0, num_classes, shape,
                                                                                      generator=gen))
    target[torch.rand(shape, generator=gen) < 0.1] = 255  # ignored pixels, with arbitrary predictions under them
    return pred, target


def test_miou_and_pixel_acc_match_torchmetrics_over_several_updates():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    num_classes = 7
    gen = torch.Generator().manual_seed(0)
    batches = [_random_batch(gen, num_classes) for _ in range(3)]
    batches.append(tuple(t[0] for t in _random_batch(gen, num_classes)))  # an [H, W] pair accumulates too
    meter = SegmentationMeter(num_classes)
    jaccard = MulticlassJaccardIndex(num_classes, ignore_index=255, average=None)
    accuracy = MulticlassAccuracy(num_classes, ignore_index=255, average="micro")
    for pred, target in batches:
        meter.update(pred, target)
        jaccard.update(pred, target)
        accuracy.update(pred, target)
    targets = torch.cat([t.flatten() for _, t in batches])
    labelled = targets[targets != 255]
    # torchmetrics scores a class absent from both sides 0 where mmseg leaves it out: make every class appear
    assert set(labelled.tolist()) == set(range(num_classes)) and labelled.numel() < targets.numel()
    assert int(meter.confusion.sum()) == labelled.numel() and meter.confusion.dtype == torch.int64

    got = meter.compute()
    expected_iou = 100.0 * jaccard.compute().double()
    torch.testing.assert_close(torch.tensor(got["per_class_iou"], dtype=torch.float64), expected_iou,
                               atol=1e-4, rtol=0)
    assert got["miou"] == pytest.approx(expected_iou.mean().item(), abs=1e-4)
    assert got["pixel_acc"] == pytest.approx(100.0 * accuracy.compute().item(), abs=1e-4)


def test_hand_computed_2x3_case():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])  # the 0 under the ignored pixel never counts
    meter = SegmentationMeter(3)
    meter.update(pred, target)
    # class 0: ∩1 ∪2 → 1/2; class 1: ∩2 ∪3 → 2/3; class 2: ∩1 ∪1 → 1. Accuracy per class: 1/2, 1, 1.
    assert meter.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    got = meter.compute()
    assert got["miou"] == pytest.approx(100 * 13 / 18)
    assert got["per_class_iou"] == pytest.approx([50.0, 200 / 3, 100.0])
    assert got["pixel_acc"] == pytest.approx(80.0)  # 4 of 5 labelled pixels
    assert got["macc"] == pytest.approx(100 * 2.5 / 3)


def test_absent_class_is_excluded_but_a_false_positive_class_counts():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    meter = SegmentationMeter(4)  # class 3 is in neither prediction nor ground truth
    meter.update(pred, target)
    got = meter.compute()
    assert math.isnan(got["per_class_iou"][3])
    assert got["miou"] == pytest.approx(100 * 13 / 18)
    assert got["macc"] == pytest.approx(100 * 2.5 / 3)

    meter = SegmentationMeter(4)
    meter.update(torch.tensor([[0, 3], [1, 1]]), torch.tensor([[0, 0], [1, 1]]))  # 3 predicted, never true
    got = meter.compute()
    assert got["per_class_iou"][3] == 0.0 and math.isnan(got["per_class_iou"][2])
    assert got["miou"] == pytest.approx((50.0 + 100.0 + 0.0) / 3)  # IoU 0 of class 3 counts (mmseg)
    assert got["macc"] == pytest.approx((50.0 + 100.0) / 2)  # its accuracy is NaN: no ground truth


def test_bad_inputs_raise_with_the_value_named():
    meter = SegmentationMeter(3)
    with pytest.raises(ValueError, match=r"target value 7 .*ade20k_target"):
        meter.update(torch.zeros(2, 2, dtype=torch.int64), torch.tensor([[0, 7], [1, 255]]))
    with pytest.raises(ValueError, match=r"target value -1"):
        meter.update(torch.zeros(2, 2, dtype=torch.int64), torch.tensor([[0, -1], [1, 255]]))
    with pytest.raises(ValueError, match=r"predicted class 3"):
        meter.update(torch.full((2, 2), 3), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"pred shape \(2, 3, 4, 4\) != target shape \(2, 4, 4\)"):
        meter.update(torch.zeros(2, 3, 4, 4, dtype=torch.int64), torch.zeros(2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="argmax"):
        meter.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="ignore_index 1 is a class id"):
        SegmentationMeter(3, ignore_index=1)
    with pytest.raises(ValueError, match="no labelled pixels"):
        meter.compute()  # nothing was counted by the failed updates
    meter.update(torch.zeros(2, 2, dtype=torch.int64), torch.full((2, 2), 255))
    with pytest.raises(ValueError, match="no labelled pixels"):
        meter.compute()


def test_all_reduce_is_a_no_op_without_a_process_group_and_guards_double_counting():
    meter = SegmentationMeter(3)
    meter.update(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))
    before = meter.confusion.clone()
    meter.all_reduce()
    assert torch.equal(meter.confusion, before)
    with pytest.raises(RuntimeError, match="already called"):
        meter.all_reduce()
    with pytest.raises(RuntimeError, match="reset"):
        meter.update(torch.tensor([[0]]), torch.tensor([[0]]))
    meter.reset()
    assert int(meter.confusion.sum()) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(1)
        batches = [_random_batch(gen, 5) for _ in range(4)]
        meter = SegmentationMeter(5)
        for pred, target in batches[rank::2]:  # each rank its own disjoint images
            meter.update(pred, target)
        meter.all_reduce()
        out[rank] = meter.compute()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process():
    gen = torch.Generator().manual_seed(1)
    single = SegmentationMeter(5)
    for _ in range(4):
        single.update(*_random_batch(gen, 5))
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank, args=(_free_port(), out), nprocs=2)
    assert out[0] == out[1] == single.compute()


def test_ade20k_target_reduces_zero_label():
    mask = torch.tensor([[0, 1, 2], [149, 150, 0]], dtype=torch.uint8)
    target = ade20k_target(mask)
    assert target.dtype == torch.int64
    assert target.tolist() == [[255, 0, 1], [148, 149, 255]]
    meter = SegmentationMeter(150)
    meter.update(target, target)
    assert meter.compute()["pixel_acc"] == 100.0
    with pytest.raises(ValueError, match=r"\[0, 151\]|got range \[0, 151\]"):
        ade20k_target(torch.tensor([0, 151], dtype=torch.uint8))
    with pytest.raises(ValueError, match="integer"):
        ade20k_target(torch.zeros(2, 2))


# ---- COCO detection -----------------------------------------------------------------------------------------

# per image and category: one small (10x10), one medium (50x50) and one large (200x200) object, so every
# COCO area range has ground truth and each range's AP is defined. pycocotools' precision is
# tp / (tp + fp + np.spacing(1)): with a single true positive that is 1 - 2**-52, not 1 (perfect predictions
# then score 99.99999999999997); from two on it rounds to exactly 1.0, so every set below has at least two
# found objects per category and area range, and "perfect" is exactly 100.0.
SIZES = (10, 50, 200)
BOXES = [[5.0 + 220 * i, 5.0 + 10 * i, float(s), float(s)] for i, s in enumerate(SIZES)]


def _gt(num_images: int = 2, categories: tuple[int, ...] = (1, 3)) -> dict:
    images = [{"id": 10 + i, "width": 700, "height": 480, "file_name": f"{i}.jpg"} for i in range(num_images)]
    annotations = []
    for img in images:
        for cat in categories:
            for box in BOXES:
                annotations.append({"id": len(annotations) + 1, "image_id": img["id"], "category_id": cat,
                                    "bbox": list(box), "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}"} for c in categories]}


def _perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in gt["annotations"]]


def test_perfect_boxes_give_100_and_inputs_stay_untouched():
    gt = _gt()
    dets = _perfect(gt)
    gt_before, dets_before = repr(gt), repr(dets)
    got = coco_ap(gt, dets)
    assert got == {"ap": 100.0, "ap50": 100.0, "ap75": 100.0, "ap_small": 100.0, "ap_medium": 100.0,
                   "ap_large": 100.0}
    assert (repr(gt), repr(dets)) == (gt_before, dets_before)  # pycocotools writes into what it is given


def test_no_detections_give_zero_everywhere():
    assert coco_ap(_gt(), []) == dict.fromkeys(("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"), 0.0)


def test_half_found_with_no_false_positives_caps_recall_at_one_half():
    # Each category has 2 ground-truth objects per area range (one per image); the detector finds the one in the
    # first image, with a perfect box, and nothing else. Recall then rises to exactly 0.5 at precision 1, and
    # COCO's interpolated precision at the 101 recall thresholds 0, 0.01, ..., 1 is 1 for the 51 thresholds
    # <= 0.5 and 0 above: AP = 51/101 per category, IoU threshold and area range.
    gt = _gt()
    dets = [d for d in _perfect(gt) if d["image_id"] == 10]
    expected = 100 * 51 / 101
    got = coco_ap(gt, dets)
    assert got == pytest.approx(dict.fromkeys(got, expected), abs=1e-9)


def test_area_range_without_ground_truth_is_nan():
    gt = _gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] != 100.0]  # no small objects left
    got = coco_ap(gt, _perfect(gt))
    assert math.isnan(got["ap_small"])
    assert got["ap"] == got["ap_medium"] == got["ap_large"] == 100.0


def test_perfect_masks_give_100_segm_ap():
    h, w = 480, 700
    masks = torch.zeros(len(BOXES), h, w, dtype=torch.bool)
    for m, (x, y, bw, bh) in zip(masks, BOXES, strict=True):
        m[int(y) : int(y + bh), int(x) : int(x + bw)] = True
        m[int(y), int(x)] = False  # not a box: the mask itself is compared
    rles = masks_to_rle(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [h, w] for r in rles)
    gt = _gt(categories=(1,))
    for ann, rle, m in zip(gt["annotations"], rles * 2, torch.cat([masks, masks]), strict=True):
        ann["segmentation"], ann["area"] = dict(rle), float(m.sum())
    dets = [{"image_id": a["image_id"], "category_id": 1, "segmentation": dict(a["segmentation"]), "score": 1.0,
             "bbox": [0, 0, 1, 1]} for a in gt["annotations"]]  # a wrong bbox alongside must not matter for segm
    got = coco_ap(gt, dets, iou_type="segm")
    assert got == dict.fromkeys(got, 100.0) and len(got) == 6
    assert coco_ap(gt, [], iou_type="segm") == dict.fromkeys(got, 0.0)
    shifted = [dict(d, segmentation=r) for d, r in zip(dets, masks_to_rle(masks.roll(3, dims=2)) * 2, strict=True)]
    assert coco_ap(gt, shifted, iou_type="segm")["ap"] < 100.0
    assert masks_to_rle(torch.zeros(0, 4, 4, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match="masks > 0.5"):
        masks_to_rle(torch.zeros(1, 4, 4))


def test_bad_detections_raise_naming_the_problem():
    gt = _gt()
    dets = _perfect(gt)
    dets[3]["image_id"] = 999
    with pytest.raises(ValueError, match=r"detection #3 has image_id 999"):
        coco_ap(gt, dets)
    dets = _perfect(gt)
    dets[0]["category_id"] = 2
    with pytest.raises(ValueError, match=r"detection #0 has category_id 2"):
        coco_ap(gt, dets)
    dets = _perfect(gt)
    del dets[1]["score"]
    with pytest.raises(ValueError, match=r"detection #1 lacks \['score'\]"):
        coco_ap(gt, dets)
    with pytest.raises(ValueError, match=r"lacks \['segmentation'\]"):
        coco_ap(gt, [], iou_type="segm")  # box-only ground truth cannot be mask-evaluated
    with pytest.raises(ValueError, match="iou_type"):
        coco_ap(gt, [], iou_type="keypoints")
