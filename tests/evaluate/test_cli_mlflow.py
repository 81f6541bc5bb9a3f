"""`vfm evaluate` logs to the real MLflow server (stable metric names, claims, the JSON artifact) and
`vfm compare` reads it back into a table and a PNG."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from vfm.cli import app
from vfm.data.manifest import Manifest
from vfm.evaluate.compare import collect_runs
from vfm.recipes import load_recipe
from vfm.tracking import open_run


def test_evaluate_logs_to_mlflow_and_compare_renders(world, mlflow_uri, tmp_path):
    key = f"eval-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "results.json"
    data = world["data"]
    args = ["evaluate", *world["exports"], "--suite", "in1k,in_r,knn",
            "--data", f"in1k={data['in1k']}", "--data", data["in_r"], "--data", f"knn_train={data['knn_train']}",
            "--knn-k", "1,3,20", "--batch-size", "6", "--device", "cpu", "--out", str(out),
            "--tracking-uri", mlflow_uri, "--run-key", key]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "eval.in1k.top1" in result.output and "89.1" in result.output  # vit-huge claims top1 89.1

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("vfm/vit-huge")
    [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.`vfm.run_key` = '{key}'")
    saved = json.loads(out.read_text())
    for name in ("eval.in1k.top1", "eval.in1k.top5", "eval.in1k.top1.std", "eval.in_r.top1",
                 "eval.knn.k20.top1", "eval.knn.k1.top5", "eval.num_seeds"):
        assert run.data.metrics[name] == pytest.approx(saved["metrics"][name]), name
    assert run.data.metrics["eval.num_seeds"] == 2
    assert run.info.status == "FINISHED"
    assert run.data.tags["vfm.stage"] == "eval" and run.data.tags["claim.top1"] == "89.1"
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert {json.loads(i.dataset.source)["uri"] for i in inputs} == {
        str(Manifest.load(u).location) for u in (data["in1k"], data["in_r"], data["knn_train"])}
    assert {i.tags[0].value for i in inputs} == {"evaluation"}
    assert saved["claims"]["eval.in1k.top1"]["claim"] == 89.1
    assert saved["data"]["in1k"] == data["in1k"] and len(saved["exports"]) == 2
    artifact = client.download_artifacts(run.info.run_id, "eval/results.json", str(tmp_path))
    assert json.loads(open(artifact).read())["metrics"] == saved["metrics"]

    # a training run with a loss curve beside it, as the trainers log it
    train = open_run(load_recipe("vit-huge"), stage="finetune", run_key=f"{key}-train", uri=mlflow_uri)
    for step, loss in enumerate([2.3, 1.9, 1.4, 1.1]):
        train.log_metrics({"train.loss": loss}, step=step)
    train.end()

    png = tmp_path / "compare.png"
    result = CliRunner().invoke(app, ["compare", "vit-huge", "--tracking-uri", mlflow_uri, "--out", str(png),
                                      "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output[: result.output.rindex("]") + 1])
    mine = [r for r in table if r["stage"] == "eval" and r["IN-1K top-1"].startswith(
        f"{saved['metrics']['eval.in1k.top1']:.2f}")]
    assert mine and "in1k.top1:" in mine[0]["claim vs achieved"] and "/ 89.1" in mine[0]["claim vs achieved"]
    with Image.open(png) as img:
        assert img.size[0] > 600 and img.size[1] > 300
    assert "imagenet-r-val@" in mine[0]["datasets"] and mine[0]["datasets"].count("(evaluation)") == 3
    # the HTML report beside the PNG: the same table, the plot inlined, nothing fetched from elsewhere
    report = (tmp_path / "compare.html").read_text()
    assert f"report: {tmp_path / 'compare.html'}" in result.output.replace("\n", "")
    assert "<th>claim vs achieved</th>" in report and "/ 89.1" in report and mine[0]["run"] in report
    assert report.count('src="data:image/png;base64,') == 1 and "http" not in report.replace("http-equiv", "")
    rows = collect_runs(["vit-huge"], tracking_uri=mlflow_uri)
    [train_row] = [r for r in rows if r.run_id == train.run_id]
    assert train_row.curves["train.loss"] == [(0, 2.3), (1, 1.9), (2, 1.4), (3, 1.1)]


def test_compare_errors(mlflow_uri):
    result = CliRunner().invoke(app, ["compare", "no-such-recipe", "--tracking-uri", mlflow_uri])
    assert result.exit_code != 0 and "no MLflow experiment 'vfm/no-such-recipe'" in str(result.exception)
