"""`vfm pipeline run ID --local`: the recipe's whole KFP pipeline through `kfp.local` on this machine.

- S3 and MLflow: the configured ones (MLFLOW_TRACKING_URI + AWS_ENDPOINT_URL_S3), else the embedded
  pair on loopback (vfm.servers.embedded_services), exactly as the components talk to them in a cluster;
- data: a small learnable synthetic set (vfm.data.synthetic) unless `data_dir` already holds one,
  sharded by the pipeline's own shard steps into `s3://<bucket>/data`;
- training: the same PyTorchJob spec through the launcher's local backend (backend=local);
- kfp.local's SubprocessRunner with use_venv=False runs every lightweight component in this
  interpreter's environment (the components image's role).

KFP caching stays off when the services are embedded: a cache entry would point at objects of an S3
endpoint that no longer exists after this run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfm.errors import UserError

LOCAL_BUCKET = "vfm-local"
# all 200 ImageNet-R classes: IN-R is scored through its 200-class mask and needs a head that has them all
# (so do the in1k and k-NN suites' label alignment); the k-NN suite's largest k (200) needs ≥ 200 train images
SMOKE_CLASSES = 200
SMOKE_TRAIN_PER_CLASS, SMOKE_VAL_PER_CLASS = 2, 1
SMOKE_IMAGE_SIZE = 36
SMOKE_IMAGENET_C = ("gaussian_noise,contrast", "1,3")  # corruptions, severities (paper: 15 × 5)


@dataclass
class LocalRun:
    recipe_id: str
    state: str
    seconds: float
    mlflow_uri: str
    experiment_id: str | None = None
    parent_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    report: str = ""
    embedded_store: Path | None = None
    """The embedded MLflow's SQLite file (it outlives the run; the embedded S3 endpoint does not)."""

    @property
    def mlflow_url(self) -> str:
        if self.experiment_id and self.parent_run_id:
            return f"{self.mlflow_uri}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"
        return self.mlflow_uri


def smoke_sources(data_dir: Path) -> dict[str, tuple[str, str]]:
    """Role → (source path, shard layout) of the synthetic smoke data, made once under `data_dir`.

    Class folders are named after real ImageNet-R wnids (which are IN-1K wnids), so the same sets serve
    the folder-layout training data, IN-1K-style val/k-NN and the `imagenet-r` layout (IN-1K labels,
    200-class mask) without special cases in evaluation.
    """
    from vfm.data.classes import imagenet_r_wnids
    from vfm.data.synthetic import make_synthetic_folder, synthetic_wnid

    wnids = list(imagenet_r_wnids()[:SMOKE_CLASSES])
    sets = {"train": (SMOKE_TRAIN_PER_CLASS, 0), "val": (SMOKE_VAL_PER_CLASS, 1), "imagenet_r": (SMOKE_VAL_PER_CLASS, 2)}
    for name, (per_class, seed) in sets.items():
        root = data_dir / name
        if (root / ".complete").is_file():
            continue
        make_synthetic_folder(root, num_classes=SMOKE_CLASSES, per_class=per_class, size=SMOKE_IMAGE_SIZE, seed=seed)
        for c, wnid in enumerate(wnids):  # n0000000c → a real wnid (files keep their synthetic names)
            (root / synthetic_wnid(c)).rename(root / wnid)
        (root / ".complete").write_text("ok\n")
    train, val, r = (str(data_dir / n) for n in ("train", "val", "imagenet_r"))
    return {"pretrain": (train, "folder"), "finetune": (train, "folder"), "knn_train": (train, "folder"),
            "val": (val, "folder"), "imagenet_r": (r, "imagenet-r")}


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[tuple[str, str, bool]]:
    """(mlflow uri, s3 endpoint, embedded?): the configured services, or embedded ones for this run."""
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    s3 = os.environ.get("AWS_ENDPOINT_URL_S3", "")
    if mlflow_uri and s3:
        yield mlflow_uri, s3, False
        return
    if mlflow_uri or s3:
        raise UserError("set both MLFLOW_TRACKING_URI and AWS_ENDPOINT_URL_S3 to use your own services, "
                        "or neither to start embedded ones")
    from vfm.servers import embedded_services

    with embedded_services(workdir / "services") as svc:
        yield svc.mlflow_uri, svc.s3_endpoint, True


