"""The README's main job: `vfm pipeline run ID --local --profile smoke` runs the recipe's whole DAG through
kfp.local (shard → [ImageNet-C] → pretrain → fine-tune per seed → evaluate per suite → aggregate → report)
against the real S3 and MLflow servers on loopback, on the local default data (the digits in the official
archive layouts), and the metrics end up on the MLflow server.

The vit-huge tests run the README's command itself, as a newcomer would, with `--serve` (its own embedded
servers, kept up after the run): it must learn (≥ 90 % top-1) and print a progress list, not the KFP logs, and
the MLflow UI must show it in headless Chromium. They also make the README's figures: `docs/main-job.png`
(`vfm compare`'s plot) and the UI's screenshots `docs/mlflow-runs.png` and `docs/mlflow-compare.png`. VFM_SCALE=reduced (CI default) shortens the DINOv2 run with --set."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vfm.pipeline.local import run_local

REPO = Path(__file__).resolve().parents[2]
README_FIGURE = REPO / "docs" / "main-job.png"

FULL = os.environ.get("VFM_SCALE", "reduced") == "full"
REDUCED_SETS = {"dinov2-giant": ["stages.pretrain.steps=4"]}


def children(client: MlflowClient, run) -> list:
    return client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")


def _readme_main_job() -> list[str]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- ci:main -->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md lacks the ci:main block"
    argv = shlex.split(m.group(1).strip())
    assert argv[0] == ".venv/bin/vfm"
    return [sys.executable, "-m", "vfm", *argv[1:]]


SERVICE_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")


@dataclass
class MainJob:
    """The README's main job while it serves its embedded MLflow (`--serve`): what it printed so far."""

    stdout: str
    mlflow_url: str  # the address it printed, as a user clicks it
    mlflow_uri: str
    run_id: str


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> Iterator[MainJob]:
    """The README's command as a newcomer runs it, plus `--serve`: its own embedded S3 and MLflow (none configured
    in its environment), kept up after the run until Ctrl-C so that the browser test can open the UI."""
    workdir = tmp_path_factory.mktemp("main-job")
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    stderr = (workdir / "stderr.txt").open("w")
    # Ctrl-C as at a terminal: a suite started in the background (`pytest &`, some CI runners) ignores SIGINT,
    # and its children would inherit that
    proc = subprocess.Popen([*_readme_main_job(), "--workdir", str(workdir), "--serve"], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, cwd=REPO, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:  # until EOF, so that the pipe never fills while the servers are up
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line:
                serving.set()
        serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(1500), "the main job did not finish within 25 min:\n" + "".join(lines)[-3000:]
        out = "".join(lines)
        assert proc.poll() is None and "Ctrl-C to stop" in out, \
            f"exit {proc.poll()} without serving:\n{out[-3000:]}\n{(workdir / 'stderr.txt').read_text()[-3000:]}"
        (workdir / "stdout.txt").write_text(out)  # kept with the run's logs for a failure's diagnosis
        urls = re.findall(r"MLflow: (http://\S+)", out)
        assert len(urls) == 1, f"expected one 'MLflow: URL' line before serving, got {urls}:\n{out[-3000:]}"
        (url,) = urls
        (run_id,) = re.findall(r"/runs/([0-9a-f]{32})", url)
        yield MainJob(stdout=out, mlflow_url=url, mlflow_uri=url.split("/#/")[0], run_id=run_id)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the user's Ctrl-C: the embedded servers stop, the command exits
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        reader.join(10)
        stderr.close()
    assert proc.returncode == 0, f"exit {proc.returncode} after Ctrl-C:\n{''.join(lines)[-2000:]}"


@pytest.mark.scale
def test_readme_main_job_learns_and_prints_a_progress_list(main_job):
    lines = main_job.stdout.splitlines()
    # a line per task, then the table: not the ~1,800 lines of KFP executor and trainer output
    assert len(lines) < 80, main_job.stdout
    tasks = [line.split() for line in lines if re.match(r"\s+SUCCESS\s+\S+\s+[\d.]+ s$", line)]
    names = [t[1] for t in tasks]
    assert names.count("pretrain") == 1 and names.count("finetune") == 3 and "report" in names, main_job.stdout
    assert "executor_input" not in main_job.stdout and "vfm.train.loop" not in main_job.stdout
    (log,) = re.findall(r"KFP and trainer logs: (\S+)", main_job.stdout)
    text = Path(log).read_text()
    assert "Executing task" in text and "vfm.train.loop: step" in text
    assert "paper, full scale: 89.1" in main_job.stdout  # at smoke scale the claim is a reference, not a target

    run_id, uri = main_job.run_id, main_job.mlflow_uri
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    metrics = run.data.metrics
    assert metrics["eval.num_seeds"] == 3
    # real digits: the fine-tuned model learns; chance is 10 % on all three
    assert metrics["eval.in1k.top1"] >= 90.0, metrics
    assert metrics["eval.knn.k20.top1"] >= 50.0 and metrics["eval.in_r.top1"] >= 50.0, metrics
    for name in ("eval.in1k.top5", "eval.in_c.gaussian_noise.s3.err", "eval.in_r.top1", "eval.knn.k20.top1"):
        assert name in metrics and f"{name}.std" in metrics, name  # mean ± std over the seeds
    stages = sorted(r.data.tags.get("vfm.stage") for r in children(client, run))
    assert stages.count("pretrain") == 1 and stages.count("finetune") == 3 and stages.count("eval") == 4 * 3
    # every export is a LoggedModel of its run; the best fine-tune seed is vfm-vit-huge@candidate
    from vfm.registry import CANDIDATE, EXPORT_TAG, MODEL_ID_TAG, PIPELINE_TAG, model_name

    trained = [r for r in children(client, run) if r.data.tags.get("vfm.stage") in ("pretrain", "finetune")]
    assert all(client.get_logged_model(r.data.tags[MODEL_ID_TAG]).source_run_id == r.info.run_id for r in trained)
    mv = client.get_model_version_by_alias(model_name("vit-huge"), CANDIDATE)
    assert mv.tags[PIPELINE_TAG] == run_id and client.get_run(mv.run_id).data.tags["vfm.stage"] == "finetune"
    assert run.data.tags["vfm.registered_model"] == f"vfm-vit-huge/{mv.version}" and mv.tags[EXPORT_TAG]

    # the README's figure: this pipeline run as one bar per metric with its seed spread, and its curves
    from vfm.evaluate.compare import collect_runs, render_png

    rows = [r for r in collect_runs(["vit-huge"], tracking_uri=uri)
            if run_id in (r.run_id, r.parent_run_id)]
    assert [r.stage for r in rows].count("pipeline") == 1
    assert render_png(rows, README_FIGURE).stat().st_size > 10_000


@pytest.mark.scale
def test_the_mlflow_ui_shows_the_main_job_in_chromium(main_job):
    """What the user opens next: the printed address, the runs table with the pipeline's children (datasets,
    models, sources), and MLflow's compare view of them (run names, our metric names, the claim.* tags), in a
    real browser. Its screenshots are the README's (docs/) and CI's (.ci/artifacts or $VFM_CI_ARTIFACTS)."""
    from tests.helpers.browser import artifacts_dir, chromium
    from tests.helpers.mlflow_ui import check_pipeline_in_mlflow_ui

    client = MlflowClient(tracking_uri=main_job.mlflow_uri)
    with chromium() as driver:
        check_pipeline_in_mlflow_ui(driver, client, client.get_run(main_job.run_id), main_job.mlflow_url,
                                    [artifacts_dir(), README_FIGURE.parent])
    assert (README_FIGURE.parent / "mlflow-compare.png").stat().st_size > 10_000


@pytest.mark.scale
def test_dinov2_giant_smoke_dag_end_to_end_as_trainjobs(services, tmp_path):
    """The same DAG with launcher=trainjob: every stage and evaluation a Kubeflow Trainer v2 TrainJob, its
    nodes run locally with the torch plugin's env (the vit-huge main job covers the PyTorchJob launcher)."""
    seen = []  # `--serve` hook: called with the outcome while the services are still up
    result = run_local("dinov2-giant", workdir=tmp_path, profile="smoke",
                       overrides=[] if FULL else REDUCED_SETS["dinov2-giant"], while_serving=seen.append,
                       launcher="trainjob")
    assert result.state == "FINISHED", result
    log = result.log_path.read_text()
    assert re.search(r"TrainJob dinov2-giant-pr\S+ Complete \(local, 1 replicas", log), log[-3000:]
    assert "PyTorchJob" not in log
    assert seen == [result] and result.embedded_store is None  # configured services, not embedded ones
    client = MlflowClient(tracking_uri=services.mlflow_uri)
    run = client.get_run(result.parent_run_id)
    metrics = run.data.metrics
    assert "eval.knn.k20.top1" in metrics and metrics["eval.num_seeds"] == 1
    # the headless backbone's classification suites ran on its linear probe's classifier
    for name in ("eval.linear.top1", "eval.linear.heldout_top1", "eval.in1k.top1", "eval.in_r.top1"):
        assert name in metrics, sorted(metrics)
    assert metrics["eval.in1k.top1"] == pytest.approx(metrics["eval.linear.top1"], abs=1e-3)  # the same head on val
    kids = children(client, run)
    stages = sorted(r.data.tags.get("vfm.stage") for r in kids)
    assert stages == ["curate"] + ["eval"] * 4 + ["pretrain"]  # linear, in1k, in_r, knn
    # paper 004's pool is sharded uncurated: nothing removed but what does not decode, and the report is written
    curated = next(r for r in kids if r.data.tags.get("vfm.stage") == "curate")
    assert curated.data.metrics["written"] == curated.data.metrics["kept"] > 0
    assert not any(k.startswith("removed.") and not k.startswith("removed.decode") for k in curated.data.metrics)
    assert any(a.path == "curation/report.json" for a in client.list_artifacts(curated.info.run_id, "curation"))
