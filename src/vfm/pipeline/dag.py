"""The KFP pipeline of a recipe, generated from it: the five pipelines differ only in stages, data
and evaluation suites, so `pipelines/<id>.py` is one call to `build_pipeline(id)`.

    start_run ─► shard datasets (+ ImageNet-C) ─► pretrain ─► ParallelFor(seeds): fine-tune ─► evaluate × suite
                                                                     └─► aggregate_seeds ─► report
    all inside dsl.ExitHandler(on_exit)

A recipe with `downstream:` stages (paper 001's ADE20K and COCO transfer) also shards their train and val splits
and, after its last stage, runs ParallelFor(downstream stage × seed): train the stage from the pretraining export
→ evaluate it on its val split (ade20k: mIoU; coco: box/mask AP); those results join the same aggregate and report.

A recipe with an `ablation:` grid (paper 002) also has `<id>-ablation`: the IN-1K subset sharded once, then
ParallelFor(cells × seeds, parallelism-limited): train the small variant → evaluate in1k, then one report.

The last training stage fans out over its seeds (DINOv2: pretraining itself with seeds [0]), so every
recipe ends in the same per-seed evaluation, fan-in and report. For a headless SSL backbone the suites
that need a classifier run on its linear probe's classifier export (`DagPlan.linear_probe`); what a paper
declares and vfm does not run is in `DagPlan.skipped` and the pipeline description.

kfp.local 2.17 runs all of this with SubprocessRunner (ParallelFor, Collected, ExitHandler with
PipelineTaskFinalStatus, retries: kubeflow/pipelines tag sdk-2.17.0-1, sdk/python/kfp/local/orchestrator/
enhanced_dag_orchestrator.py and task_executor.py) but ignores every kfp-kubernetes setting (Secret env,
PVC mounts) and resource requests, so the local runner supplies credentials and data paths through the
environment and parameters instead.
"""

# no `from __future__ import annotations`: KFP reads the pipeline signature's annotations as types
import importlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from vfm.errors import UserError
from vfm.pipeline import config

SUITE_ORDER = ("in1k", "in_c", "in_r", "knn")
IMAGENET_C_CPUS = 8  # the ImageNet-C step's CPU request, and by default one corruption worker per CPU
SHARD_LAYOUTS = ("in22k-fall11", "in21k-winter21", "in1k", "in1k-val", "imagenet-r", "imagenet-c", "folder", "ade20k",
                 "coco2017")
# where the raw archives are expected on the raw-data volume, under their official names (ILSVRC2012_*:
# pytorch/vision torchvision/datasets/imagenet.py ARCHIVE_META; fall11_whole.tar, winter21_whole.tar.gz:
# Alibaba-MIIL/ImageNet21K dataset_preprocessing/processing_instructions.md)
RAW_SOURCES = {
    "in22k-fall11": "imagenet/fall11_whole.tar",
    "in21k-winter21": "imagenet/winter21_whole.tar.gz",
    "in1k": "imagenet/ILSVRC2012_img_train.tar",
    "in1k-val": "imagenet/ILSVRC2012_img_val.tar",
    "imagenet-r": "imagenet-r",
    "curated-1.2b": "curated-1.2b",  # paper 003's curated corpus: a folder of images (a later curation step writes it)
    "uncurated-142m": "uncurated-142m",  # paper 004's web-scraped images: a folder
    # the dense transfer sets under their release names (CSAILVision/sceneparsing; cocodataset.org downloads)
    "ade20k-train": "ade20k/ADEChallengeData2016.zip",
    "ade20k-val": "ade20k/ADEChallengeData2016.zip",
    "coco2017-train": "coco/train2017.zip",
    "coco2017-val": "coco/val2017.zip",
}
VAL_LABELS = "imagenet/LOC_val_solution.csv"
COCO_LABELS = "coco/annotations_trainval2017.zip"
# the dense datasets' data roles (train and val split of each), and the eval suite that scores each dataset
DENSE_ROLES = {"ade20k": ("ade20k_train", "ade20k_val"), "coco2017": ("coco_train", "coco_val")}
DENSE_SUITE = {"ade20k": "ade20k", "coco2017": "coco"}


