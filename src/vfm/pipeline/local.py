"""`vfm pipeline run ID --local`: the recipe's whole KFP pipeline through `kfp.local` on this machine.

- S3 and MLflow: the configured ones (MLFLOW_TRACKING_URI + AWS_ENDPOINT_URL_S3), else the embedded
  pair on loopback (vfm.services.embedded_services), exactly as the components talk to them in a cluster;
- data: scikit-learn's handwritten digits (real scans, no download) written in the official ImageNet
  archive layouts (vfm.data.digits) unless `data_dir` already holds them, sharded by the pipeline's own
  shard steps into `s3://<bucket>/data`, so the run reads them as it would read a user's ImageNet; the dense
  transfer sets are shapes on texture in the official ADE20K / COCO layouts (vfm.data.dense_synthetic);
- training: the same PyTorchJob spec through the launcher's local backend (backend=local);
- kfp.local's SubprocessRunner with use_venv=False runs every lightweight component in this
  interpreter's environment (the components image's role).

KFP caching stays off when the services are embedded: a cache entry would point at objects of an S3
endpoint that no longer exists after this run.

kfp.local writes every task's executor input and every trainer line to stdout (about 1,700 lines for
the smoke DAG). They go to `<workdir>/logs/<id>-<time>.log`; the console gets one line per finished task
(`TaskLog`), or everything with `verbose`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfm.errors import UserError

LOCAL_BUCKET = "vfm-local"
LOCAL_IMAGENET_C = ("gaussian_noise,contrast", "1,3")  # corruptions, severities (paper: 15 × 5)
LOCAL_IMAGE_SIZE = 32


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
    log_path: Path | None = None
    """Everything kfp.local and the trainers printed."""
    tasks: list[tuple[str, str, float]] = field(default_factory=list)
    """(task, final state, seconds) in the order they finished, as kfp.local reported them."""

    @property
    def mlflow_url(self) -> str:
        from vfm.tracking import ui_url

        return ui_url(self.mlflow_uri, self.experiment_id, self.parent_run_id)


IMAGENET_C_ROLE = "imagenet_c"  # `--source imagenet_c=PATH`: the official tarballs (the imagenet_c_source parameter)
COCO_LABELS_ROLE = "coco_labels"  # `--source coco_labels=PATH`: annotations_trainval2017.zip (the coco_labels parameter)
# the local default dense sets (vfm.data.dense_synthetic): shapes on texture in the official ADE20K / COCO layouts,
# images of DENSE_IMAGE_SIZE px so that the smoke profile's 64 px crops and sliding windows have something to do
DENSE_IMAGE_SIZE = 96
DENSE_TRAIN, DENSE_VAL = 64, 16


def default_sources(recipe_id: str, data_dir: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """(role → (source, layout), val labels file) of the local default data, made once under `data_dir`:
    each role gets the digits archive in the layout its dataset has on a cluster (`DagPlan.data`)."""
    from vfm.data.digits import make_digits_archives
    from vfm.pipeline.dag import plan_dag

    digits = make_digits_archives(data_dir, size=LOCAL_IMAGE_SIZE)
    sources = {}
    for role, d in plan_dag(recipe_id).data.items():
        if d.layout in ("ade20k", "coco2017"):
            sources.update(_dense_default(d.layout, d.split, data_dir / "dense", role))
            continue
        try:
            sources[role] = (digits.source(d.layout), d.layout)
        except ValueError as exc:
            raise UserError(f"{recipe_id}: the local default data has no `{role}` set: {exc}") from None
    return sources, str(digits.val_labels)


def _dense_default(layout: str, split: str, root: Path, role: str) -> dict[str, tuple[str, str]]:
    """The synthetic ADE20K zip or COCO zips (made once under `root`) for a dense data role."""
    from vfm.data.dense_synthetic import write_ade20k_zip, write_coco_zips

    if layout == "ade20k":
        zip_path = root / "ADEChallengeData2016.zip"
        if not zip_path.exists():
            root.mkdir(parents=True, exist_ok=True)
            tmp = zip_path.with_suffix(".partial")
            write_ade20k_zip(tmp, DENSE_TRAIN, DENSE_VAL, size=DENSE_IMAGE_SIZE, seed=0)
            tmp.rename(zip_path)
        return {role: (str(zip_path), layout)}
    coco = root / "coco"
    if not (coco / "annotations_trainval2017.zip").exists():  # written last: its presence means a whole set
        write_coco_zips(coco, DENSE_TRAIN, DENSE_VAL, size=DENSE_IMAGE_SIZE, seed=0)
    return {role: (str(coco / f"{split}2017.zip"), layout),
            COCO_LABELS_ROLE: (str(coco / "annotations_trainval2017.zip"), "")}


def parse_sources(recipe_id: str, items: list[str]) -> tuple[dict[str, tuple[str, str]], str]:
    """`--source ROLE=PATH` / `ROLE=LAYOUT:PATH` → (role → (source, layout), val labels path): a user's own
    data for a role of the recipe's pipeline (`DagPlan.data`), in the layout that role has on a cluster
    unless LAYOUT names another (`folder`, an official archive layout); `val_labels=PATH` is the IN-1K
    val ground truth (LOC_val_solution.csv or the devkit) that a `val` source needs; PATH may be `s3://` on
    the run's S3 endpoint (your own, with AWS_ENDPOINT_URL_S3 set), read in place; `imagenet_c=PATH`
    the official ImageNet-C tarballs (instead of regenerating the corruptions)."""
    from vfm.pipeline.dag import SHARD_LAYOUTS, DataRole, plan_dag

    plan = plan_dag(recipe_id)
    roles = dict(plan.data)
    if "in_c" in plan.suites:
        roles[IMAGENET_C_ROLE] = DataRole(IMAGENET_C_ROLE, "imagenet-c", "imagenet-c")
    if "coco_train" in roles:
        roles[COCO_LABELS_ROLE] = DataRole(COCO_LABELS_ROLE, "coco2017", "")
    out: dict[str, tuple[str, str]] = {}
    labels = ""
    for item in items:
        role, sep, rest = item.partition("=")
        role = role.strip()
        if not sep or not rest:
            raise UserError(f"--source {item!r}: expected ROLE=PATH or ROLE=LAYOUT:PATH, e.g. pretrain=/data/fall11_whole.tar")
        if role == "val_labels":
            labels = rest
            continue
        if role not in roles:
            raise UserError(f"--source {item!r}: {recipe_id}'s pipeline reads the roles {', '.join(roles)} "
                            "(and val_labels); name one of them")
        layout, colon, path = rest.partition(":")
        if not colon or layout not in SHARD_LAYOUTS:
            layout, path = roles[role].layout, rest
        if path.startswith("s3://"):  # read in place by ranged GETs, from the run's S3 endpoint
            out[role] = (path, layout)
            continue
        if not Path(path).exists():
            raise UserError(f"--source {item!r}: {path} does not exist")
        out[role] = (str(Path(path).resolve()), layout)
    if "val" in out and not labels:
        raise UserError("--source val=...: also pass --source val_labels=PATH (LOC_val_solution.csv or the "
                        "ILSVRC2012 devkit), the ground truth of the val images")
    return out, str(Path(labels).resolve()) if labels else ""


def local_world_overrides(overrides: list[str]) -> list[str]:
    """On a CUDA machine the local job runs one rank per visible GPU (`nprocPerNode`), unless `--set`
    already says how many."""
    import torch

    if not torch.cuda.is_available() or any(o.startswith("hardware.gpus") for o in overrides):
        return []
    n = torch.cuda.device_count()
    return [f"hardware.gpus={n}", f"hardware.gpus_per_node={n}"]


class TaskLog(io.TextIOBase):
    """What kfp.local prints during a run: all of it into `log`, and a line per finished task to `console`
    from kfp.local's own "Executing task 'x'" / "Task 'x' finished with status S" records
    (kfp/local/task_dispatcher.py). With `echo`, every line also goes to the console as before.

    kfp.local names a task by its key in the DAG (`train-2`); `names` maps those keys to the display
    names the DAG gives them (`finetune`, `shard in1k-val`), so the list says which stage ran."""

    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    _START = re.compile(r"Executing task '([^']+)'")
    _END = re.compile(r"Task '([^']+)' finished with status (\w+)")
    _PIPELINE = re.compile(r"Pipeline '([^']+)' finished with status (\w+)")

    def __init__(self, log: io.TextIOBase, console: io.TextIOBase, echo: bool = False,
                 names: dict[str, str] | None = None):
        self.log, self.console, self.echo, self.names = log, console, echo, dict(names or {})
        self.started: dict[str, list[float]] = {}  # a ParallelFor runs iterations of one task name at once
        self._lock = threading.Lock()  # ...in threads that all print here: a text file is not thread-safe
        self.finished: list[tuple[str, str, float]] = []
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self.log.write(text)
            if self.echo:
                self.console.write(text)
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._scan(self._ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self.log.flush()
            self.console.flush()

    def _scan(self, line: str) -> None:
        now = time.monotonic()
        if m := self._START.search(line):
            self.started.setdefault(m[1], []).append(now)
            return
        if m := self._END.search(line):
            key, state = m[1], m[2]
            starts = self.started.get(key) or [now]
            seconds = now - starts.pop(0)
            name = self.names.get(key, key)
            self.finished.append((name, state, seconds))
            self._say(f"  {state:<8} {name:<44} {seconds:7.1f} s\n")
        elif m := self._PIPELINE.search(line):
            self._say(f"  {m[2]:<8} pipeline {m[1]}\n")

    def _say(self, text: str) -> None:
        if not self.echo:
            self.console.write(text)
            self.console.flush()


@contextlib.contextmanager
def thread_safe_kfp_logging() -> Iterator[None]:
    """Make kfp.local's per-task logger context safe for ParallelFor threads while a run lasts.

    kfp.local 2.17 enters `logging_utils.local_logger_context()` for every task
    (kfp/local/task_dispatcher.py); it replaces the root logger's handlers on entry and restores the saved
    ones on exit. ParallelFor iterations run in threads, so one iteration's exit restores handlers under
    another that is still logging, and that iteration's records ("Task 'finetune' finished ...") vanish:
    seen here, 1 of 3 fine-tunes lost. Shared instead: the first entry installs kfp's handler, the last
    exit restores, under a lock.
    """
    from kfp.local import logging_utils

    original = logging_utils.local_logger_context
    lock, depth, active = threading.Lock(), [0], [None]

    @contextlib.contextmanager
    def shared() -> Iterator[None]:
        with lock:
            if depth[0] == 0:
                active[0] = original()
                active[0].__enter__()
            depth[0] += 1
        try:
            yield
        finally:
            with lock:
                depth[0] -= 1
                if depth[0] == 0:
                    active[0].__exit__(None, None, None)

    logging_utils.local_logger_context = shared
    try:
        yield
    finally:
        logging_utils.local_logger_context = original


@contextlib.contextmanager
def captured_output(log_path: Path, verbose: bool, names: dict[str, str] | None = None) -> Iterator[TaskLog]:
    """stdout and stderr of this process (kfp.local's handler and its subprocesses' streamed output) into
    `log_path`; the terminal keeps a line per task (named by `names`, see `TaskLog`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console = sys.stdout
    with open(log_path, "w", buffering=1) as log:
        tasks = TaskLog(log, console, echo=verbose, names=names)
        with contextlib.redirect_stdout(tasks), contextlib.redirect_stderr(tasks):
            yield tasks


def display_names(pipeline: Any) -> dict[str, str]:
    """DAG task key → display name (`taskInfo.name`) of every task of a compiled `@dsl.pipeline`."""
    spec = pipeline.pipeline_spec
    dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]
    return {key: task.task_info.name for dag in dags for key, task in dag.tasks.items()
            if task.task_info.name and task.task_info.name != key}


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
    from vfm.services import embedded_services

    with embedded_services(workdir / "services") as svc:
        yield svc.mlflow_uri, svc.s3_endpoint, True


