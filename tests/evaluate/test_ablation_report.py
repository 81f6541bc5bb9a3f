"""The ablation report: every cell in the table, the heatmap drawn over kernel × expansion, and both logged to
the parent MLflow run with each cell's metrics."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vfm.errors import UserError
from vfm.evaluate.ablation import (
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    CellRow,
    heatmap,
    log_report,
    mean_metrics,
    table,
)
from vfm.tracking import TrackedRun


def _rows() -> list[CellRow]:
    return [CellRow(f"k{k}-r{r}", k, float(r), 1_000_000 * k * r, 0.1 * k * r, mean_metrics(
        [{"top1": 50 + k + r, "top5": 90.0}, {"top1": 52 + k + r, "top5": 91.0}]), 2)
        for k in (3, 7) for r in (2, 4)]


def test_table_has_every_cell_with_mean_and_spread():
    md = table(_rows())
    for cell in ("k3-r2", "k3-r4", "k7-r2", "k7-r4"):
        assert f"| {cell} |" in md
    assert "| k7-r4 | 7 | 4 | 28.00 | 2.800 | 62.00 ± 1.41 | 90.50 ± 0.71 | 2 |" in md


def test_heatmap_and_log_to_the_parent_run(mlflow_uri, tmp_path):
    png = heatmap(_rows(), tmp_path / "h.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    with pytest.raises(UserError, match="no evaluated cells"):
        heatmap([], tmp_path / "none.png", title="t")
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.create_run(client.create_experiment(f"vfm-test-ablation-{uuid.uuid4().hex[:8]}")).info.run_id
    md = log_report(TrackedRun(client=client, run_id=run), _rows(), title="grid")
    assert md.startswith("# grid") and "| k3-r2 |" in md
    names = {a.path for a in client.list_artifacts(run)}
    assert {REPORT_MD, REPORT_PNG, REPORT_JSON} <= names
    rows = json.loads(Path(client.download_artifacts(run, REPORT_JSON, str(tmp_path))).read_text())
    assert [r["cell"] for r in rows] == ["k3-r2", "k3-r4", "k7-r2", "k7-r4"]
    metrics = client.get_run(run).data.metrics
    assert metrics["ablation.k7-r4.top1"] == pytest.approx(62.0) and metrics["ablation.k3-r2.params_m"] == 6.0
