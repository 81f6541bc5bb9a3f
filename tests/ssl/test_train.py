"""DINOv2 pretraining end to end on 2 CPU ranks (gloo) through `vfm train` and the shared loop.

Learning test, and why its no-collapse threshold is what it is:
DINO collapses in one of two ways — every image gets the same uniform target, or the same peaked one.
In both, the teacher's targets do not depend on the image, so the mutual information between a crop
and its prototype, I = H(mean target) − mean H(target), is exactly 0 (`teacher_mi`, in units of
log K). Its ceiling on one rank's micro-batch is log(40 crops)/log(256 prototypes) ≈ 0.67. We require
I ≥ 0.03 at the end, far above the 0 of either collapse and above the 0.00 a fresh model gives
(measured: 0.015–0.03 in the first steps, 0.06–0.09 after 24 updates), and the spread of the
teacher's L2-normalised CLS features, sqrt(1 − ||mean||²) (0 when all images share one feature, 1
when spread evenly over the sphere), ≥ 0.3 (measured: 0.2 at the start, ~0.9 after 24 updates).

The smoke run overrides two things of the paper recipe so that 24 updates can show this: the
teacher momentum starts at 0.9 instead of 0.996 (at 0.996 the teacher moves < 10% of the way to the
student in 24 updates), and LayerScale starts at 0.1 instead of 1e-5 (with 1e-5 and depth 2 the
blocks add almost nothing at first, so the CLS token is the same for every image and the targets
are uniform for the whole short run: measured I = 0.000 for 30 updates).
"""

from __future__ import annotations

import torch

from tests.helpers.shards import make_shards
from tests.helpers.training import ssl_pretrain
from vfm.export import load_export


def _history(uri: str, recipe: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"vfm/{recipe}")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_smoke_pretraining_learns_without_collapse(tmp_path, mlflow_uri):
    data = make_shards(tmp_path / "train", num_classes=4, per_class=16, seed=0)
    knn_train = make_shards(tmp_path / "knn_train", num_classes=4, per_class=16, seed=1)
    knn_val = make_shards(tmp_path / "knn_val", num_classes=4, per_class=8, seed=2)
    recipe = "meta-dinov2-giant"  # FSDP2, 10 global + 2 local crops, Sinkhorn-Knopp, linear momentum
    ssl_pretrain(recipe, data, tmp_path / "run", "--knn-train", knn_train, "--knn-val", knn_val,
          "--set", "stages.pretrain.steps=24", "--set", "ssl.momentum_start=0.9",
          "--set", "model.kwargs.init_values=0.1", env={"MLFLOW_TRACKING_URI": mlflow_uri})

    dino = _history(mlflow_uri, recipe, "train/dino_loss")
    assert len(dino) == 24
    assert sum(dino[-5:]) / 5 < sum(dino[:5]) / 5 - 0.5, dino
    mi, spread = _history(mlflow_uri, recipe, "train/teacher_mi"), _history(mlflow_uri, recipe, "train/teacher_spread")
    assert min(mi[-5:]) >= 0.03, mi
    assert min(spread[-5:]) >= 0.3, spread
    # the teacher's k-NN every eval.knn_every_steps (6 in the smoke profile) is in MLflow
    knn = _history(mlflow_uri, recipe, "knn/k10.top1")
    assert len(knn) == 4
    assert knn[-1] >= 50.0, knn  # 4 classes: chance is 25%
    momentum = _history(mlflow_uri, recipe, "train/teacher_momentum")
    assert momentum[0] == 0.9 and momentum[-1] > momentum[0]

    model, meta = load_export(tmp_path / "run" / "export")
    assert meta.num_classes == 0 and meta.resolution == 32 and meta.extra["ssl"] == "dinov2-teacher"
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True)
    assert feats.shape == (2, 96)


def test_resume_is_exact_ddp_centering(tmp_path):
    """seed 004 layout (2 global + 8 local crops, cosine momentum) on DDP with EMA centering:
    killed after a checkpoint and restarted, the exported teacher is bit-identical to an uninterrupted run."""
    data = make_shards(tmp_path / "train", num_classes=4, per_class=16, seed=0)
    sets = ["--set", "stages.pretrain.steps=4", "--set", "stages.pretrain.checkpoint_every_steps=2",
            "--set", "stages.pretrain.parallelism=ddp", "--set", "ssl.centering=centering", "--deterministic"]
    ssl_pretrain("dinov2-giant", data, tmp_path / "full", *sets)
    ssl_pretrain("dinov2-giant", data, tmp_path / "cut", *sets, "--max-steps", "2")
    resumed = ssl_pretrain("dinov2-giant", data, tmp_path / "cut", *sets)
    assert "resumed from" in resumed.stderr + resumed.stdout
    full = torch.load(tmp_path / "full" / "export" / "weights.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "export" / "weights.pt", weights_only=True)
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), k