def pipeline_arguments(recipe_id: str, *, sources: dict[str, tuple[str, str]], bucket: str, mlflow_uri: str,
                       s3_endpoint: str, profile: str, overrides: list[str], seeds: list[int] | None,
                       val_labels: str = "", launcher: str = "pytorchjob") -> dict[str, Any]:
    """Parameters of the recipe's pipeline for a local run (backend=local, no Secret, no PVC)."""
    from vfm.pipeline.dag import plan_dag

    plan = plan_dag(recipe_id)
    args: dict[str, Any] = dict(
        runs_prefix=f"s3://{bucket}/runs", data_prefix=f"s3://{bucket}/data", mlflow_uri=mlflow_uri,
        s3_endpoint=s3_endpoint, namespace="local", credentials_secret="", profile=profile, overrides=list(overrides),
        backend="local", launcher=launcher, shard_size="8MB", shard_workers=1, train_timeout_hours=1.0,
        val_labels=val_labels if "val" in plan.data else "")
    for role in plan.data:
        args[f"{role}_source"], args[f"{role}_layout"] = sources[role]
    if plan.curate:
        # the local pool and the eval set that decontamination checks it against: the pretrain and val roles' data
        from vfm.pipeline.steps import curate_kind

        source, layout = sources["pretrain"]
        args["curate_sources"] = [f"local={curate_kind(layout)}:{source}"]
        if "val" in sources:
            args["curate_eval_sets"] = [f"in1k-val={curate_kind(sources['val'][1])}:{sources['val'][0]}"]
    if COCO_LABELS_ROLE in sources:
        args["coco_labels"] = sources[COCO_LABELS_ROLE][0]
    if plan.cells:  # the ablation's pipeline: no ImageNet-C, no seeds parameter (the grid's are the recipe's)
        if seeds is not None:
            raise UserError(f"{recipe_id}: --seeds does not apply; the grid's seeds are the recipe's ablation.seeds "
                            "(--set 'ablation.seeds=[0,1]')")
        return args
    args.update(imagenet_c_workers=1, imagenet_c_corruptions=LOCAL_IMAGENET_C[0],
                imagenet_c_severities=LOCAL_IMAGENET_C[1])
    if IMAGENET_C_ROLE in sources:  # the official set, whole: nothing to restrict
        args.update(imagenet_c_source=sources[IMAGENET_C_ROLE][0], imagenet_c_corruptions="", imagenet_c_severities="")
    if seeds is not None:
        args["seeds"] = list(seeds)
    return args


