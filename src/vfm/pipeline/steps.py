"""What each pipeline step does. The KFP components in `components/` are one call into this module.

Run identity: every step receives the KFP run id (`dsl.PIPELINE_JOB_ID_PLACEHOLDER`). The MLflow
parent run is keyed by it (`<run>/pipeline`), so the exit handler finds it without a data dependency,
and PyTorchJob names are derived from it (unique per run, stable across retries of one task).

Caching of training is keyed on content, not on KFP inputs: KFP's cache key includes every input
value, and the run id (needed for the job name and MLflow nesting) differs per run. So a training step
writes to `<runs_prefix>/<recipe>/<content key>/...` where the key hashes the data manifest's sha256, the
trainer image and the resolved recipe (+ stage, seed, init); when that export already exists, the
step returns it without launching a job. Sharding is cached by KFP itself (its inputs fully determine
its output).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vfm.errors import UserError

PIPELINE_STAGE = "pipeline"


def use_endpoints(mlflow_uri: str = "", s3_endpoint: str = "") -> dict[str, str]:
    """Point this process (and what it starts) at the run's MLflow and S3; empty keeps the environment's."""
    env = {}
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    if s3_endpoint:
        env["AWS_ENDPOINT_URL_S3"] = env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    os.environ.update(env)
    return {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")
            if os.environ.get(k)}


def recipe_digest(recipe: Any) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _recipe(recipe_id: str, profile: str, overrides: list[str] | None):
    from vfm.recipes import load_recipe

    return load_recipe(recipe_id, list(overrides or []), profile)


def pipeline_run_key(run_id: str) -> str:
    return f"{run_id}/{PIPELINE_STAGE}"


# --- start / finish -----------------------------------------------------------------------------
def start_run(*, recipe_id: str, profile: str, overrides: list[str], run_id: str, mlflow_uri: str = "",
              s3_endpoint: str = "", pipeline: str = "") -> tuple[str, str]:
    """Open the MLflow parent run of this pipeline run; returns (parent run id, resolved-recipe digest).
    Under KFP's MLflow plugin the parent is the plugin's run of this pipeline run, tagged as vfm's.
    `pipeline`: the pipeline's id (`convnext-xl-ablation`), tagged `vfm.pipeline` and naming the run."""
    from vfm.recipes import flatten
    from vfm.tracking import RUN_KEY_TAG, TrackedRun, kfp_plugin_run, open_run, recipe_tags

    use_endpoints(mlflow_uri, s3_endpoint)
    recipe = _recipe(recipe_id, profile, overrides)
    digest = recipe_digest(recipe)
    pipeline = pipeline or recipe_id
    tags = {"vfm.kfp_run_id": run_id, "vfm.recipe_digest": digest, "vfm.pipeline": pipeline}
    plugin = kfp_plugin_run()
    if plugin is not None:
        from mlflow.tracking import MlflowClient

        from vfm.tracking import tracking_uri

        run = TrackedRun(client=MlflowClient(tracking_uri=tracking_uri()), run_id=plugin.pipeline_run_id,
                         experiment_id=plugin.experiment_id)
        run.set_tags({**recipe_tags(recipe), "vfm.stage": PIPELINE_STAGE, RUN_KEY_TAG: pipeline_run_key(run_id), **tags})
        run.log_params(flatten(recipe))
        print(f"MLflow parent run {run.run_id}: KFP's MLflow plugin run of this pipeline run "
              f"(experiment {plugin.experiment_id})")
        return run.run_id, digest
    run = open_run(recipe, stage=PIPELINE_STAGE, run_key=pipeline_run_key(run_id), run_name=f"{pipeline}-pipeline",
                   extra_tags=tags)
    if not run.enabled:
        raise UserError("MLflow is not configured: pass the pipeline parameter mlflow_uri or set MLFLOW_TRACKING_URI")
    print(f"MLflow parent run {run.run_id} in experiment vfm/{recipe_id}")
    return run.run_id, digest


def stage_parent(parent_run_id: str) -> str:
    """The run a stage's (or evaluation's) MLflow run nests under: under KFP's MLflow plugin, the plugin's
    run of the launching task (itself under the pipeline run); otherwise vfm's pipeline parent."""
    from vfm.tracking import kfp_plugin_run

    plugin = kfp_plugin_run()
    return plugin.task_run_id if plugin is not None else parent_run_id


