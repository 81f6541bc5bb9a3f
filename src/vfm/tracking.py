"""MLflow conventions shared by every stage.

- one experiment per recipe: `vfm/<recipe-id>`;
- one parent run per pipeline run, one child run per stage (`mlflow.parentRunId` tag, so the UI nests them);
- params = the flattened resolved recipe; tags = recipe id, stage, profile, git sha, `claim.*`;
- a run is found again by its `vfm.run_key` tag, so a pod restarted after a crash (or a retried KFP
  task) continues the *same* run id instead of starting a new one;
- an exception marks the run FAILED; SIGTERM-style exits (SystemExit with a retryable code) mark it
  KILLED so the restarted process re-opens it.

All calls go through `MlflowClient` (no fluent global state): several runs can be open in one process
(a pipeline parent and its stages) and nothing leaks between tests.

Under KFP 2.17's MLflow plugin (kubeflow/pipelines backend/src/v2/common/plugins/mlflow, KEP-12862) KFP
itself opens a run per pipeline run and a nested run per task, and injects the task's run into its
container as `MLFLOW_RUN_ID` / `MLFLOW_EXPERIMENT_ID` (`kfp_plugin_run`). vfm then opens no parent of its
own: the plugin's pipeline run is the parent (`start_run`), and each stage run nests under the plugin's
run of the task that launched it. A child run always goes to its parent's experiment, so the UI nests it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfm.recipes import Recipe, flatten

log = logging.getLogger(__name__)

RUN_KEY_TAG = "vfm.run_key"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
# MLflow 3's UI files an experiment under this kind ("Machine learning", not "GenAI apps & agents";
# mlflow/server/js `ExperimentKind`). The view that opens is the UI's own switch (GenAI by default, kept in the
# browser's localStorage as `mlflow.workflowType`) unless the link says `?workflowType=machine_learning`, as
# every link vfm prints does (`ui_url`): the runs table, its Dataset and Models columns, the model registry.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"
DATASET_CONTEXTS = ("training", "evaluation")
MAX_PROFILE_CLASSES = 1000  # beyond this (IN-22K's 21,841 wnids) the profile names classes.txt instead


def experiment_name(recipe_id: str) -> str:
    return f"vfm/{recipe_id}"


def ui_url(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment (its runs table) or of one run, in the model-training view."""
    if experiment_id is None:
        return uri
    page = f"{uri.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{page}/runs/{run_id}?{TRAINING_VIEW}" if run_id else f"{page}/runs?{TRAINING_VIEW}"


def git_sha() -> str:
    if sha := os.environ.get("VFM_GIT_SHA"):
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_tags(items: list[str] | None) -> dict[str, str]:
    """`--tag KEY=VALUE` options (repeatable) of `vfm train` and `vfm evaluate` → {key: value}."""
    from vfm.errors import UserError

    tags = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UserError(f"--tag {item!r}: expected KEY=VALUE, e.g. vfm.suite=in1k")
        tags[k] = v
    return tags


def recipe_tags(recipe: Recipe) -> dict[str, str]:
    tags = {"vfm.recipe": recipe.id, "vfm.profile": recipe.profile, "vfm.git_sha": git_sha(),
            "vfm.paper_seed": recipe.paper.seed}
    for key, value in recipe.claims.model_dump().items():
        if value is not None:
            tags[f"claim.{key}"] = str(value)
    return tags


def source_tags(stage: str, sha: str) -> dict[str, str]:
    """MLflow's source tags (the UI's Source column), which its fluent API sets and MlflowClient.create_run does
    not: what made the run and the vfm commit `sha` it ran."""
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": f"vfm {stage}"}
    if sha != "unknown":
        tags["mlflow.source.git.commit"] = sha
    return tags


MAX_PENDING_METRICS = 200_000  # a background sender holds at most this many while MLflow is away (~50 MB)
FLUSH_TIMEOUT_S = 120.0  # how long the end of a run waits for a sender's backlog