def run_local(recipe_id: str, *, workdir: Path, profile: str = "smoke", overrides: list[str] | None = None,
              seeds: list[int] | None = None, data_dir: Path | None = None,
              while_serving: Callable[[LocalRun], None] | None = None, verbose: bool = False,
              log_path: Path | None = None, sources: list[str] | None = None,
              launcher: str = "pytorchjob") -> LocalRun:
    """Run the pipeline; `while_serving(result)` is called before embedded services stop (e.g. to keep
    the MLflow UI up for browsing, artifacts included). The KFP and trainer output goes to `log_path`
    (default `<workdir>/logs/<id>-<time>.log`, `LocalRun.log_path`) with a line per task on stdout."""
    from kfp import local

    from vfm.pipeline.dag import build_pipeline, recipe_of
    from vfm.recipes import load_recipe

    overrides = list(overrides or [])
    overrides += local_world_overrides(overrides) if profile != "smoke" else []  # smoke ranks are CPU ranks
    load_recipe(recipe_of(recipe_id), overrides, profile)  # fail fast on a bad id/override, before starting servers
    from vfm.launch import LAUNCHERS

    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    given, given_labels = parse_sources(recipe_id, list(sources or []))
    # the embedded servers log every request at INFO; the run's own output is what matters here
    for name in ("werkzeug", "moto", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or workdir / "logs" / f"{recipe_id}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    start = time.monotonic()
    with services(workdir) as (mlflow_uri, s3_endpoint, embedded):
        from vfm.storage import s3_client

        client = s3_client(s3_endpoint)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=LOCAL_BUCKET)
        from vfm.pipeline.dag import plan_dag

        if set(plan_dag(recipe_id).data) <= set(given):  # the user's data for every role: no digits needed
            role_sources, val_labels = dict(given), given_labels
        else:
            role_sources, val_labels = default_sources(recipe_id, data_dir or workdir / "data")
            role_sources.update(given)
            val_labels = given_labels or val_labels
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
                   raise_on_error=False, enable_caching=not embedded)
        pipeline = build_pipeline(recipe_id)
        print(f"{recipe_id} ({profile}): running the pipeline; KFP and trainer logs: {log_path}", flush=True)
        with captured_output(log_path, verbose, display_names(pipeline)) as tasks, thread_safe_kfp_logging():
            pipeline(**pipeline_arguments(recipe_id, sources=role_sources, bucket=LOCAL_BUCKET, mlflow_uri=mlflow_uri,
                                          s3_endpoint=s3_endpoint, profile=profile, overrides=list(overrides or []),
                                          seeds=seeds, val_labels=val_labels, launcher=launcher))
            result = _collect(recipe_id, mlflow_uri, time.monotonic() - start)  # its download bar goes to the log
        result.log_path, result.tasks = log_path, list(tasks.finished)
        if embedded:
            result.embedded_store = workdir / "services" / "mlflow.db"
        if while_serving is not None:
            while_serving(result)
        return result