def finish(*, state: str, error: str, recipe_id: str, run_id: str, namespace: str, backend: str,
           mlflow_uri: str = "") -> str:
    """Exit handler: close the parent run (FAILED unless the pipeline succeeded); on failure delete every
    PyTorchJob the run left behind (cluster backend; local replicas die with their step)."""
    from mlflow.tracking import MlflowClient

    from vfm.launch.job import label_value
    from vfm.tracking import RUN_KEY_TAG, experiment_name, kfp_plugin_run, tracking_uri

    use_endpoints(mlflow_uri)
    ok = state.upper() in ("SUCCEEDED", "SUCCESS")
    lines = [f"pipeline state {state}" + (f": {error}" if error else "")]
    uri = tracking_uri()
    if uri:
        client = MlflowClient(tracking_uri=uri)
        plugin = kfp_plugin_run()
        exp_id = plugin.experiment_id if plugin else getattr(client.get_experiment_by_name(experiment_name(recipe_id)),
                                                             "experiment_id", None)
        runs = client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{pipeline_run_key(run_id)}'") if exp_id else []
        for run in runs:
            if not ok:
                client.set_tag(run.info.run_id, "vfm.failure", (error or state)[:5000])
            if plugin is not None:  # the plugin owns its run's status and closes it with the KFP run
                lines.append(f"MLflow run {run.info.run_id} is KFP's MLflow plugin run; the plugin closes it")
                continue
            client.set_terminated(run.info.run_id, status="FINISHED" if ok else "FAILED")
            lines.append(f"MLflow run {run.info.run_id} marked {'FINISHED' if ok else 'FAILED'}")
        if not runs:
            lines.append("no MLflow parent run found (the pipeline failed before creating it)")
    if not ok and backend == "cluster":
        from vfm.launch.cluster import ClusterBackend, current_namespace

        deleted = ClusterBackend.from_environment().delete_run_jobs(label_value(run_id), namespace or current_namespace())
        lines.append(f"deleted leftover PyTorchJobs: {', '.join(deleted) or 'none'}")
    print("\n".join(lines))
    return "\n".join(lines)


# --- data ---------------------------------------------------------------------------------------
def shard(*, dataset: str, source: str, data_prefix: str, name: str, seed: int = 0, labels: str = "", shard_size: str = "1GB",
          workers: int = 4, s3_endpoint: str = "", subset_classes: int = 0, subset_fraction: float = 1.0,
          subset_seed: int = 0, subset_class_list: list[str] | None = None, split: str = "") -> tuple[str, str]:
    """`vfm shard` to `<data_prefix>/<name>` (resumable; a complete manifest there is reused); returns
    (manifest URL, sha256). `subset_classes` > 0 shards only that class subset (`vfm shard --subset-classes`),
    `subset_class_list` exactly those classes (`--subset-class-file`)."""
    import tempfile

    from vfm import storage

    dest = storage.join(data_prefix, name)
    cmd = ["shard", dataset, "--source", source, "--dest", dest, "--seed", str(seed), "--shard-size", shard_size,
           "--workers", str(workers)]
    if labels:
        cmd += ["--labels", labels]
    if split:
        cmd += ["--split", split]
    if subset_classes or subset_class_list:
        cmd += ["--subset-fraction", repr(float(subset_fraction)), "--subset-seed", str(subset_seed)]
    if not subset_class_list:
        if subset_classes:
            cmd += ["--subset-classes", str(subset_classes)]
        return _run_vfm(cmd, dest, s3_endpoint)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(subset_class_list) + "\n")
        f.flush()
        return _run_vfm([*cmd, "--subset-class-file", f.name], dest, s3_endpoint)


def shard_subset(*, recipe_id: str, profile: str, overrides: list[str], dataset: str, source: str, data_prefix: str,
                 labels: str = "", shard_size: str = "1GB", workers: int = 4, s3_endpoint: str = "") -> tuple[str, str]:
    """The ablation's IN-1K subset of `dataset` (in1k train or in1k-val) as the resolved recipe's
    `ablation.subset` says, to `<data_prefix>/<dataset>-<N>c-f<fraction>-s<seed>` (`-list<sha>` for a class
    list); val keeps every image of the subset's classes (the fraction thins training data only)."""
    recipe = _recipe(recipe_id, profile, overrides)
    if recipe.ablation is None:
        raise UserError(f"recipe {recipe_id} has no `ablation:` block to take a subset from")
    sub = recipe.ablation.subset
    fraction = 1.0 if dataset == "in1k-val" else sub.fraction
    drawn = (f"list{hashlib.sha256(' '.join(sorted(sub.classes)).encode()).hexdigest()[:8]}" if sub.classes
             else f"s{sub.seed}")
    name = f"{dataset}-{sub.num_classes}c-f{fraction:g}-{drawn}"
    return shard(dataset=dataset, source=source, data_prefix=data_prefix, name=name, labels=labels,
                 shard_size=shard_size, workers=workers, s3_endpoint=s3_endpoint, subset_classes=sub.num_classes,
                 subset_fraction=fraction, subset_seed=sub.seed, subset_class_list=list(sub.classes) or None)


