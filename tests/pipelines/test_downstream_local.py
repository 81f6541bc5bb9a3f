"""Paper 001's pipeline end to end on this machine: `vfm pipeline run vit-huge-pretrain --local` pretrains on the
digits, shards the synthetic ADE20K and COCO releases (official layouts), trains every downstream stage from the
pretraining export as jobs through the launcher's local backend, evaluates each on its val split, and reports
mIoU and box/mask AP per seed and as mean ± std on the MLflow parent run. VFM_SCALE=reduced (CI) runs one seed per
downstream stage instead of the smoke profile's two, one epoch of pretraining and 10 updates a downstream stage: the
plumbing, while tests/dense/test_dense_stages.py holds the learning to its thresholds."""

from __future__ import annotations

import math
import os

import pytest
from mlflow.tracking import MlflowClient

from vfm.pipeline.local import run_local

FULL = os.environ.get("VFM_SCALE", "reduced") == "full"
STAGES = ("ade20k", "ade20k_linear", "coco")
SEEDS = [0, 1] if FULL else [0]


@pytest.mark.scale
def test_vit_huge_pretrain_transfers_to_ade20k_and_coco_and_reports_them(services, tmp_path):
    # reduced: the frozen linear protocol (trained in tests/dense) is left out, `seeds=[]` gives it no runs
    overrides = [] if FULL else ["stages.pretrain.epochs=1", "downstream.ade20k_linear.seeds=[]",
                                 *(f"downstream.{s}.{k}" for s in STAGES[::2] for k in ("seeds=[0]", "steps=10"))]
    stages = STAGES if FULL else STAGES[::2]
    result = run_local("vit-huge-pretrain", workdir=tmp_path, profile="smoke", overrides=overrides)
    assert result.state == "FINISHED", result.log_path.read_text()[-4000:]
    client = MlflowClient(tracking_uri=services.mlflow_uri)
    metrics = client.get_run(result.parent_run_id).data.metrics
    for stage in stages:
        assert metrics[f"eval.{stage}.num_seeds"] == len(SEEDS), sorted(metrics)
    for name in ("eval.ade20k.miou", "eval.ade20k.pixel_acc", "eval.coco.box_ap", "eval.coco.box_ap50",
                 "eval.coco.mask_ap", "eval.knn.k20.top1", *(["eval.ade20k_linear.miou"] if FULL else [])):
        assert name in metrics and math.isfinite(metrics[name]), (name, sorted(metrics))
    assert metrics["eval.ade20k.miou"] > 0
    if FULL:
        assert metrics["eval.coco.detections"] > 0
        assert "eval.ade20k.miou.std" in metrics and "eval.coco.box_ap.std" in metrics
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    trained = sorted((r.data.tags["vfm.stage"], int(r.data.tags["vfm.seed"])) for r in runs
                     if r.data.tags.get("vfm.stage") in STAGES)
    assert trained == sorted((s, seed) for s in stages for seed in SEEDS), trained
    evals = [r for r in runs if r.data.tags.get("vfm.suite") in ("ade20k", "coco")]
    assert len(evals) == len(stages) * len(SEEDS)
    # each seed's own numbers are on its evaluation run; the parent holds their mean
    ade = [r.data.metrics["eval.ade20k.miou"] for r in evals if "eval.ade20k.miou" in r.data.metrics]
    assert len(ade) == len(SEEDS) and metrics["eval.ade20k.miou"] == pytest.approx(sum(ade) / len(ade))
    assert "ade20k" in result.report and "coco" in result.report
