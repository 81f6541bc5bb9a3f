"""Paper 002's ablation end to end on this machine: `vfm pipeline run convnext-xl-ablation --local` shards the
digits' IN-1K subset once, trains and evaluates the smoke profile's 2 × 2 grid (ConvNeXt-Atto, kernel {3, 7} ×
MLP ratio {2, 4}) as jobs through the launcher's local backend, and logs one report to the parent MLflow run.
The cells must really be different networks, the report must carry every cell, and `vfm compare --ablation`
must draw the same grid back from MLflow (the README's figure docs/ablation.png)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from vfm.cli import app
from vfm.evaluate.ablation import REPORT_JSON, REPORT_PNG, rows_from_mlflow
from vfm.export import load_export
from vfm.models import count_params
from vfm.pipeline.local import run_local

REPO = Path(__file__).resolve().parents[2]
README_FIGURE = REPO / "docs" / "ablation.png"
CELLS = ["k3-r2", "k3-r4", "k7-r2", "k7-r4"]


@pytest.fixture(scope="module")
def ablation(services, tmp_path_factory):
    result = run_local("convnext-xl-ablation", workdir=tmp_path_factory.mktemp("ablation"), profile="smoke")
    assert result.state == "FINISHED", result.log_path.read_text()[-4000:]
    return result, MlflowClient(tracking_uri=services.mlflow_uri)


def test_the_report_carries_every_cell_of_the_grid(ablation, tmp_path):
    result, client = ablation
    for cell in CELLS:
        assert f"| {cell} |" in result.report, result.report
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["vfm.pipeline"] == "convnext-xl-ablation" and parent.info.run_name == \
        "convnext-xl-ablation-pipeline"
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} >= {REPORT_PNG, REPORT_JSON}
    rows = json.loads(Path(client.download_artifacts(result.parent_run_id, REPORT_JSON, str(tmp_path))).read_text())
    assert [r["cell"] for r in rows] == CELLS
    for r in rows:  # the digits are easy: every cell learns, far above the 20 % of chance on 5 classes
        assert r["metrics"]["top1"] > 60, rows
        assert parent.data.metrics[f"ablation.{r['cell']}.top1"] == pytest.approx(r["metrics"]["top1"])


def test_cells_are_different_networks_trained_as_their_own_runs(ablation):
    result, client = ablation
    children = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    trains = {r.data.tags["vfm.cell"]: r for r in children if r.data.tags.get("vfm.stage") == "pretrain"}
    evals = {r.data.tags["vfm.cell"]: r for r in children if r.data.tags.get("vfm.stage") == "eval"}
    assert sorted(trains) == sorted(evals) == CELLS
    params = {}
    for cell, run in evals.items():
        assert trains[cell].info.run_name == f"convnext-xl-{cell}-seed0"
        model, meta = load_export(run.data.tags["vfm.export"])
        kernel, ratio = int(cell[1]), float(cell[-1])
        assert meta.kwargs["kernel_sizes"] == kernel and meta.kwargs["mlp_ratio"] == ratio
        block = model.stages[0].blocks[0]
        channels = block.conv_dw.weight.shape[0]
        assert tuple(block.conv_dw.weight.shape) == (channels, 1, kernel, kernel)
        assert block.mlp.fc1.weight.shape[0] == int(ratio * channels)
        params[cell] = count_params(model)
    assert len(set(params.values())) == 4, params


def test_compare_redraws_the_grid_from_mlflow(ablation, services, tmp_path):
    result, client = ablation
    rows = rows_from_mlflow(client, result.parent_run_id)
    logged = json.loads(Path(client.download_artifacts(result.parent_run_id, REPORT_JSON, str(tmp_path))).read_text())
    assert [(r.cell, r.params, round(r.metrics["top1"], 6)) for r in rows] == \
        [(r["cell"], r["params"], round(r["metrics"]["top1"], 6)) for r in logged]
    out = tmp_path / "ablation.png"
    res = CliRunner().invoke(app, ["compare", "--ablation", result.parent_run_id, "--tracking-uri",
                                   services.mlflow_uri, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| k7-r4 | 7 | 4 |" in res.output and out.read_bytes()[:4] == b"\x89PNG"
    README_FIGURE.parent.mkdir(exist_ok=True)
    shutil.copyfile(out, README_FIGURE)
    bad = CliRunner().invoke(app, ["compare", "--ablation", children_of_nothing(client, result), "--tracking-uri",
                                   services.mlflow_uri, "--out", str(tmp_path / "x.png")])
    assert bad.exit_code != 0 and "no ablation cells" in str(bad.exception) + bad.output


def children_of_nothing(client: MlflowClient, result) -> str:
    """A run that is not an ablation's parent: one of its own training runs."""
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    return runs[0].info.run_id