def imagenet_c(*, source: str = "", val_manifest: str, data_prefix: str, name: str = "imagenet-c", corruptions: str = "",
               severities: str = "", workers: int = 1, shard_size: str = "1GB", s3_endpoint: str = "") -> tuple[str, str]:
    """ImageNet-C to `<data_prefix>/<name>`; returns (manifest URL, sha256). With `source` (the official Zenodo
    tarballs blur/digital/extra/noise/weather.tar, or their extracted tree) they are sharded as published;
    without, the corruptions are regenerated from the sharded IN-1K val set (`vfm make-imagenet-c`)."""
    from vfm import storage

    dest = storage.join(data_prefix, name)
    if source:
        if corruptions or severities:
            raise UserError("imagenet_c_corruptions / imagenet_c_severities restrict a regeneration; with "
                            f"imagenet_c_source={source} the official set is sharded whole. Clear one of them")
        return shard(dataset="imagenet-c", source=source, data_prefix=data_prefix, name=name, shard_size=shard_size,
                     workers=workers, s3_endpoint=s3_endpoint)
    cmd = ["make-imagenet-c", "--source", val_manifest, "--dest", dest, "--workers", str(workers)]
    if corruptions:
        cmd += ["--corruptions", corruptions]
    if severities:
        cmd += ["--severities", severities]
    return _run_vfm(cmd, dest, s3_endpoint)


# `vfm shard` layouts → `vfm curate` source kinds, for a pipeline's own pool (`pretrain_source`) and eval sets
CURATE_KINDS = {"folder": "folder", "in22k-fall11": "in22k", "in21k-winter21": "in22k", "in1k": "in22k", "wds": "wds"}


def curate_kind(layout: str) -> str:
    """The `vfm curate` source kind that reads a `vfm shard` layout's archive as unlabelled images."""
    return CURATE_KINDS.get(layout, "tar")


def curate(*, recipe_id: str, profile: str, overrides: list[str], data_prefix: str, sources: list[str],
           eval_sets: list[str], run_id: str, parent_run_id: str, image: str, namespace: str = "",
           backend: str = "cluster", timeout_hours: float = 24.0, secret: str = "vfm-credentials",
           mlflow_uri: str = "", s3_endpoint: str = "") -> tuple[str, str]:
    """`vfm curate` of the recipe's pools to `<data_prefix>/<curate.dataset>`; returns (manifest URL, sha256).
    `sources` / `eval_sets` (NAME=KIND:PATH) replace the recipe's; empty: the recipe's, under the raw-data volume.
    On a cluster it runs as a KubeRay RayJob of the trainer image (its pods mount the raw-data volume through the
    `vfm-ray` PodTemplate); locally on a Ray started in this process."""
    from vfm import storage
    from vfm.data.manifest import MANIFEST_NAME
    from vfm.pipeline import config

    env = use_endpoints(mlflow_uri, s3_endpoint)
    recipe = _recipe(recipe_id, profile, overrides)
    if recipe.curate is None:
        raise UserError(f"recipe {recipe_id} has no `curate:` block")
    dest = storage.join(data_prefix, recipe.curate.dataset)
    cmd = ["curate", recipe_id, "--dest", dest, "--profile", profile, "--raw-root", config.RAW_DATA_MOUNT]
    for o in overrides:
        cmd += ["--set", o]
    for s in sources:
        cmd += ["--source", s]
    for s in eval_sets:
        cmd += ["--eval-set", s]
    if parent_run_id:
        cmd += ["--parent-run-id", stage_parent(parent_run_id)]
    if backend == "local":
        return _run_vfm(cmd, dest, s3_endpoint)
    from vfm.launch import JobFailed, job_name, run_job
    from vfm.launch.cluster import ClusterBackend
    from vfm.launch.job import RUN_LABEL, label_value
    from vfm.launch.rayjob import RAY_POD_TEMPLATE, build_rayjob

    ns = namespace or _namespace(backend)
    cfg = recipe.curate
    manifest = build_rayjob(
        name=job_name(recipe_id, "curate", run_id), namespace=ns, image=image, entrypoint=["vfm", *cmd],
        workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, memory_per_worker=cfg.memory_per_worker,
        gpus_per_worker=cfg.gpus_per_worker if cfg.embedding.enabled else 0,
        pod_template=ClusterBackend.from_environment().pod_template(ns, RAY_POD_TEMPLATE),
        labels={RUN_LABEL: label_value(run_id), "vfm.io/stage": "curate"}, env=env, secret=secret,
        timeout_s=int(timeout_hours * 3600))
    result = run_job(manifest, backend="cluster", timeout_s=timeout_hours * 3600, max_restarts=0, env=env)
    url = storage.join(dest, MANIFEST_NAME)
    if not storage.exists(url):
        raise JobFailed(result.name, "NoManifest", f"the RayJob succeeded but wrote no manifest at {url}")
    digest, _ = storage.sha256_of(url)
    print(f"curated in {result.seconds:.0f} s: {url}")
    return url, digest


