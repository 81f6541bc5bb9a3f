"""The README's main job: `vfm pipeline run ID --local --profile smoke` runs the recipe's whole DAG through
kfp.local (shard → [ImageNet-C] → pretrain → fine-tune per seed → evaluate per suite → aggregate → report)
against the real S3 and MLflow servers on loopback, on the local default data (the digits in the official
archive layouts), and the metrics end up on the MLflow server.

The vit-huge test runs the README's command itself, as a newcomer would, in every mode: it must learn
(≥ 90 % top-1) and print a progress list, not the KFP logs. It also draws `docs/main-job.png`, the
figure the README shows. VFM_SCALE=reduced (CI default) shortens the DINOv2 run with --set."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
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


@pytest.mark.scale
def test_readme_main_job_learns_and_prints_a_progress_list(services, tmp_path):
    out = subprocess.run([*_readme_main_job(), "--workdir", str(tmp_path)], capture_output=True, text=True,
                         timeout=1500, cwd=REPO)  # the session's S3 + MLflow through the environment
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    # a line per task, then the table: not the ~1,800 lines of KFP executor and trainer output
    assert len(lines) < 80, out.stdout
    tasks = [line.split() for line in lines if re.match(r"\s+SUCCESS\s+\S+\s+[\d.]+ s$", line)]
    names = [t[1] for t in tasks]
    assert names.count("pretrain") == 1 and names.count("finetune") == 3 and "report" in names, out.stdout
    assert "executor_input" not in out.stdout and "vfm.train.loop" not in out.stdout
    (log,) = re.findall(r"KFP and trainer logs: (\S+)", out.stdout)
    text = Path(log).read_text()
    assert "Executing task" in text and "vfm.train.loop: step" in text
    assert "paper, full scale: 89.1" in out.stdout  # at smoke scale the claim is a reference, not a target

    (run_id,) = re.findall(r"/runs/([0-9a-f]{32})", out.stdout)
    client = MlflowClient(tracking_uri=services.mlflow_uri)
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

    rows = [r for r in collect_runs(["vit-huge"], tracking_uri=services.mlflow_uri)
            if run_id in (r.run_id, r.parent_run_id)]
    assert [r.stage for r in rows].count("pipeline") == 1
    assert render_png(rows, README_FIGURE).stat().st_size > 10_000


@pytest.mark.scale
def test_dinov2_giant_smoke_dag_end_to_end(services, tmp_path):
    seen = []  # `--serve` hook: called with the outcome while the services are still up
    result = run_local("dinov2-giant", workdir=tmp_path, profile="smoke",
                       overrides=[] if FULL else REDUCED_SETS["dinov2-giant"], while_serving=seen.append)
    assert result.state == "FINISHED", result
    assert seen == [result] and result.embedded_store is None  # configured services, not embedded ones
    client = MlflowClient(tracking_uri=services.mlflow_uri)
    run = client.get_run(result.parent_run_id)
    assert "eval.knn.k20.top1" in run.data.metrics and run.data.metrics["eval.num_seeds"] == 1
    stages = sorted(r.data.tags.get("vfm.stage") for r in children(client, run))
    assert stages == ["eval", "pretrain"]
