"""Paper 001's downstream stages end to end on data made here in the official layouts: the synthetic ADE20K zip and
COCO zips are sharded by `vfm shard`'s code, a pretraining export is fine-tuned by the trainer process
(`python -m vfm.trainer --stage ade20k|coco`, the command a PyTorchJob replica runs), and the export is evaluated
by `vfm evaluate`'s suites (mIoU; pycocotools' AP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vfm.data.dense_synthetic import write_ade20k_zip, write_coco_zips
from vfm.data.manifest import Manifest
from vfm.data.shard import write_dataset
from vfm.data.sources import index_source
from vfm.evaluate.suite import EvalError, evaluate

IMAGE_SIZE = 96  # the smoke stages train on 64 px crops and slide 64 px windows over these


def _trainer(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "AWS_ENDPOINT"))}
    out = subprocess.run([sys.executable, "-m", "vfm.trainer", "vit-huge-pretrain", "--profile", "smoke", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Sharded train/val splits of both sets and a pretraining export of the smoke recipe's ViT."""
    from vfm.export import ExportMeta, save_export
    from vfm.models import build_model, model_kwargs
    from vfm.recipes import load_recipe

    root = tmp_path_factory.mktemp("dense")
    write_ade20k_zip(root / "ADEChallengeData2016.zip", 48, 8, size=IMAGE_SIZE, seed=0)
    coco = write_coco_zips(root / "coco", 48, 8, size=IMAGE_SIZE, seed=0)
    out = {}
    for split in ("train", "val"):
        index = index_source("ade20k", str(root / "ADEChallengeData2016.zip"), split=split)
        out[f"ade20k_{split}"] = write_dataset(index, str(root / f"ade-{split}"), split=split).manifest.location
        index = index_source("coco2017", str(coco[f"{split}2017"]), labels=str(coco["annotations"]), split=split)
        out[f"coco_{split}"] = write_dataset(index, str(root / f"coco-{split}"), split=split).manifest.location
    recipe = load_recipe("vit-huge-pretrain", [], "smoke")
    torch.manual_seed(0)
    kwargs = model_kwargs(recipe, "pretrain", num_classes=10)
    kwargs.pop("num_classes"), kwargs.pop("drop_path_rate")
    out["pretrain"] = save_export(build_model(recipe, "pretrain", num_classes=10),
                                  ExportMeta(timm_name=recipe.model.timm_name, kwargs=kwargs, num_classes=10,
                                             recipe_id=recipe.id, stage="pretrain", resolution=32),
                                  root / "pretrain-export")
    out["root"] = str(root)
    return out


def _majority_miou(train: str, val: str) -> float:
    """mIoU of predicting the most frequent training class everywhere: the chance level the test beats."""
    from vfm.data.dense_transforms import seg_eval_sample
    from vfm.data.loader import slot_stream
    from vfm.evaluate.dense import SegmentationMeter

    def targets(url: str):
        m = Manifest.load(url)
        for s in slot_stream(m, slot=0, num_slots=1, seed=0, shuffle=False, shuffle_buffer=0, start=0, repeat=False):
            yield seg_eval_sample(s)[1]

    counts = torch.zeros(256, dtype=torch.int64)
    for t in targets(train):
        counts += torch.bincount(t.flatten(), minlength=256)
    counts[255] = 0
    majority = int(counts.argmax())
    meter = SegmentationMeter(150)
    for t in targets(val):
        meter.update(torch.full_like(t, majority), t)
    return meter.compute()["miou"]


def test_segmentation_stage_learns_above_the_majority_class_and_the_linear_probe_keeps_its_backbone(world):
    out = Path(world["root"]) / "run-ade20k"
    _trainer("--stage", "ade20k", "--data", world["ade20k_train"], "--init", world["pretrain"], "--out", str(out))
    metrics = evaluate(str(out / "export"), ["ade20k"], {"ade20k": world["ade20k_val"]})
    chance = _majority_miou(world["ade20k_train"], world["ade20k_val"])
    # stated threshold: after the smoke schedule (40 updates from a random backbone) mIoU is at least 1.5 times, and
    # 10 points above, the majority-class predictor's (measured: 39.6 against 21.9)
    assert metrics["eval.ade20k.miou"] >= max(1.5 * chance, chance + 10), (metrics, chance)
    assert 0 < metrics["eval.ade20k.miou"] <= metrics["eval.ade20k.pixel_acc"] <= 100

    linear = Path(world["root"]) / "run-ade20k-linear"
    _trainer("--stage", "ade20k_linear", "--data", world["ade20k_train"], "--init", world["pretrain"], "--out",
             str(linear))
    from vfm.dense.build import load_dense_export
    from vfm.export import load_export

    model, meta, spec = load_dense_export(str(linear / "export"))
    assert spec.freeze_backbone and spec.head == "linear" and meta.stage == "ade20k_linear"
    pre, _ = load_export(world["pretrain"])
    # the frozen protocol: the backbone's blocks are the pretraining export's, bit for bit
    got = model.features.vit.blocks.state_dict()
    want = pre.blocks.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    lin = evaluate(str(linear / "export"), ["ade20k"], {"ade20k": world["ade20k_val"]})
    assert set(lin) == {"eval.ade20k_linear.miou", "eval.ade20k_linear.pixel_acc", "eval.ade20k_linear.macc"}


def test_detection_stage_finds_the_shapes(world):
    out = Path(world["root"]) / "run-coco"
    _trainer("--stage", "coco", "--data", world["coco_train"], "--init", world["pretrain"], "--out", str(out))
    metrics = evaluate(str(out / "export"), ["coco"], {"coco": world["coco_val"]})
    # stated threshold: after the smoke schedule (40 updates from a random backbone) box AP50 is at least 1 point,
    # where a detector that finds nothing scores 0
    assert metrics["eval.coco.box_ap50"] >= 1.0, metrics
    assert metrics["eval.coco.detections"] > 0
    assert {"eval.coco.box_ap", "eval.coco.box_ap75", "eval.coco.mask_ap", "eval.coco.mask_ap50"} <= set(metrics)


def test_the_suites_refuse_an_export_that_does_not_fit(world):
    with pytest.raises(EvalError, match="no dense head"):
        evaluate(world["pretrain"], ["ade20k"], {"ade20k": world["ade20k_val"]})
    with pytest.raises(EvalError, match="separate runs"):
        evaluate(world["pretrain"], ["ade20k", "in1k"], {"ade20k": world["ade20k_val"], "in1k": world["ade20k_val"]})


def test_a_downstream_stage_needs_the_pretraining_export_and_its_own_kind_of_data(world, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "AWS_ENDPOINT"))}
    base = [sys.executable, "-m", "vfm.trainer", "vit-huge-pretrain", "--profile", "smoke", "--out", str(tmp_path)]
    no_init = subprocess.run([*base, "--stage", "ade20k", "--data", world["ade20k_train"]], capture_output=True,
                             text=True, env=env, timeout=300)
    assert no_init.returncode == 2 and "--init" in no_init.stderr
    wrong = subprocess.run([*base, "--stage", "ade20k", "--data", world["coco_train"], "--init", world["pretrain"]],
                           capture_output=True, text=True, env=env, timeout=300)
    assert wrong.returncode == 2 and "object_detection samples" in wrong.stderr