ABLATION_SUFFIX = "-ablation"  # `<recipe>-ablation`: the pipeline of a recipe's `ablation:` grid (paper 002)


def pipeline_ids() -> list[str]:
    """Every pipeline vfm compiles: one per recipe, plus `<recipe>-ablation` for a recipe with an ablation grid."""
    from vfm.recipes import list_recipes, load_recipe

    ids = list_recipes()
    return sorted(ids + [f"{r}{ABLATION_SUFFIX}" for r in ids if load_recipe(r).ablation is not None])


def recipe_of(pipeline_id: str) -> str:
    """The recipe a pipeline runs (`convnext-xl-ablation` → `convnext-xl`); unknown ids fail with the recipe
    loader's "did you mean"."""
    from vfm.recipes import load_recipe

    if pipeline_id.endswith(ABLATION_SUFFIX):
        base = pipeline_id.removesuffix(ABLATION_SUFFIX)
        if load_recipe(base).ablation is None:
            raise UserError(f"{pipeline_id}: recipe {base} declares no `ablation:` grid; pipelines: "
                            f"{', '.join(pipeline_ids())}")
        return base
    load_recipe(pipeline_id)
    return pipeline_id


@dataclass(frozen=True)
class DataRole:
    """One dataset the pipeline shards: pipeline parameters `<role>_source`, `<role>_layout`."""

    role: str
    dataset: str  # recipe dataset id; also the folder under data_prefix
    layout: str  # `vfm shard` layout of the default source
    split: str = ""  # the split of a release that holds several (ade20k, coco2017: train or val)

    @property
    def name(self) -> str:
        """The folder under data_prefix (and the shard step's display name)."""
        return f"{self.dataset}-{self.split}" if self.split else self.dataset

    @property
    def default_source(self) -> str:
        return f"{config.RAW_DATA_MOUNT}/{RAW_SOURCES.get(self.name, self.dataset)}"


@dataclass(frozen=True)
class DagPlan:
    recipe_id: str
    stages: list[str]
    seeds: list[int]
    suites: list[str]
    data: dict[str, DataRole]
    skipped: dict[str, str] = field(default_factory=dict)
    gpus_per_node: int = 8
    knn_during_training: bool = False
    """The last stage evaluates k-NN of its backbone every `eval.knn_every_steps` (DINOv2 pretraining)."""
    linear_probe: bool = False
    """The last stage exports a headless backbone: a linear probe (IN-1K train → val) makes the classifier
    that the in1k / in_c / in_r suites evaluate."""
    pipeline_id: str = ""
    """`recipe_id`, or `<recipe>-ablation` for the ablation grid's pipeline."""
    cells: list[str] = field(default_factory=list)
    """The ablation's cells (`k7-r4`, ...); empty for a recipe's main pipeline."""
    concurrent_cells: int = 1
    downstream: list[str] = field(default_factory=list)
    """The recipe's downstream (dense transfer) stages, trained from the pretraining export once per seed each."""
    curate: bool = False
    """The pretraining data is made by `vfm curate` from the recipe's `curate:` pools (a RayJob), not sharded."""

    @property
    def last(self) -> str:
        return self.stages[-1]


