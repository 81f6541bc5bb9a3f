"""Exports as MLflow models: each training export is a LoggedModel of its run; the best seed of a pipeline run
is registered as `vfm-<recipe>` with the alias `candidate`; `vfm promote` moves `champion` to it; and
`models:/vfm-<recipe>@<alias>` (or `/<version>`) resolves to the export for `vfm evaluate`.

Aliases, not stages: MLflow deprecated model stages for aliases (mlflow docs, "Model Registry workflows",
deprecation of stages in 2.9). The weights stay where training wrote them and in the run's `export/`
artifacts (`vfm.export.export_trained`); the model and its versions carry the export's URL (`vfm.export`),
which is what `vfm evaluate` reads.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import typer

from vfm.errors import UserError

log = logging.getLogger(__name__)

EXPORT_TAG = "vfm.export"  # on the LoggedModel, the training run and each model version
MODEL_ID_TAG = "vfm.model_id"  # on the training run: its export's LoggedModel
PIPELINE_TAG = "vfm.pipeline_run"  # on a model version: the pipeline run that registered it
CANDIDATE, CHAMPION = "candidate", "champion"
# the metric that picks a pipeline run's best seed: the first of these its evaluations logged (higher is better)
SELECTION_METRICS = ("eval.in1k.top1", "eval.knn.k20.top1", "eval.in_r.top1")


def model_name(recipe_id: str) -> str:
    return f"vfm-{recipe_id}"


def log_export_model(client: Any, run_id: str, export_url: str, *, name: str, tags: dict[str, str],
                     metrics: dict[str, float], step: int) -> str:
    """A READY LoggedModel for `export_url`, made by `run_id`, with `metrics` logged on the run and linked to the
    model (the UI's model page lists them); the run is tagged with the model's id. Returns the model id."""
    from mlflow.entities import LoggedModelStatus, Metric

    run = client.get_run(run_id)
    if run.data.tags.get(MODEL_ID_TAG):  # a restarted run that logged its model already
        return run.data.tags[MODEL_ID_TAG]
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       tags={EXPORT_TAG: export_url, **tags}, model_type="vfm-export")
    now = int(time.time() * 1000)
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step, model_id=model.model_id)
                                          for k, v in metrics.items()])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.set_tag(run_id, MODEL_ID_TAG, model.model_id)
    client.set_tag(run_id, EXPORT_TAG, export_url)
    return model.model_id


def best_export(client: Any, experiment_id: str, exports: list[str]) -> tuple[str, str, float]:
    """(export, metric, value) of the best of `exports` by the first SELECTION_METRICS their evaluation runs
    (tagged `vfm.export`) logged."""
    found: dict[str, dict[str, float]] = {e: {} for e in exports}
    for export in found:  # one query each: an experiment holds the evaluations of every pipeline run
        for run in client.search_runs([experiment_id], filter_string=f"tags.`vfm.stage` = 'eval' and "
                                      f"tags.`{EXPORT_TAG}` = '{export}'"):
            found[export].update(run.data.metrics)
    for metric in SELECTION_METRICS:
        scored = [(m[metric], e) for e, m in found.items() if metric in m]
        if scored:
            value, export = max(scored)
            return export, metric, value
    raise UserError(f"no evaluation run of {', '.join(exports)} logged any of {', '.join(SELECTION_METRICS)}; "
                    "the best seed cannot be chosen")


def register_candidate(client: Any, recipe_id: str, export_url: str, *, pipeline_run_id: str) -> Any:
    """Register `export_url` (a training export with its LoggedModel) as a new version of `vfm-<recipe>` and
    point the alias `candidate` at it. Registering the same export for the same pipeline run again returns
    that version."""
    from mlflow.exceptions import MlflowException

    name = model_name(recipe_id)
    try:
        client.create_registered_model(name, description=f"vfm {recipe_id}: exports of its pipeline runs")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(EXPORT_TAG) == export_url and mv.tags.get(PIPELINE_TAG) == pipeline_run_id:
            client.set_registered_model_alias(name, CANDIDATE, mv.version)
            return mv
    trained = client.search_runs([client.get_run(pipeline_run_id).info.experiment_id], max_results=1,
                                 filter_string=f"tags.`{EXPORT_TAG}` = '{export_url}' and tags.`vfm.stage` != 'eval'")
    train_run = trained[0] if trained else None
    if train_run is None or MODEL_ID_TAG not in train_run.data.tags:
        raise UserError(f"{export_url}: no training run of this experiment logged it as a model; "
                        "register exports of vfm training runs")
    model_id = train_run.data.tags[MODEL_ID_TAG]
    mv = client.create_model_version(name, source=f"models:/{model_id}", run_id=train_run.info.run_id,
                                     model_id=model_id, tags={EXPORT_TAG: export_url, PIPELINE_TAG: pipeline_run_id})
    client.set_registered_model_alias(name, CANDIDATE, mv.version)
    return mv


def promote(client: Any, recipe_id: str, run_or_version: str, alias: str = CHAMPION) -> Any:
    """Point `alias` of `vfm-<recipe>` at a version: given by number, or the one a pipeline run registered."""
    name = model_name(recipe_id)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise UserError(f"no registered model {name}; a pipeline run registers its best seed as {CANDIDATE}")
    chosen = [v for v in versions if v.version == run_or_version or v.tags.get(PIPELINE_TAG) == run_or_version]
    if not chosen:
        known = ", ".join(f"{v.version} (pipeline run {v.tags.get(PIPELINE_TAG, '?')})" for v in versions)
        raise UserError(f"{name} has no version {run_or_version!r} and none registered by that run; it has: {known}")
    mv = max(chosen, key=lambda v: int(v.version))
    client.set_registered_model_alias(name, alias, mv.version)
    return mv


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> str:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` → the export URL it names; anything else as is."""
    if not uri.startswith("models:/"):
        return uri
    from mlflow.exceptions import MlflowException

    from vfm.tracking import require_client

    client = require_client(tracking_uri, f"{uri}: a registry model needs the MLflow server")
    ref = uri.removeprefix("models:/")
    name, at, alias = ref.partition("@")
    try:
        if at:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = ref.rpartition("/")
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise UserError(f"{uri}: not in the model registry ({exc.message}); `vfm promote` sets {CHAMPION}, a "
                        f"pipeline run sets {CANDIDATE}") from None
    if EXPORT_TAG not in mv.tags:
        raise UserError(f"{uri}: version {mv.version} of {name} was not registered by vfm (no {EXPORT_TAG} tag)")
    return mv.tags[EXPORT_TAG]


def register(app: typer.Typer) -> None:
    @app.command("promote")
    def promote_cmd(
        recipe_id: Annotated[str, typer.Argument(help="Recipe id, e.g. vit-huge (its model is vfm-<recipe>).")],
        run: Annotated[str, typer.Argument(help="The pipeline run (MLflow parent run id) whose candidate to "
                                                "promote, or a version number of vfm-<recipe>.")],
        alias: Annotated[str, typer.Option("--alias", help="The alias to move.")] = CHAMPION,
        tracking_uri: Annotated[str | None, typer.Option("--tracking-uri",
                                                         help="MLflow server (default: $MLFLOW_TRACKING_URI).")] = None,
    ) -> None:
        """Point vfm-<recipe>@champion (or --alias) at the version a pipeline run registered as its candidate."""
        from vfm.tracking import require_client

        mv = promote(require_client(tracking_uri, "vfm promote changes the MLflow registry"), recipe_id, run, alias)
        print(f"{mv.name}@{alias} -> version {mv.version} ({mv.tags.get(EXPORT_TAG, mv.source)}); "
              f"evaluate it with `vfm evaluate models:/{mv.name}@{alias} ...`")