def _run_vfm(cmd: list[str], dest: str, s3_endpoint: str) -> tuple[str, str]:
    from vfm import storage
    from vfm.cli import app
    from vfm.data.manifest import MANIFEST_NAME

    use_endpoints(s3_endpoint=s3_endpoint)
    print("+ vfm " + " ".join(cmd), flush=True)
    app(cmd, standalone_mode=False)  # the `vfm` command itself, in this process (errors propagate)
    url = storage.join(dest, MANIFEST_NAME)
    if not storage.exists(url):
        raise RuntimeError(f"vfm {cmd[0]} stopped before writing {url}; rerun the step to resume")
    digest, _ = storage.sha256_of(url)
    return url, digest


# --- training -----------------------------------------------------------------------------------
def train(*, recipe_id: str, stage: str, profile: str, overrides: list[str], data: str, data_digest: str,
          recipe_sha: str, image: str, run_id: str, parent_run_id: str, runs_prefix: str, init: str = "",
          seed: int = -1, namespace: str = "", backend: str = "cluster", timeout_hours: float = 24.0,
          secret: str = "vfm-credentials", mlflow_uri: str = "", s3_endpoint: str = "", knn_train: str = "",
          knn_val: str = "", queue: str = "", task_config: Any = None, launcher: str = "pytorchjob",
          cell: str = "") -> str:
    """Run one training stage as a PyTorchJob or TrainJob (`launcher`; cluster or local backend); returns
    its export URL. `cell`: the ablation cell this run is (its overrides are in `overrides`), "" for none."""
    from vfm import storage
    from vfm.export import META
    from vfm.launch import JobFailed, trainer_args

    env = use_endpoints(mlflow_uri, s3_endpoint)
    recipe = _recipe(recipe_id, profile, overrides)
    if recipe_digest(recipe) != recipe_sha:
        raise UserError(f"the resolved recipe {recipe_id} differs from the one the pipeline started with "
                        "(different vfm versions in the component images?); rebuild the images from one commit")
    seed_arg = None if seed < 0 else seed
    key = hashlib.sha256(json.dumps([recipe_sha, stage, data_digest, image, init, seed_arg]).encode()).hexdigest()[:16]
    out = storage.join(storage.join(storage.join(runs_prefix, recipe_id), key), stage)
    if seed_arg is not None:
        out = storage.join(out, f"seed-{seed_arg}")
    export = storage.join(out, "export")
    if storage.exists(storage.join(export, META)):
        print(f"{export} already holds this stage's export (same data, image and recipe): reusing it")
        return export
    run_key = f"{key}/{stage}"
    opts = train_options(recipe_id, f"{stage}-{cell}" if cell else stage, run_id=run_id, seed=seed_arg,
                         namespace=namespace or _namespace(backend),
                         image=image, secret=secret, env=env, timeout_hours=timeout_hours, queue=queue,
                         run_key=run_key, data_digest=data_digest, recipe_sha=recipe_sha, task_config=task_config)
    from vfm.launch.job import stage_hardware

    result = _run_as_job(stage_hardware(recipe, stage), stage, opts, backend=backend, launcher=launcher,
                         timeout_hours=timeout_hours, env=env,
                         args_for=lambda w:
                         trainer_args(recipe_id, stage, data=data, out=out, profile=profile, overrides=overrides,
                                      init=init or None, seed=seed_arg, run_key=run_key,
                                      parent_run_id=stage_parent(parent_run_id) if parent_run_id else None,
                                      knn_train=knn_train or None,
                                      knn_val=knn_val or None, workers=w,
                                      run_name=f"{recipe_id}-{cell}-seed{seed_arg}" if cell else None,
                                      tags={"vfm.cell": cell} if cell else None))
    if not storage.exists(storage.join(export, META)):
        raise JobFailed(result.name, "NoExport", f"the job succeeded but wrote no export at {export}")
    restarts = "restarts counted by its JobSet" if result.restarts is None else f"{result.restarts} restarts"
    print(f"{stage} done in {result.seconds:.0f} s ({restarts}): {export}")
    return export


