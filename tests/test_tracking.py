"""MLflow conventions against the real `mlflow server` on loopback."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from vfm.recipes import load_recipe
from vfm.tracking import experiment_name, open_run, tracked_run


def test_run_layout_params_tags_and_restart(mlflow_uri):
    recipe = load_recipe("meta-dinov2-giant", profile="smoke")
    parent = open_run(recipe, stage="pipeline", run_key="pipe-1", uri=mlflow_uri)
    with tracked_run(recipe, stage="pretrain", run_key="pipe-1/pretrain", parent_run_id=parent.run_id,
                     uri=mlflow_uri) as run:
        run.log_metrics({"train.loss": 1.5}, step=3)
    client = MlflowClient(mlflow_uri)
    got = client.get_run(run.run_id)
    assert client.get_experiment(got.info.experiment_id).name == experiment_name(recipe.id) == "vfm/meta-dinov2-giant"
    assert got.info.status == "FINISHED"
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
    assert got.data.tags["mlflow.source.name"] == "vfm pretrain" and got.data.tags["mlflow.source.type"] == "JOB"
    assert got.data.tags["vfm.recipe"] == "meta-dinov2-giant" and got.data.tags["claim.params_millions"] == "450.0"
    assert got.data.params["stages.pretrain.batch.global_batch"] == "8"
    assert got.data.params["ssl.momentum_start"] == "0.996"
    assert got.data.metrics["train.loss"] == 1.5

    # a restarted pod re-opens the same run and keeps logging into it
    again = open_run(recipe, stage="pretrain", run_key="pipe-1/pretrain", uri=mlflow_uri)
    assert again.run_id == run.run_id
    again.log_metrics({"train.loss": 1.0}, step=4)
    history = client.get_metric_history(run.run_id, "train.loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.5), (4, 1.0)]
    parent.end()


def test_failure_marks_failed_and_preemption_marks_killed(mlflow_uri):
    recipe = load_recipe("vit-huge", profile="smoke")
    with pytest.raises(RuntimeError):
        with tracked_run(recipe, stage="pretrain", run_key="fail-1", uri=mlflow_uri) as run:
            raise RuntimeError("boom")
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    with pytest.raises(SystemExit):
        with tracked_run(recipe, stage="pretrain", run_key="sigterm-1", uri=mlflow_uri) as run2:
            raise SystemExit(143)
    assert client.get_run(run2.run_id).info.status == "KILLED"


def test_tracking_off_without_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = open_run(load_recipe("vit-huge", profile="smoke"), stage="pretrain", run_key="x")
    assert not run.enabled
    run.log_metrics({"a": 1.0})  # a no-op, not an error


def test_metric_sender_keeps_failed_batches_and_bounds_its_queue():
    from mlflow.entities import Metric

    from vfm.tracking import MetricSender

    class Flaky:
        def __init__(self, fail: int):
            self.fail, self.got = fail, []

        def log_batch(self, run_id, metrics):
            if self.fail:
                self.fail -= 1
                raise ConnectionError("server away")
            self.got += [m.step for m in metrics]

    client = Flaky(fail=3)
    sender = MetricSender(client, "r", retry_s=0.01)
    sender.put([Metric("loss", 1.0, 0, s) for s in range(2500)])
    assert sender.flush(timeout_s=30) == 0 and client.got == list(range(2500)) and sender.failures == 3
    stuck = MetricSender(Flaky(fail=10**9), "r", max_pending=100, retry_s=0.01)
    stuck.put([Metric("loss", 1.0, 0, s) for s in range(150)])
    assert stuck.flush(timeout_s=0.2) == 100 and stuck.dropped == 50  # the oldest go first, and are counted


def test_experiments_open_in_the_training_view_and_runs_carry_their_datasets(mlflow_uri, tmp_path):
    """The `mlflow.experimentKind` tag (also set on an experiment made before it) and each manifest as a
    dataset input with its context, digest and profile, as the UI's Dataset column reads them."""
    import json

    from vfm import storage
    from vfm.data.manifest import Manifest
    from vfm.data.shard import write_dataset
    from vfm.data.sources import index_source
    from vfm.data.synthetic import make_synthetic_folder
    from vfm.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    client = MlflowClient(mlflow_uri)
    recipe = load_recipe("convnext-xl", profile="smoke")
    old = client.get_experiment_by_name(experiment_name(recipe.id))
    old_id = old.experiment_id if old else client.create_experiment(experiment_name(recipe.id))
    if EXPERIMENT_KIND_TAG in client.get_experiment(old_id).tags:  # as an experiment made before vfm tagged them
        client.delete_experiment_tag(old_id, EXPERIMENT_KIND_TAG)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old_id).tags
    make_synthetic_folder(tmp_path / "src", num_classes=3, per_class=2, size=16, seed=0)
    write_dataset(index_source("folder", str(tmp_path / "src")), str(tmp_path / "shards"))
    write_dataset(index_source("folder", str(tmp_path / "src")), str(tmp_path / "val"), seed=1, split="val")
    manifest, val = Manifest.load(str(tmp_path / "shards")), Manifest.load(str(tmp_path / "val"))
    with tracked_run(recipe, stage="finetune", run_key=f"datasets-{tmp_path.name}", uri=mlflow_uri) as run:
        run.log_dataset(manifest, "training")
        run.log_dataset(manifest, "training")  # a restarted run logs it again
        run.log_dataset(val, "evaluation")
        with pytest.raises(ValueError, match="context 'train'"):
            run.log_dataset(manifest, "train")
    assert client.get_experiment(old_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    assert sorted(i.tags[0].value for i in inputs) == ["evaluation", "training"]
    [ds] = [i.dataset for i in inputs if i.tags[0].value == "training"]
    profile = json.loads(ds.profile)
    sha = __import__("hashlib").sha256(manifest.to_json().encode()).hexdigest()
    assert ds.name == "folder-train" and ds.digest == sha[:12] and profile["sha256"] == sha
    assert json.loads(ds.source)["uri"] == manifest.location and storage.exists(manifest.location)
    assert profile["num_samples"] == 6 and profile["classes"] == list(manifest.classes) and len(profile["classes"]) == 3

    fresh = open_run(load_recipe("dinov2-giant", profile="smoke"), stage="pretrain", run_key="kind", uri=mlflow_uri)
    assert client.get_experiment(fresh.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    fresh.end()


def test_system_metrics_are_on_for_real_runs_and_off_for_smoke_unless_asked(monkeypatch):
    from vfm.tracking import SYSTEM_METRICS_ENV, system_metrics_wanted

    monkeypatch.delenv(SYSTEM_METRICS_ENV, raising=False)
    paper, smoke = load_recipe("vit-huge"), load_recipe("vit-huge", profile="smoke")
    assert system_metrics_wanted(paper, None) and not system_metrics_wanted(smoke, None)
    assert system_metrics_wanted(smoke, True) and not system_metrics_wanted(paper, False)
    monkeypatch.setenv(SYSTEM_METRICS_ENV, "true")  # MLflow's own switch
    assert system_metrics_wanted(smoke, None) and not system_metrics_wanted(smoke, False)


def test_system_metrics_of_a_block_shorter_than_one_interval_are_still_logged(mlflow_uri, monkeypatch):
    """MLflow's monitor drops the sample it holds when stopped inside its first interval; ours logs it at finish,
    and a second block on the same run (a restart) continues the steps."""
    import time

    from vfm.tracking import system_metrics

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")
    with tracked_run(load_recipe("vit-huge", profile="smoke"), stage="pretrain", run_key=f"sysm-{id(monkeypatch)}",
                     uri=mlflow_uri) as run:
        for _ in range(2):
            start = time.monotonic()
            with system_metrics(run.run_id, node_id="node3", uri=mlflow_uri):
                time.sleep(0.5)  # the block: far shorter than the 30 s interval
            assert time.monotonic() - start < 30  # finish() does not wait out the interval either
    history = MlflowClient(mlflow_uri).get_metric_history(run.run_id, "system/node3/cpu_utilization_percentage")
    assert [m.step for m in history] == [0, 1]


def test_ui_links_open_the_model_training_view():
    from vfm.tracking import ui_url

    assert ui_url("http://m:5000/", "7") == "http://m:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_url("http://m:5000", "7", "ab") == "http://m:5000/#/experiments/7/runs/ab?workflowType=machine_learning"
    assert ui_url("http://m:5000") == "http://m:5000"


def test_tag_options_parse_or_say_the_form():
    from vfm.errors import UserError
    from vfm.tracking import parse_tags

    assert parse_tags(["vfm.cell=k7-r4", "note=a=b"]) == {"vfm.cell": "k7-r4", "note": "a=b"}
    assert parse_tags(None) == {}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_tags(["vfm.cell"])