class MetricSender:
    """Metrics to MLflow from a background thread, so a training step never waits for the tracking server
    and an outage never stops training: a batch that fails stays queued and is retried with backoff
    (bounded: past MAX_PENDING_METRICS the oldest go, and the loss is reported).

    Own thread rather than MLflow's `log_batch(synchronous=False)`: its queue records a failed batch's
    exception and drops the batch (mlflow/utils/async_logging/async_logging_queue.py `_log_run_data`),
    so metrics logged while the server is down would never arrive."""

    def __init__(self, client: Any, run_id: str, *, max_pending: int = MAX_PENDING_METRICS, retry_s: float = 2.0):
        self.client, self.run_id, self.max_pending, self.retry_s = client, run_id, max_pending, retry_s
        self._pending: deque = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._wake = False
        self.dropped = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mlflow-metrics")
        self._thread.start()

    def put(self, metrics: list[Any]) -> None:
        with self._cv:
            self._pending.extend(metrics)
            while len(self._pending) > self.max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._cv.notify()

    def _loop(self) -> None:
        backoff = self.retry_s
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                batch = [self._pending[i] for i in range(min(1000, len(self._pending)))]
                self._busy = True
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # the server is away or refusing: keep the batch, try again later
                self.failures += 1
                if self.failures == 1 or self.failures % 50 == 0:
                    log.warning("MLflow is not taking metrics (%s); %d kept, retrying every %.0f s; training goes on",
                                exc, len(self._pending), backoff)
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
                    self._cv.wait_for(lambda: self._wake, timeout=backoff)  # a flush retries at once
                    self._wake = False
                backoff = min(backoff * 2, 30.0)
                continue
            with self._cv:
                for _ in batch:  # put() only appends and drops from the left: these are still the first
                    if self._pending:
                        self._pending.popleft()
                self._busy = False
                self._cv.notify_all()
            if self.failures and backoff > self.retry_s:
                log.warning("MLflow is back: delivering the metrics kept meanwhile")
            backoff = self.retry_s

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Wait until everything queued is delivered, at most `timeout_s`; returns what is left."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._pending or self._busy) and time.monotonic() < deadline:
                self._wake = True
                self._cv.notify_all()
                self._cv.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return len(self._pending)


@dataclass
class TrackedRun:
    """A handle on one MLflow run; a no-op when tracking is off (`client is None`). With a `sender`
    (a training run's rank 0) metrics go through its background thread and the end of the run never
    raises for tracking."""

    client: Any
    run_id: str | None
    experiment_id: str | None = None
    sender: MetricSender | None = None

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if self.sender is not None:
            self.sender.put(batch)
            return
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        path = Path(local_path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, manifest: Any, context: str) -> None:
        """A `vfm shard` manifest as one of the run's MLflow dataset inputs (the UI's Dataset column): its URL as
        the source, a digest of its content (the full sha256 in the profile), the sample and class counts and
        the classes, tagged with `context` (training or evaluation). Logging the same manifest again, as a
        restarted run does, adds nothing: MLflow keeps one input per dataset and run (with its first context)."""
        if not self.enabled:
            return
        if context not in DATASET_CONTEXTS:
            raise ValueError(f"dataset context {context!r}: use one of {', '.join(DATASET_CONTEXTS)}")
        if not manifest.location:
            raise ValueError(f"{manifest.dataset}/{manifest.split}: a manifest logged as a dataset needs its URL "
                             "(load it with Manifest.load)")
        import hashlib
        import json
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        sha = hashlib.sha256(manifest.to_json().encode()).hexdigest()
        profile = {"sha256": sha, "num_samples": manifest.num_samples, "num_classes": len(manifest.classes),
                   "num_shards": len(manifest.shards), "split": manifest.split}
        if len(manifest.classes) <= MAX_PROFILE_CLASSES:
            profile["classes"] = list(manifest.classes)
        else:
            profile["classes_url"] = f"{manifest.base_url}/classes.txt"
        with warnings.catch_warnings():  # a local path matches MLflow's two local sources, which are the same
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(manifest.location)

        class ManifestDataset(MetaDataset):  # MetaDataset with a profile, as mlflow's PandasDataset adds one
            @property
            def profile(self) -> dict[str, Any]:
                return profile

            def to_dict(self) -> dict[str, str]:
                return {**super().to_dict(), "profile": json.dumps(profile)}

        dataset = ManifestDataset(source, name=f"{manifest.dataset}-{manifest.split}", digest=sha[:12])
        # the entity conversion mlflow.log_input makes (mlflow/tracking/fluent.py), through the client here
        entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        try:
            self.client.log_inputs(self.run_id, datasets=[entry])
        except Exception as exc:
            if self.sender is None:
                raise
            # a training run never stops for its record (see MetricSender)
            log.warning("MLflow run %s: dataset %s not recorded: %s", self.run_id, manifest.location, exc)

    def log_dict(self, obj: Any, name: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, obj, name)

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        if self.sender is None:
            self.client.set_terminated(self.run_id, status=status)
            return
        left = self.sender.flush()
        if left or self.sender.dropped:
            log.warning("MLflow run %s: %d metrics could not be delivered (%d dropped while the server was away)",
                        self.run_id, left, self.sender.dropped)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # the training result stands; only its record is incomplete
            log.warning("MLflow run %s could not be marked %s: %s", self.run_id, status, exc)