def train_options(recipe_id: str, stage: str, *, run_id: str, seed: int | None, namespace: str, image: str,
                  secret: str, env: dict[str, str], timeout_hours: float, queue: str = "", run_key: str = "",
                  data_digest: str = "", recipe_sha: str = "", task_config: Any = None) -> Any:
    """The JobOptions of one training stage's PyTorchJob (what `train` launches and `vfm preflight` checks)."""
    from vfm.launch import JobOptions, job_name
    from vfm.launch.job import RUN_KEY_ANNOTATION, RUN_LABEL, label_value

    # a KFP dsl.TaskConfig (K8s-JSON fragments of the pipeline task's settings) or a plain dict
    tc = task_config if isinstance(task_config, dict) else vars(task_config) if task_config is not None else {}
    return JobOptions(
        name=job_name(recipe_id, stage, run_id, seed), namespace=namespace, image=image, args=[],
        secret=secret or None, env=env, active_deadline_seconds=int(timeout_hours * 3600),
        labels={RUN_LABEL: label_value(run_id), "vfm.io/stage": stage},
        annotations={RUN_KEY_ANNOTATION: run_key, "vfm.io/data-sha256": data_digest, "vfm.io/recipe-sha256": recipe_sha},
        resources=tc.get("resources"), node_selector=tc.get("node_selector"), tolerations=tc.get("tolerations"),
        gang=_queue(queue))


def eval_options(recipe_id: str, suite: str, *, run_id: str, seed: int, namespace: str, image: str, secret: str,
                 env: dict[str, str], timeout_hours: float, ranks: int, queue: str = "") -> Any:
    """The JobOptions of one evaluation job (one node; `ranks` processes)."""
    from vfm import launch
    from vfm.launch.job import EVALUATOR_COMMAND, RUN_LABEL, SINGLE_EVALUATOR_COMMAND, label_value

    return launch.JobOptions(
        name=launch.job_name(recipe_id, f"eval-{suite}", run_id, seed), namespace=namespace, image=image, args=[],
        secret=secret or None, env=env, command=tuple(EVALUATOR_COMMAND if ranks > 1 else SINGLE_EVALUATOR_COMMAND),
        active_deadline_seconds=int(timeout_hours * 3600),
        labels={RUN_LABEL: label_value(run_id), "vfm.io/stage": "eval", "vfm.io/suite": label_value(suite)},
        gang=_queue(queue))


def _queue(queue: str) -> Any:
    """Kueue admission: the job joins LocalQueue `queue` in its namespace ("" = not queued)."""
    from vfm.launch import Gang

    return Gang(scheduler="kueue", queue=queue) if queue else None


def job_manifest(recipe: Any, stage: str, opts: Any, template: dict[str, Any] | None,
                 args_for: Callable[[int], list[str]], launcher: str = "pytorchjob") -> dict[str, Any]:
    """The job as the launcher submits it (a PyTorchJob or a TrainJob, `launcher`): its pods from the
    namespace's PodTemplate `template` (GitOps owns it; None on the local backend), its command line from
    `args_for(loader workers)`, as many workers as the pod's CPU request allows."""
    from vfm import launch
    from vfm.launch.job import loader_workers

    opts = replace(opts, args=args_for(loader_workers(recipe, stage, opts, template)))
    return launch.build_manifest(recipe, opts, template, launcher=launcher)


def _run_as_job(recipe: Any, stage: str, opts: Any, *, backend: str, launcher: str, timeout_hours: float,
                env: dict[str, str], args_for: Callable[[int], list[str]]) -> Any:
    """Build and run one job the way every stage and evaluation runs; returns the launcher's JobResult."""
    from vfm import launch

    manifest = job_manifest(recipe, stage, opts, launch.read_pod_template(opts.namespace, backend=backend), args_for,
                            launcher)
    return launch.run_job(manifest, backend=backend, timeout_s=timeout_hours * 3600, max_restarts=opts.max_restarts,
                          env=env)


def fan_out_seeds(seeds: list[int], **shared: str) -> list[dict[str, Any]]:
    """ParallelFor items: each seed with the upstream values its loop body reads (see components/fan_out_seeds)."""
    if not seeds:
        raise UserError("seeds is empty: pass at least one seed for the last training stage")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds {seeds} repeat a value; each seed is one training run")
    return [{"seed": int(s), **shared} for s in seeds]


