"""Exports as MLflow models against the real `mlflow server`: a LoggedModel per export, the best seed of a
pipeline run registered as `vfm-<recipe>@candidate`, `vfm promote` moving `champion`, and `vfm evaluate`
reading `models:/vfm-<recipe>@champion`."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from vfm.cli import app
from vfm.errors import UserError
from vfm.recipes import load_recipe
from vfm.registry import (
    CANDIDATE,
    CHAMPION,
    EXPORT_TAG,
    best_export,
    log_export_model,
    model_name,
    promote,
    register_candidate,
    resolve_model_uri,
)
from vfm.tracking import open_run


def test_best_seed_registered_promoted_and_evaluated_from_the_registry(world, mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    recipe = load_recipe("vit-huge", profile="smoke")
    key = uuid.uuid4().hex[:8]
    parent = open_run(recipe, stage="pipeline", run_key=f"reg-{key}", uri=mlflow_uri)
    exports = world["exports"]  # two real fine-tune exports (seeds 0 and 1)
    for seed, (export, top1) in enumerate(zip(exports, (71.0, 74.5), strict=True)):
        train = open_run(recipe, stage="finetune", run_key=f"reg-{key}/ft/{seed}", parent_run_id=parent.run_id,
                         uri=mlflow_uri)
        model_id = log_export_model(client, train.run_id, export, name=f"vit-huge-finetune-seed{seed}",
                                    tags={"vfm.seed": str(seed)}, metrics={"train/loss": 1.0 + seed}, step=7)
        again = log_export_model(client, train.run_id, export, name="x", tags={}, metrics={}, step=7)
        assert again == model_id  # a restarted run does not make a second model
        model = client.get_logged_model(model_id)
        assert model.source_run_id == train.run_id and model.tags[EXPORT_TAG] == export
        assert model.status == LoggedModelStatus.READY
        assert [(m.key, m.value, m.step) for m in model.metrics] == [("train/loss", 1.0 + seed, 7)]
        train.end()
        ev = open_run(recipe, stage="eval", run_key=f"reg-{key}/eval/{seed}", parent_run_id=parent.run_id,
                      uri=mlflow_uri, extra_tags={EXPORT_TAG: export})
        ev.log_metrics({"eval.in1k.top1": top1})
        ev.end()

    assert best_export(client, parent.experiment_id, exports) == (exports[1], "eval.in1k.top1", 74.5)
    with pytest.raises(UserError, match="the best seed cannot be chosen"):  # the report then registers nothing
        best_export(client, parent.experiment_id, [str(tmp_path / "never-evaluated")])
    mv = register_candidate(client, recipe.id, exports[1], pipeline_run_id=parent.run_id)
    assert register_candidate(client, recipe.id, exports[1], pipeline_run_id=parent.run_id).version == mv.version
    name = model_name(recipe.id)
    assert client.get_model_version_by_alias(name, CANDIDATE).version == mv.version
    stored = client.get_model_version(name, mv.version)
    assert stored.source == f"models:/{client.get_run(mv.run_id).data.tags['vfm.model_id']}", stored
    with pytest.raises(UserError, match="has no version 'nope'"):
        promote(client, recipe.id, "nope")

    result = CliRunner().invoke(app, ["promote", recipe.id, parent.run_id, "--tracking-uri", mlflow_uri])
    assert result.exit_code == 0, result.output
    assert f"{name}@{CHAMPION} -> version {mv.version}" in result.output
    assert resolve_model_uri(f"models:/{name}@{CHAMPION}", mlflow_uri) == exports[1]
    assert resolve_model_uri(f"models:/{name}/{mv.version}", mlflow_uri) == exports[1]
    assert resolve_model_uri(exports[0], mlflow_uri) == exports[0]
    with pytest.raises(UserError, match="not in the model registry"):
        resolve_model_uri(f"models:/{name}@nobody", mlflow_uri)

    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["evaluate", f"models:/{name}@{CHAMPION}", "--suite", "in1k",
                                      "--data", f"in1k={world['data']['in1k']}", "--batch-size", "6",
                                      "--device", "cpu", "--out", str(out), "--tracking-uri", mlflow_uri,
                                      "--run-key", f"reg-{key}-champion"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["exports"][0]["location"] == exports[1]
    parent.end()