def plan_dag(recipe_id: str) -> DagPlan:
    """The DAG of pipeline `recipe_id`: a recipe's main pipeline, or its ablation (`<recipe>-ablation`)."""
    from vfm.recipes import load_recipe
    from vfm.tasks import task_for

    if recipe_id.endswith(ABLATION_SUFFIX):
        return _plan_ablation(recipe_id)
    recipe = load_recipe(recipe_id)
    stages = [s for s in ("pretrain", "finetune") if s in recipe.stages]
    last = stages[-1]
    suites = [s for s in SUITE_ORDER if s in recipe.eval.suites]
    skipped = {}
    # e.g. DINOv2 pretraining exports a backbone without a classifier: the classification suites run on its
    # linear probe (DINOv2's linear protocol, vfm.evaluate.linear)
    probe = bool(task_for(recipe, last).headless and set(suites) - {"knn"})
    data: dict[str, DataRole] = {}
    for stage in stages:
        ds = recipe.stages[stage].data.dataset
        data[stage] = DataRole(stage, ds, ds if ds in SHARD_LAYOUTS else "folder")
    if set(suites) & {"in1k", "in_c", "knn"} or probe:
        data["val"] = DataRole("val", "in1k-val", "in1k-val")
    if "in_r" in suites:
        data["imagenet_r"] = DataRole("imagenet_r", "imagenet-r", "imagenet-r")
    if ("knn" in suites or probe) and "finetune" not in data:  # the k-NN memory bank; the probe's train set
        data["knn_train"] = DataRole("knn_train", "in1k", "in1k")
    knn_during = bool(task_for(recipe, last).headless and recipe.eval.knn_every_steps and "knn" in suites)
    for ds in dict.fromkeys(d.data.dataset for d in recipe.downstream.values()):  # paper 001's ADE20K / COCO
        for role, split in zip(DENSE_ROLES[ds], ("train", "val"), strict=True):
            data[role] = DataRole(role, ds, ds, split)
    return DagPlan(recipe_id=recipe.id, stages=stages, seeds=list(recipe.stages[last].seeds), suites=suites,
                   data=data, skipped=skipped, gpus_per_node=recipe.hardware.procs_per_node,
                   knn_during_training=knn_during, linear_probe=probe, pipeline_id=recipe.id,
                   downstream=list(recipe.downstream), curate=recipe.curate is not None and "pretrain" in stages)


def _plan_ablation(pipeline_id: str) -> DagPlan:
    """Paper 002's grid: the IN-1K subset (train and val) sharded once, then per cell × seed a training run of
    the small variant and its in1k evaluation, then one report."""
    from vfm.recipes import load_recipe
    from vfm.recipes.ablation import ABLATION_STAGE, SUBSET_DATASET, ablation_cells

    recipe = load_recipe(recipe_of(pipeline_id))
    ab = recipe.ablation
    assert ab is not None
    data = {"train": DataRole("train", SUBSET_DATASET, SUBSET_DATASET), "val": DataRole("val", "in1k-val", "in1k-val")}
    return DagPlan(recipe_id=recipe.id, stages=[ABLATION_STAGE], seeds=list(ab.seeds), suites=["in1k"], data=data,
                   gpus_per_node=min(ab.gpus, recipe.hardware.gpus_per_node), pipeline_id=pipeline_id,
                   cells=[c.name for c in ablation_cells(recipe)], concurrent_cells=ab.concurrent_cells)


@cache
def component(name: str) -> Any:
    """The KFP component `components/<name>/component.py` defines (the `components` package)."""
    return getattr(importlib.import_module(f"components.{name}.component"), name)


def _io_task(task: Any, retries: int = 3) -> Any:
    """Steps that only move bytes / talk to MLflow: retried with backoff (S3 throttling, restarts)."""
    return task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="600s")


def _credentials(task: Any, secret: Any) -> Any:
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in config.REQUIRED_SECRET_KEYS})
    # a pod whose mandatory secret key is missing never starts (CreateContainerConfigError): MLflow's
    # basic-auth keys are only there when the server has auth
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in config.OPTIONAL_SECRET_KEYS},
                                 optional=True)
    return task


def _with_image(comp: Any, image: str | None) -> Any:
    """A copy of the component that runs in `image` (KFP fixes a component's image at compile time)."""
    if image is None:
        return comp
    import copy

    comp = copy.deepcopy(comp)
    comp.component_spec.implementation.container.image = image
    return comp