def fan_out_downstream(*, recipe_id: str, profile: str, overrides: list[str], exports: list[str], recipe_sha: str,
                       parent_run_id: str, manifests: dict[str, tuple[str, str, str]]) -> list[dict[str, Any]]:
    """ParallelFor items of the downstream stages: each stage × its seeds, from the pretraining export (of the first
    pretraining seed, when pretraining has several), with its dataset's train and val manifests (`manifests`:
    dataset → (train, train sha256, val))."""
    from vfm.pipeline.dag import DENSE_SUITE

    recipe = _recipe(recipe_id, profile, overrides)
    if not exports:
        raise UserError("no pretraining export to start the downstream stages from")
    items = []
    for name, stage in recipe.downstream.items():
        train, digest, val = manifests.get(stage.data.dataset, ("", "", ""))
        if not (train and val):
            raise UserError(f"downstream.{name} trains on {stage.data.dataset}, but the pipeline sharded no "
                            f"{stage.data.dataset} train and val split")
        items += [{"stage": name, "seed": int(s), "suite": DENSE_SUITE[stage.data.dataset], "init": sorted(exports)[0],
                   "data": train, "data_digest": digest, "val": val, "recipe_sha": recipe_sha,
                   "parent_run_id": parent_run_id} for s in stage.seeds]
    return items


def fan_out_cells(*, recipe_id: str, profile: str, overrides: list[str], data: str, data_digest: str,
                  parent_run_id: str, val: str, s3_endpoint: str = "") -> list[dict[str, Any]]:
    """ParallelFor items of paper 002's ablation: one per (cell, seed), each with the cell's overrides (the
    pipeline's, then the cell's), its resolved-recipe digest, and the subset's train and val manifests."""
    from vfm.data.manifest import Manifest
    from vfm.recipes.ablation import ablation_cells

    use_endpoints(s3_endpoint=s3_endpoint)
    base = _recipe(recipe_id, profile, overrides)
    train_m, val_m = Manifest.load(data), Manifest.load(val)
    if train_m.classes != val_m.classes:
        raise UserError(f"the ablation's train subset ({data}) and val subset ({val}) hold different classes "
                        f"({len(train_m.classes)} vs {len(val_m.classes)}, e.g. "
                        f"{sorted(set(train_m.classes) ^ set(val_m.classes))[:3]}); shard both with the same "
                        "--subset-classes / --subset-seed from archives of the same classes")
    items = []
    for cell in ablation_cells(base):
        cell_overrides = [*overrides, *cell.overrides]
        sha = recipe_digest(_recipe(recipe_id, profile, cell_overrides))
        for seed in base.ablation.seeds:  # type: ignore[union-attr]
            items.append({"cell": cell.name, "seed": int(seed), "overrides": cell_overrides, "recipe_sha": sha,
                          "data": data, "data_digest": data_digest, "parent_run_id": parent_run_id, "val": val})
    print(f"{len(items)} ablation runs: " + ", ".join(f"{i['cell']}/seed{i['seed']}" for i in items))
    return items


def ablation_report(*, recipe_id: str, profile: str, overrides: list[str], parent_run_id: str,
                    results: list[dict[str, Any]], mlflow_uri: str = "") -> str:
    """Paper 002's grid as one report on the MLflow parent run: the table and top-1 heatmap over kernel ×
    expansion with each cell's params and FLOPs (vfm.evaluate.ablation); returns the Markdown."""
    from mlflow.tracking import MlflowClient

    from vfm.evaluate.ablation import CellRow, architecture, log_report, mean_metrics
    from vfm.recipes.ablation import ablation_cells
    from vfm.tracking import TrackedRun, tracking_uri

    use_endpoints(mlflow_uri)
    base = _recipe(recipe_id, profile, overrides)
    ab = base.ablation
    assert ab is not None
    per_cell: dict[str, list[dict[str, float]]] = {}
    for item in results:
        per_cell.setdefault(item["cell"], []).append(
            {m.rsplit(".", 1)[-1]: float(v) for m, v in item["metrics"].items() if m.startswith("eval.in1k.")})
    rows, missing = [], []
    for cell in ablation_cells(base):
        if cell.name not in per_cell:
            missing.append(cell.name)
            continue
        params, gflops = architecture(_recipe(recipe_id, profile, [*overrides, *cell.overrides]), ab.subset.num_classes)
        rows.append(CellRow(cell=cell.name, kernel_size=cell.kernel_size, mlp_ratio=cell.mlp_ratio, params=params,
                            gflops=gflops, metrics=mean_metrics(per_cell[cell.name]), seeds=len(per_cell[cell.name])))
    if missing:
        raise UserError(f"the ablation report has no evaluation of cells {', '.join(missing)}; rerun the pipeline "
                        "(finished cells are reused)")
    title = (f"{recipe_id} ablation ({profile} profile): {ab.variant}, {ab.subset.num_classes} classes × "
             f"{ab.subset.fraction:g} of IN-1K, {ab.resolution} px, {ab.epochs:g} epochs")
    run = TrackedRun(client=MlflowClient(tracking_uri=tracking_uri()), run_id=parent_run_id)
    md = log_report(run, rows, title=title, metric=ab.metrics[0])
    print(md)
    return md


