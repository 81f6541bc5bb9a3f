"""Tracking never blocks or kills training: the real MLflow server stopped mid-run and brought back; the run
finishes, and the metrics logged while it was down arrive when it returns."""

from __future__ import annotations

import contextlib

from mlflow.tracking import MlflowClient

from tests.helpers.training import MemoryTask
from tests.train.test_loop import _spec, world1  # noqa: F401  (fixture)
from vfm.services import free_port, mlflow_server
from vfm.train.loop import train


def test_training_outlives_an_mlflow_outage(world1, tmp_path, s3_endpoint, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while it is down (the default backs off)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    workdir, port = tmp_path / "mlflow", free_port()
    servers = contextlib.ExitStack()
    uri = servers.enter_context(mlflow_server(workdir, s3_endpoint, port))
    seen = {}

    class Outage(MemoryTask):
        def after_update(self, model, step):
            if step == 2:
                servers.close()  # the server goes away after update 3 ...
            if step == 8:
                seen["down_at_9"] = True  # ... updates 4-9 log into the sender's queue ...
                servers.enter_context(mlflow_server(workdir, s3_endpoint, port))  # ... and it comes back
            return {"train/extra": float(step)}

    try:
        result = train(Outage(), _spec(tmp_path, tracking_uri=uri, run_key="outage"))
        client = MlflowClient(tracking_uri=uri)
        steps = [m.step for m in client.get_metric_history(result.run_id, "train/loss")]
        status = client.get_run(result.run_id).info.status
    finally:
        servers.close()
    assert result.step == 12 and result.export is not None and seen
    assert sorted(steps) == list(range(1, 13))  # every logged step, those of the outage included
    assert status == "FINISHED"