def _collect(pipeline_id: str, mlflow_uri: str, seconds: float) -> LocalRun:
    """The run's outcome as MLflow recorded it (the newest parent run of this pipeline in the recipe's
    experiment)."""
    from mlflow.tracking import MlflowClient

    from vfm.evaluate.ablation import REPORT_MD
    from vfm.pipeline.dag import plan_dag
    from vfm.tracking import experiment_name

    plan = plan_dag(pipeline_id)
    recipe_id = plan.recipe_id
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(experiment_name(recipe_id))
    runs = client.search_runs([exp.experiment_id], f"tags.`vfm.stage` = 'pipeline' and tags.`vfm.pipeline` = "
                              f"'{pipeline_id}'", order_by=["start_time DESC"], max_results=1) if exp else []
    if not runs:
        return LocalRun(pipeline_id, "FAILED", seconds, mlflow_uri)
    run = runs[0]
    report = ""
    with contextlib.suppress(Exception):  # absent when the pipeline failed before the report step
        name = REPORT_MD if plan.cells else "report.md"
        report = Path(client.download_artifacts(run.info.run_id, name)).read_text()
    return LocalRun(pipeline_id, run.info.status, seconds, mlflow_uri, exp.experiment_id, run.info.run_id,
                    dict(run.data.metrics), report)