def _namespace(backend: str) -> str:
    from vfm.launch.cluster import current_namespace

    return current_namespace() if backend == "cluster" else "local"


# --- evaluation and report ----------------------------------------------------------------------
def suite_data(suite: str, *, val: str, imagenet_c: str = "", imagenet_r: str = "", knn_train: str = "") -> dict[str, str]:
    """The manifests one suite reads (see vfm.evaluate.suite)."""
    table = {"in1k": {"in1k": val}, "in_c": {"in_c": imagenet_c}, "in_r": {"in_r": imagenet_r},
             "knn": {"knn_train": knn_train, "knn": val}, "linear": {"knn_train": knn_train, "in1k": val},
             "ade20k": {"ade20k": val}, "coco": {"coco": val}}
    if suite not in table:
        raise UserError(f"unknown suite {suite!r}; choose from {', '.join(table)}")
    data = table[suite]
    missing = [k for k, v in data.items() if not v]
    if missing:
        raise UserError(f"suite {suite} needs manifests for {', '.join(missing)}")
    return data


def evaluate(*, recipe_id: str, profile: str, overrides: list[str], export: str, suite: str, val: str = "",
             imagenet_c: str = "", imagenet_r: str = "", knn_train: str = "", seed: int, parent_run_id: str,
             mlflow_uri: str = "", s3_endpoint: str = "", image: str = "", run_id: str = "", namespace: str = "",
             backend: str = "cluster", timeout_hours: float = 24.0, secret: str = "vfm-credentials",
             queue: str = "", launcher: str = "pytorchjob", cell: str = "") -> dict[str, Any]:
    """One suite on one export as a job in the trainer image, on the GPUs of one node (bf16, loader
    workers, ranks sharing the data), logged to its own MLflow child run; returns {seed, suite, metrics}, and
    for the `linear` probe also `classifier`: the backbone with its probe, a classifier export. `cell`: the
    ablation cell the export is (in the job and run names, and the result)."""
    from vfm import launch, storage
    from vfm.evaluate.results import EvalResults
    from vfm.launch.job import uses_gpus

    env = use_endpoints(mlflow_uri, s3_endpoint)
    data = suite_data(suite, val=val, imagenet_c=imagenet_c, imagenet_r=imagenet_r, knn_train=knn_train)
    recipe = _recipe(recipe_id, profile, overrides)
    node = launch.one_node(recipe)
    suite_dir = storage.join(storage.join(storage.parent(export), "eval"), suite)
    results_url = storage.join(suite_dir, "results.json")
    classifier = storage.join(suite_dir, "classifier") if suite == "linear" else ""
    # a dense suite scores a downstream stage's export, named after the stage (ade20k and ade20k_linear share a suite)
    stage = _export_stage(export) if suite in ("ade20k", "coco") else ""
    what = f"{suite}-{cell}" if cell else stage.replace("_", "-") or suite
    opts = eval_options(recipe_id, what, run_id=run_id, seed=seed, namespace=namespace or _namespace(backend),
                        image=image, secret=secret, env=env, timeout_hours=timeout_hours, ranks=node.hardware.gpus,
                        queue=queue)
    _run_as_job(node, list(recipe.stages)[-1], opts, backend=backend, launcher=launcher, timeout_hours=timeout_hours,
                env=env,
                args_for=lambda w: launch.evaluator_args(
                    export, suite, data, out=results_url, run_key=f"{parent_run_id}/eval/{what}/{seed}",
                    parent_run_id=stage_parent(parent_run_id), run_name=f"{recipe_id}-eval-{what}-seed{seed}",
                    tags={"vfm.suite": suite, "vfm.seed": str(seed), "vfm.export": export,
                          **({"vfm.cell": cell} if cell else {})}, profile=profile,
                    overrides=overrides, workers=w, gpu=uses_gpus(node), linear_export=classifier))
    metrics = EvalResults.read_json(results_url).metrics
    print(json.dumps(metrics, indent=1, sort_keys=True))
    if classifier:
        from vfm.export import META

        if not storage.exists(storage.join(classifier, META)):
            raise RuntimeError(f"the linear probe job succeeded but wrote no classifier at {classifier}")
        return {"seed": seed, "suite": suite, "metrics": metrics, "classifier": classifier}
    return {"seed": seed, "suite": suite, "metrics": metrics, **({"cell": cell} if cell else {}),
            **({"stage": stage} if stage else {})}