def build_pipeline(recipe_id: str, *, components_image: str | None = None, trainer_image: str | None = None) -> Any:
    """The `@dsl.pipeline` function of `recipe_id` (compile it, call it under kfp.local, or submit it).

    `components_image` replaces the image every step runs in; `trainer_image` the default of the
    `image` parameter (what the training jobs run), so a build → compile → submit works for any registry."""
    from kfp import dsl, kubernetes

    plan = plan_dag(recipe_id)
    if plan.cells:
        return _ablation_pipeline(plan, components_image=components_image, trainer_image=trainer_image)
    c = {n: _with_image(component(n), components_image)
         for n in ("start_run", "shard_dataset", "imagenet_c", "train", "fan_out_seeds", "evaluate", "linear_probe",
                   "aggregate_seeds", "report", "on_exit", "fan_out_downstream", "curate")}
    desc = (f"vfm {recipe_id}: {' → '.join(plan.stages)} (seeds {plan.seeds}), "
            + ("linear probe, " if plan.linear_probe else "") + f"evaluate {', '.join(plan.suites)}"
            + (f"; downstream {', '.join(plan.downstream)} from the pretraining export, each per seed → evaluate"
               if plan.downstream else "")
            + "".join(f"; {s} skipped: {why}" for s, why in plan.skipped.items())
            + ("; pretraining data: vfm curate of the recipe's pools (curate_sources / curate_eval_sets replace them)"
               if plan.curate else ""))
    src = {role: d.default_source for role, d in plan.data.items()}
    if plan.curate:  # the curate step reads the recipe's sources; pretrain_source is not an input of this pipeline
        src["pretrain"] = ""
    lay = {role: d.layout for role, d in plan.data.items()}

    @dsl.pipeline(name=f"vfm-{recipe_id}", description=desc)
    def pipeline(
        runs_prefix: str = "s3://vfm/runs",
        data_prefix: str = "s3://vfm/data",
        pretrain_source: str = src.get("pretrain", ""),
        pretrain_layout: str = lay.get("pretrain", ""),
        finetune_source: str = src.get("finetune", ""),
        finetune_layout: str = lay.get("finetune", ""),
        val_source: str = src.get("val", ""),
        val_layout: str = lay.get("val", ""),
        val_labels: str = f"{config.RAW_DATA_MOUNT}/{VAL_LABELS}" if "val" in plan.data else "",
        imagenet_r_source: str = src.get("imagenet_r", ""),
        imagenet_r_layout: str = lay.get("imagenet_r", ""),
        knn_train_source: str = src.get("knn_train", ""),
        knn_train_layout: str = lay.get("knn_train", ""),
        ade20k_train_source: str = src.get("ade20k_train", ""),
        ade20k_train_layout: str = lay.get("ade20k_train", ""),
        ade20k_val_source: str = src.get("ade20k_val", ""),
        ade20k_val_layout: str = lay.get("ade20k_val", ""),
        coco_train_source: str = src.get("coco_train", ""),
        coco_train_layout: str = lay.get("coco_train", ""),
        coco_val_source: str = src.get("coco_val", ""),
        coco_val_layout: str = lay.get("coco_val", ""),
        coco_labels: str = f"{config.RAW_DATA_MOUNT}/{COCO_LABELS}" if "coco_train" in plan.data else "",
        imagenet_c_source: str = "",
        imagenet_c_corruptions: str = "",
        imagenet_c_severities: str = "",
        imagenet_c_workers: int = IMAGENET_C_CPUS,
        raw_data_pvc: str = config.RAW_DATA_PVC,
        shard_size: str = "1GB",
        shard_workers: int = 8,
        mlflow_uri: str = config.MLFLOW_URI,
        s3_endpoint: str = "",
        image: str = trainer_image or config.TRAINER_IMAGE,
        namespace: str = config.JOB_NAMESPACE,
        kueue_queue: str = "",
        credentials_secret: str = config.CREDENTIALS_SECRET,
        profile: str = "paper",
        overrides: list = [],  # noqa: B006 - KFP reads the default from the signature
        seeds: list = plan.seeds,  # noqa: B006
        backend: str = "cluster",
        launcher: str = "pytorchjob",  # or trainjob: Kubeflow Trainer v2 (manifests/components/trainer-v2)
        train_timeout_hours: float = 24.0 * 30,
        curate_sources: list = [],  # noqa: B006 - NAME=KIND:PATH pools instead of the recipe's curate.sources
        curate_eval_sets: list = [],  # noqa: B006 - NAME=KIND:PATH instead of curate.decontaminate.sets
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        common = dict(recipe_id=recipe_id, profile=profile, overrides=overrides)
        exit_task = c["on_exit"](recipe_id=recipe_id, run_id=run_id, namespace=namespace, backend=backend,
                                 mlflow_uri=mlflow_uri)
        _credentials(exit_task, credentials_secret).set_caching_options(False)
        with dsl.ExitHandler(exit_task, name="vfm-run"):
            start = c["start_run"](**common, run_id=run_id, mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint,
                                   pipeline=recipe_id)
            _credentials(_io_task(start), credentials_secret).set_caching_options(False)

            sources = {"pretrain": (pretrain_source, pretrain_layout), "finetune": (finetune_source, finetune_layout),
                       "val": (val_source, val_layout), "imagenet_r": (imagenet_r_source, imagenet_r_layout),
                       "knn_train": (knn_train_source, knn_train_layout),
                       "ade20k_train": (ade20k_train_source, ade20k_train_layout),
                       "ade20k_val": (ade20k_val_source, ade20k_val_layout),
                       "coco_train": (coco_train_source, coco_train_layout), "coco_val": (coco_val_source, coco_val_layout)}
            labels = {"val": val_labels, "coco_train": coco_labels, "coco_val": coco_labels}
            shards: dict[str, Any] = {}
            for role, d in plan.data.items():
                if role == "pretrain" and plan.curate:
                    t = c["curate"](**common, data_prefix=data_prefix, sources=curate_sources,
                                    eval_sets=curate_eval_sets, run_id=run_id,
                                    parent_run_id=start.outputs["parent_run_id"], image=image, namespace=namespace,
                                    backend=backend, timeout_hours=train_timeout_hours, secret=credentials_secret,
                                    mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint).set_display_name("curate")
                    # launches a RayJob (adopted by name on a retry); the Ray pods do the work
                    t.set_retry(num_retries=1, backoff_duration="60s").set_caching_options(False)
                    t.set_cpu_request("500m").set_memory_request("1G").set_memory_limit("2G")
                    shards[role] = _credentials(t, credentials_secret)
                    continue
                source, layout = sources[role]
                t = c["shard_dataset"](dataset=layout, source=source, data_prefix=data_prefix, name=d.name,
                                       labels=labels.get(role, ""), seed=0, shard_size=shard_size, workers=shard_workers,
                                       s3_endpoint=s3_endpoint, split=d.split)
                t.set_display_name(f"shard {d.name}")
                # the shard step's inputs determine its output, so KFP's own cache is safe here
                _credentials(_io_task(t), credentials_secret).set_caching_options(True)
                t.set_cpu_request("4").set_memory_request("16G").set_memory_limit("16G")
                kubernetes.mount_pvc(t, pvc_name=raw_data_pvc, mount_path=config.RAW_DATA_MOUNT)
                shards[role] = t
            imagenet_c = None
            if "in_c" in plan.suites:
                imagenet_c = c["imagenet_c"](source=imagenet_c_source, val_manifest=shards["val"].outputs["manifest"],
                                             data_prefix=data_prefix, name="imagenet-c", corruptions=imagenet_c_corruptions,
                                             severities=imagenet_c_severities, workers=imagenet_c_workers,
                                             shard_size=shard_size, s3_endpoint=s3_endpoint)
                imagenet_c.set_display_name("imagenet-c")
                # the official tarballs live on the raw-data volume, like every other archive
                kubernetes.mount_pvc(imagenet_c, pvc_name=raw_data_pvc, mount_path=config.RAW_DATA_MOUNT)
                _credentials(_io_task(imagenet_c), credentials_secret).set_caching_options(True)
                imagenet_c.set_cpu_request(str(IMAGENET_C_CPUS)).set_memory_request("16G").set_memory_limit("16G")

            train = dict(**common, image=image, run_id=run_id, runs_prefix=runs_prefix, namespace=namespace,
                         backend=backend, timeout_hours=train_timeout_hours, secret=credentials_secret,
                         mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint, queue=kueue_queue, launcher=launcher)

            def launch(stage: str, **kw: Any) -> Any:
                t = c["train"](**train, stage=stage, **kw).set_display_name(stage)
                # a retried launcher adopts the job its previous attempt created (same name); the job itself
                # restarts pods (ExitCode policy), so one step retry covers a lost launcher pod
                t.set_retry(num_retries=1, backoff_duration="60s").set_caching_options(False)
                t.set_cpu_request("500m").set_memory_request("1G").set_memory_limit("2G")
                return _credentials(t, credentials_secret)

            init: Any = ""
            if plan.last == "finetune":
                pre = shards["pretrain"]
                init = launch("pretrain", data=pre.outputs["manifest"], data_digest=pre.outputs["sha256"],
                              recipe_sha=start.outputs["recipe_sha"], parent_run_id=start.outputs["parent_run_id"],
                              init="", seed=-1, knn_train="", knn_val="").output
            last_data = shards[plan.last]
            knn_train = shards.get("finetune") or shards.get("knn_train")
            fan = c["fan_out_seeds"](
                seeds=seeds, init=init, data=last_data.outputs["manifest"], data_digest=last_data.outputs["sha256"],
                recipe_sha=start.outputs["recipe_sha"], parent_run_id=start.outputs["parent_run_id"],
                val=shards["val"].outputs["manifest"] if "val" in shards else "",
                imagenet_c=imagenet_c.outputs["manifest"] if imagenet_c is not None else "",
                imagenet_r=shards["imagenet_r"].outputs["manifest"] if "imagenet_r" in shards else "",
                knn_train=knn_train.outputs["manifest"] if ("knn" in plan.suites or plan.linear_probe)
                and knn_train is not None else "")
            fan.set_caching_options(False)
            with dsl.ParallelFor(fan.output, name="seeds") as item:
                # the k-NN curve during DINOv2 pretraining (eval.knn_every_steps; paper 004 reports it)
                knn = plan.knn_during_training
                last = launch(plan.last, data=item.data, data_digest=item.data_digest, recipe_sha=item.recipe_sha,
                              parent_run_id=item.parent_run_id, init=item.init, seed=item.seed,
                              knn_train=item.knn_train if knn else "", knn_val=item.val if knn else "")
                job = dict(seed=item.seed, parent_run_id=item.parent_run_id, mlflow_uri=mlflow_uri,
                           s3_endpoint=s3_endpoint, image=image, run_id=run_id, namespace=namespace, backend=backend,
                           timeout_hours=train_timeout_hours, secret=credentials_secret, queue=kueue_queue,
                           launcher=launcher)

                def eval_task(t: Any, name: str) -> Any:
                    t.set_display_name(name)
                    # the launcher of the evaluation job: no GPU here, the job's pods hold them
                    _credentials(_io_task(t, retries=2), credentials_secret).set_caching_options(False)
                    return t.set_cpu_request("500m").set_memory_request("1G").set_memory_limit("2G")

                probe = None
                if plan.linear_probe:
                    probe = eval_task(c["linear_probe"](**common, **job, export=last.output, val=item.val,
                                                        knn_train=item.knn_train), "linear probe")
                evals = {}
                for suite in plan.suites:
                    # a headless backbone's classification suites run on its probe's classifier export
                    export = probe.outputs["classifier"] if probe is not None and suite != "knn" else last.output
                    evals[suite] = eval_task(c["evaluate"](**common, **job, export=export, suite=suite, val=item.val,
                                                           imagenet_c=item.imagenet_c, imagenet_r=item.imagenet_r,
                                                           knn_train=item.knn_train), f"evaluate {suite}")
            collected = {s: dsl.Collected(evals[s].output) if s in evals else [] for s in SUITE_ORDER}
            collected["linear"] = dsl.Collected(probe.outputs["result"]) if probe is not None else []
            collected["dense"] = []
            if plan.downstream:
                def manifest(role: str, out: str = "manifest") -> Any:
                    return shards[role].outputs[out] if role in shards else ""

                down = c["fan_out_downstream"](
                    **common, exports=dsl.Collected(last.output), recipe_sha=start.outputs["recipe_sha"],
                    parent_run_id=start.outputs["parent_run_id"], ade20k_train=manifest("ade20k_train"),
                    ade20k_train_digest=manifest("ade20k_train", "sha256"), ade20k_val=manifest("ade20k_val"),
                    coco_train=manifest("coco_train"), coco_train_digest=manifest("coco_train", "sha256"),
                    coco_val=manifest("coco_val"))
                down.set_caching_options(False)
                with dsl.ParallelFor(down.output, name="downstream") as d:
                    # the stage's own GPUs and schedule (recipe `downstream.<stage>`), from the pretraining export
                    dense_export = c["train"](**train, stage=d.stage, data=d.data, data_digest=d.data_digest,
                                              recipe_sha=d.recipe_sha, parent_run_id=d.parent_run_id, init=d.init,
                                              seed=d.seed, knn_train="", knn_val="").set_display_name("downstream")
                    dense_export.set_retry(num_retries=1, backoff_duration="60s").set_caching_options(False)
                    _credentials(dense_export.set_cpu_request("500m").set_memory_request("1G").set_memory_limit("2G"),
                                 credentials_secret)
                    dense_eval = c["evaluate"](**common, seed=d.seed, parent_run_id=d.parent_run_id,
                                               mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint, image=image,
                                               run_id=run_id, namespace=namespace, backend=backend,
                                               timeout_hours=train_timeout_hours, secret=credentials_secret,
                                               queue=kueue_queue, launcher=launcher, export=dense_export.output,
                                               suite=d.suite, val=d.val, imagenet_c="", imagenet_r="", knn_train="")
                    dense_eval.set_display_name("evaluate downstream")
                    _credentials(_io_task(dense_eval, retries=2), credentials_secret).set_caching_options(False)
                    dense_eval.set_cpu_request("500m").set_memory_request("1G").set_memory_limit("2G")
                collected["dense"] = dsl.Collected(dense_eval.output)
            agg = c["aggregate_seeds"](**collected)
            _io_task(agg).set_caching_options(False)
            rep = c["report"](**common, parent_run_id=start.outputs["parent_run_id"], summary=agg.output,
                              exports=dsl.Collected(last.output), mlflow_uri=mlflow_uri)
            _credentials(_io_task(rep), credentials_secret).set_caching_options(False)

    return pipeline


def _ablation_pipeline(plan: DagPlan, *, components_image: str | None, trainer_image: str | None) -> Any:
    """`<recipe>-ablation`: shard the subset once (train + val), ParallelFor over cells × seeds (at most
    `ablation.concurrent_cells` at once), each a training job and an in1k evaluation through the same train
    and evaluate steps as every stage, then one report (table + heatmap) on the parent run."""
    from kfp import dsl, kubernetes

    c = {n: _with_image(component(n), components_image)
         for n in ("start_run", "shard_ablation_subset", "train", "fan_out_cells", "evaluate", "ablation_report",
                   "on_exit")}
    recipe_id, pipeline_id = plan.recipe_id, plan.pipeline_id
    desc = (f"vfm {pipeline_id}: paper {recipe_id}'s ablation, {len(plan.cells)} cells ({', '.join(plan.cells)}) × "
            f"seeds {plan.seeds}, each {plan.stages[0]} on the IN-1K subset → evaluate in1k; report: table + heatmap")
    src = {role: d.default_source for role, d in plan.data.items()}

    @dsl.pipeline(name=f"vfm-{pipeline_id}", description=desc)
    def pipeline(
        runs_prefix: str = "s3://vfm/runs",
        data_prefix: str = "s3://vfm/data",
        train_source: str = src["train"],
        train_layout: str = plan.data["train"].layout,
        val_source: str = src["val"],
        val_layout: str = plan.data["val"].layout,
        val_labels: str = f"{config.RAW_DATA_MOUNT}/{VAL_LABELS}",
        raw_data_pvc: str = config.RAW_DATA_PVC,
        shard_size: str = "1GB",
        shard_workers: int = 8,
        mlflow_uri: str = config.MLFLOW_URI,
        s3_endpoint: str = "",
        image: str = trainer_image or config.TRAINER_IMAGE,
        namespace: str = config.JOB_NAMESPACE,
        kueue_queue: str = "",
        credentials_secret: str = config.CREDENTIALS_SECRET,
        profile: str = "paper",
        overrides: list = [],  # noqa: B006 - KFP reads the default from the signature
        backend: str = "cluster",
        launcher: str = "pytorchjob",
        train_timeout_hours: float = 24.0 * 7,
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        common = dict(recipe_id=recipe_id, profile=profile, overrides=overrides)
        exit_task = c["on_exit"](recipe_id=recipe_id, run_id=run_id, namespace=namespace, backend=backend,
                                 mlflow_uri=mlflow_uri)
        _credentials(exit_task, credentials_secret).set_caching_options(False)
        with dsl.ExitHandler(exit_task, name="vfm-run"):
            start = c["start_run"](**common, run_id=run_id, mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint,
                                   pipeline=pipeline_id)
            _credentials(_io_task(start), credentials_secret).set_caching_options(False)
            shards = {}
            for role, (source, layout) in {"train": (train_source, train_layout), "val": (val_source, val_layout)}.items():
                t = c["shard_ablation_subset"](**common, dataset=layout, source=source, data_prefix=data_prefix,
                                               labels=val_labels if role == "val" else "", shard_size=shard_size,
                                               workers=shard_workers, s3_endpoint=s3_endpoint)
                t.set_display_name(f"shard {plan.data[role].dataset} subset")
                # the subset comes from the resolved recipe (profile + overrides), which are inputs: cacheable
                _credentials(_io_task(t), credentials_secret).set_caching_options(True)
                t.set_cpu_request("4").set_memory_request("16G").set_memory_limit("16G")
                kubernetes.mount_pvc(t, pvc_name=raw_data_pvc, mount_path=config.RAW_DATA_MOUNT)
                shards[role] = t
            fan = c["fan_out_cells"](**common, data=shards["train"].outputs["manifest"],
                                     data_digest=shards["train"].outputs["sha256"],
                                     parent_run_id=start.outputs["parent_run_id"], val=shards["val"].outputs["manifest"],
                                     s3_endpoint=s3_endpoint)
            # reads both manifests (the class check): S3 credentials
            _credentials(_io_task(fan), credentials_secret).set_caching_options(False)
            with dsl.ParallelFor(fan.output, name="cells", parallelism=plan.concurrent_cells) as item:
                job = dict(image=image, run_id=run_id, namespace=namespace, backend=backend, secret=credentials_secret,
                           mlflow_uri=mlflow_uri, s3_endpoint=s3_endpoint, queue=kueue_queue, launcher=launcher)
                t = c["train"](**job, recipe_id=recipe_id, profile=profile, overrides=item.overrides,
                               stage=plan.stages[0], data=item.data, data_digest=item.data_digest,
                               recipe_sha=item.recipe_sha, parent_run_id=item.parent_run_id, runs_prefix=runs_prefix,
                               init="", seed=item.seed, timeout_hours=train_timeout_hours, knn_train="", knn_val="",
                               cell=item.cell)
                t.set_display_name("train cell")
                t.set_retry(num_retries=1, backoff_duration="60s").set_caching_options(False)
                t.set_cpu_request("500m").set_memory_request("1G").set_memory_limit("2G")
                _credentials(t, credentials_secret)
                ev = c["evaluate"](**job, recipe_id=recipe_id, profile=profile, overrides=item.overrides,
                                   export=t.output, suite="in1k", val=item.val, imagenet_c="", imagenet_r="",
                                   knn_train="", seed=item.seed, parent_run_id=item.parent_run_id,
                                   timeout_hours=train_timeout_hours, cell=item.cell)
                ev.set_display_name("evaluate cell in1k")
                _credentials(_io_task(ev, retries=2), credentials_secret).set_caching_options(False)
                ev.set_cpu_request("500m").set_memory_request("1G").set_memory_limit("2G")
            rep = c["ablation_report"](**common, parent_run_id=start.outputs["parent_run_id"],
                                       results=dsl.Collected(ev.output), mlflow_uri=mlflow_uri)
            _credentials(_io_task(rep), credentials_secret).set_caching_options(False)

    return pipeline


def compile_pipeline(recipe_id: str, out: str | Path, *, components_image: str | None = None,
                     trainer_image: str | None = None) -> Path:
    from kfp import compiler

    for flag, image in (("--components-image", components_image), ("--trainer-image", trainer_image)):
        if image is not None and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            raise UserError(f"{flag} {image!r}: pin a tag or digest (not latest), e.g. registry.example.com/vfm-"
                            f"{'components' if 'comp' in flag else 'trainer'}:0.1.0")
    out = Path(out)
    compiler.Compiler().compile(build_pipeline(recipe_id, components_image=components_image,
                                               trainer_image=trainer_image), str(out))
    return out