def pipeline_arguments(recipe_id: str, *, sources: dict[str, tuple[str, str]], bucket: str, mlflow_uri: str,
                       s3_endpoint: str, profile: str, overrides: list[str], seeds: list[int] | None) -> dict[str, Any]:
    """Parameters of the recipe's pipeline for a local run (backend=local, no Secret, no PVC)."""
    from vfm.pipeline.dag import plan_dag

    plan = plan_dag(recipe_id)
    args: dict[str, Any] = dict(
        runs_prefix=f"s3://{bucket}/runs", data_prefix=f"s3://{bucket}/data", mlflow_uri=mlflow_uri,
        s3_endpoint=s3_endpoint, namespace="local", credentials_secret="", profile=profile, overrides=list(overrides),
        backend="local", shard_size="8MB", shard_workers=1, train_timeout_hours=1.0, val_labels="",
        imagenet_c_corruptions=SMOKE_IMAGENET_C[0], imagenet_c_severities=SMOKE_IMAGENET_C[1])
    for role in plan.data:
        args[f"{role}_source"], args[f"{role}_layout"] = sources[role]
    if seeds is not None:
        args["seeds"] = list(seeds)
    return args


def run_local(recipe_id: str, *, workdir: Path, profile: str = "smoke", overrides: list[str] | None = None,
              seeds: list[int] | None = None, data_dir: Path | None = None,
              while_serving: Callable[[LocalRun], None] | None = None) -> LocalRun:
    """Run the pipeline; `while_serving(result)` is called before embedded services stop (e.g. to keep
    the MLflow UI up for browsing, artifacts included)."""
    from kfp import local

    from vfm.pipeline.dag import build_pipeline
    from vfm.recipes import load_recipe

    load_recipe(recipe_id, overrides, profile)  # fail fast on a bad id/override, before starting servers
    # the embedded servers log every request at INFO; the run's own output is what matters here
    for name in ("werkzeug", "moto", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with services(workdir) as (mlflow_uri, s3_endpoint, embedded):
        from vfm.servers import s3_client

        client = s3_client(s3_endpoint)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=LOCAL_BUCKET)
        sources = smoke_sources(data_dir or workdir / "data")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
                   raise_on_error=False, enable_caching=not embedded)
        pipeline = build_pipeline(recipe_id)
        pipeline(**pipeline_arguments(recipe_id, sources=sources, bucket=LOCAL_BUCKET, mlflow_uri=mlflow_uri,
                                      s3_endpoint=s3_endpoint, profile=profile, overrides=list(overrides or []),
                                      seeds=seeds))
        result = _collect(recipe_id, mlflow_uri, time.monotonic() - start)
        if embedded:
            result.embedded_store = workdir / "services" / "mlflow.db"
        if while_serving is not None:
            while_serving(result)
        return result


def _collect(recipe_id: str, mlflow_uri: str, seconds: float) -> LocalRun:
    """The run's outcome as MLflow recorded it (the newest parent run of the recipe's experiment)."""
    from mlflow.tracking import MlflowClient

    from vfm.tracking import experiment_name

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(experiment_name(recipe_id))
    runs = client.search_runs([exp.experiment_id], "tags.`vfm.stage` = 'pipeline'", order_by=["start_time DESC"],
                              max_results=1) if exp else []
    if not runs:
        return LocalRun(recipe_id, "FAILED", seconds, mlflow_uri)
    run = runs[0]
    report = ""
    with contextlib.suppress(Exception):  # absent when the pipeline failed before the report step
        report = client.download_artifacts(run.info.run_id, "report.md")
        report = Path(report).read_text()
    return LocalRun(recipe_id, run.info.status, seconds, mlflow_uri, exp.experiment_id, run.info.run_id,
                    dict(run.data.metrics), report)