def _export_stage(export: str) -> str:
    """The stage an export's model.json names (the downstream stage a dense export comes from)."""
    from vfm import storage
    from vfm.export import META

    return str(json.loads(storage.read_bytes(storage.join(export, META)))["stage"])


def aggregate(results: list[dict[str, Any]], dense: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Per-seed metrics of every suite → mean ± std over seeds (vfm.evaluate.results.aggregate_seeds). `dense`:
    the downstream stages' results, aggregated per stage over that stage's seeds (`eval.<stage>.*`, with
    `eval.<stage>.num_seeds`), since a downstream stage has seeds of its own."""
    from vfm.evaluate.results import aggregate_seeds

    per_seed: dict[int, dict[str, float]] = {}
    for item in results:
        per_seed.setdefault(int(item["seed"]), {}).update(item["metrics"])
    if not per_seed:
        raise UserError("no evaluation results to aggregate")
    agg = aggregate_seeds(per_seed)
    per_stage: dict[str, dict[int, dict[str, float]]] = {}
    for item in dense or []:
        per_stage.setdefault(item["stage"], {}).setdefault(int(item["seed"]), {}).update(item["metrics"])
    for stage, seeds in sorted(per_stage.items()):
        got = aggregate_seeds(seeds)
        got[f"eval.{stage}.num_seeds"] = float(got.pop("eval.num_seeds", len(seeds)))
        agg.update(got)
    print(json.dumps(agg, indent=1, sort_keys=True))
    return agg


def report_table(rows: list[tuple[str, str, str]], profile: str) -> str:
    """Markdown: metric, achieved, claim. Off the paper profile the run is not the paper's run, so the
    claim column is labelled as a full-scale reference, not a target the run missed."""
    if profile == "paper":
        head, ref = "| metric | achieved | paper claim |", ""
    else:
        head, ref = f"| metric | achieved ({profile} profile) | reference: the paper, full scale |", "paper, full scale: "
    return head + "\n|---|---|---|\n" + "\n".join(f"| {m} | {a} | {ref + c if c else ''} |" for m, a, c in rows)


def report(*, recipe_id: str, profile: str, overrides: list[str], parent_run_id: str, summary: dict[str, float],
           exports: list[str], mlflow_uri: str = "") -> str:
    """Claims vs achieved on the MLflow parent run (metrics, `achieved.*` tags, results JSON, Markdown)."""
    from mlflow.tracking import MlflowClient

    from vfm.evaluate.results import EvalResults, claims_table, summary_rows
    from vfm.tracking import TrackedRun, tracking_uri

    use_endpoints(mlflow_uri)
    recipe = _recipe(recipe_id, profile, overrides)
    results = EvalResults(recipe_id=recipe_id, metrics=dict(summary),
                          claims=claims_table(summary, recipe.claims.model_dump()),
                          exports=[{"location": e} for e in exports])
    run = TrackedRun(client=MlflowClient(tracking_uri=tracking_uri()), run_id=parent_run_id)
    results.log_to(run)
    rows = summary_rows(results)
    table = report_table(rows, profile)
    run.client.log_text(parent_run_id, table + "\n", "report.md")
    print(table)
    from vfm.registry import CANDIDATE, best_export, register_candidate

    try:
        export, metric, value = best_export(run.client, run.client.get_run(parent_run_id).info.experiment_id, exports)
    except UserError as exc:  # e.g. only ImageNet-C evaluated: the report stands, nothing is registered
        print(f"no model registered: {exc}")
        return table
    mv = register_candidate(run.client, recipe_id, export, pipeline_run_id=parent_run_id)
    run.set_tags({"vfm.registered_model": f"{mv.name}/{mv.version}"})
    print(f"registered {export} ({metric} {value:.2f}, the best of {len(exports)}) as {mv.name} version {mv.version} "
          f"@{CANDIDATE}; `vfm promote {recipe_id} {parent_run_id}` makes it the champion")
    return table