def tracking_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def require_client(uri: str | None, needs: str) -> Any:
    """An MlflowClient on `uri` (else $MLFLOW_TRACKING_URI); a UserError saying `needs` when neither is set."""
    uri = tracking_uri(uri)
    if uri is None:
        from vfm.errors import UserError

        raise UserError(f"{needs}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@dataclass(frozen=True)
class PluginRun:
    """The run KFP's MLflow plugin made for this task, and the pipeline run it nests under."""

    task_run_id: str
    experiment_id: str
    pipeline_run_id: str


def kfp_plugin_run(uri: str | None = None) -> PluginRun | None:
    """This task's run under KFP's MLflow plugin (it injects MLFLOW_RUN_ID and MLFLOW_EXPERIMENT_ID); None
    without the plugin."""
    run_id, exp_id = os.environ.get("MLFLOW_RUN_ID"), os.environ.get("MLFLOW_EXPERIMENT_ID")
    uri = tracking_uri(uri)
    if not run_id or uri is None:
        return None
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(run_id)  # a wrong id fails here, loudly, not later
    return PluginRun(task_run_id=run_id, experiment_id=exp_id or run.info.experiment_id,
                     pipeline_run_id=run.data.tags.get("mlflow.parentRunId") or run_id)


def open_run(
    recipe: Recipe,
    *,
    stage: str,
    run_key: str,
    parent_run_id: str | None = None,
    uri: str | None = None,
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
    background: bool = False,
) -> TrackedRun:
    """Create the run for (`recipe`, `run_key`) or re-open it if a previous attempt created it.
    `background`: metrics through a MetricSender (training: never wait for MLflow, survive its outages)."""
    uri = tracking_uri(uri)
    if uri is None:
        log.info("MLflow tracking is off for %s/%s: set MLFLOW_TRACKING_URI to record it", recipe.id, stage)
        return TrackedRun(client=None, run_id=None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if parent_run_id:  # a child lives in its parent's experiment (vfm/<id>, or the KFP plugin's)
        exp_id = client.get_run(parent_run_id).info.experiment_id
    else:
        name = experiment_name(recipe.id)
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else _create_experiment(client, name)
    experiment = client.get_experiment(exp_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before vfm tagged them, or by KFP's MLflow plugin
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        log.info("continuing MLflow run %s (%s)", run_id, run_key)
    else:
        base = recipe_tags(recipe)
        tags = {**base, **source_tags(stage, base["vfm.git_sha"]), "vfm.stage": stage, RUN_KEY_TAG: run_key,
                **(extra_tags or {})}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(exp_id, run_name=run_name or f"{recipe.id}-{stage}", tags=tags).info.run_id
    run = TrackedRun(client=client, run_id=run_id, experiment_id=exp_id,
                     sender=MetricSender(client, run_id) if background else None)
    run.log_params(flatten(recipe))
    return run


SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # MLflow's own switch, honoured either way


def system_metrics_wanted(recipe: Recipe, asked: bool | None) -> bool:
    """On for real runs, off for the smoke profile (tests, laptops), unless asked (flag, else MLflow's env)."""
    if asked is not None:
        return asked
    env = os.environ.get(SYSTEM_METRICS_ENV, "").strip().lower()
    if env in ("true", "1", "false", "0"):
        return env in ("true", "1")
    return recipe.profile != "smoke"


@contextlib.contextmanager
def system_metrics(run_id: str | None, *, node_id: str, uri: str | None = None) -> Iterator[None]:
    """MLflow's system metrics for this node into `run_id` while the block runs: CPU, memory, disk and network,
    and the GPUs through pynvml where a driver is present, as `system/<node_id>/<metric>` (MLflow's
    SystemMetricsMonitor, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds, 10 by default). A restart
    continues the steps. One process per node runs it; a monitor that cannot start is a warning, not a stop."""
    uri = tracking_uri(uri)
    if run_id is None or uri is None:
        yield
        return
    try:
        monitor = _node_monitor()(run_id, node_id=node_id, tracking_uri=uri, resume_logging=True)
        monitor.start()
    except Exception as exc:  # MLflow away at start, or psutil missing: the run goes on without them
        log.warning("MLflow system metrics for %s are off: %s", node_id, exc)
        yield
        return
    try:
        yield
    finally:
        monitor.finish()


def _node_monitor() -> type:
    """MLflow's SystemMetricsMonitor that also logs at finish when nothing was published yet. Upstream's loop
    (mlflow/system_metrics/system_metrics_monitor.py, `monitor`) returns on shutdown before publishing the
    sample it holds, so a block shorter than one interval (a short fine-tune, a fast node) logged nothing."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class NodeMonitor(SystemMetricsMonitor):
        published = False

        def publish_metrics(self, metrics: dict[str, float]) -> None:
            super().publish_metrics(metrics)
            self.published = True

        def finish(self) -> None:
            started = self._process is not None
            super().finish()  # stops and joins the sampling thread, then flushes what it published
            if started and not self.published:
                try:
                    self.collect_metrics()  # a sample now, beside any the thread took before it stopped
                    self.publish_metrics(self.aggregate_metrics())
                    self.mlflow_logger.flush()
                except Exception as exc:  # MLflow away at the end: the run's own result still stands
                    log.warning("MLflow system metrics for %s: the last sample was not logged: %s", self.node_id, exc)

    return NodeMonitor


def _create_experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # created concurrently by another rank/task
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def tracked_run(recipe: Recipe, **kwargs: Any) -> Iterator[TrackedRun]:
    """`open_run` + terminal status: FINISHED, FAILED on an exception, KILLED on a retryable exit."""
    run = open_run(recipe, **kwargs)
    try:
        yield run
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        run.end("KILLED" if code >= 128 or code == 0 else "FAILED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    else:
        run.end("FINISHED")
