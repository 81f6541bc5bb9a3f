"""Properties of the compiled pipelines that the cluster relies on (asserted on the committed YAML)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vfm.pipeline.dag import pipeline_ids, plan_dag
from vfm.recipes import list_recipes

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def compiled(recipe_id):
    spec, platform = yaml.safe_load_all((PIPELINES / f"{recipe_id}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec):
    for comp in spec["components"].values():
        yield from (comp.get("dag") or {}).get("tasks", {}).items()
    yield from spec["root"]["dag"]["tasks"].items()


@pytest.mark.parametrize("recipe_id", pipeline_ids())
def test_exit_handler_wraps_the_body_and_closes_the_run(recipe_id):
    spec, _ = compiled(recipe_id)
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "on-exit"}
    assert root["on-exit"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["on-exit"]["dependentTasks"] == ["exit-handler-1"]


@pytest.mark.parametrize("recipe_id", pipeline_ids())
def test_retries_caching_and_gpu_placement(recipe_id):
    spec, platform = compiled(recipe_id)
    tasks = dict(all_tasks(spec))
    executors = spec["deploymentSpec"]["executors"]
    for name, task in tasks.items():
        kind = task.get("componentRef", {}).get("name", "").removeprefix("comp-").rstrip("-0123456789")
        caching = (task.get("cachingOptions") or {}).get("enableCache", False)
        if kind in ("shard-dataset", "shard-ablation-subset", "imagenet-c"):
            assert caching and task["retryPolicy"]["maxRetryCount"] == 3, name  # idempotent I/O
        elif kind == "train":
            assert task["taskInfo"]["name"] in ("pretrain", "finetune", "train cell", "downstream"), name  # per stage
            assert not caching, name  # side effects: a job and an MLflow run (content-keyed reuse instead)
            assert task["retryPolicy"]["maxRetryCount"] == 1, name
            container = executors[f"exec-{name}"]["container"]
            assert "accelerator" not in container.get("resources", {}), f"{name}: the launcher pod holds no GPU"
        elif kind in ("start-run", "evaluate", "report", "aggregate-seeds", "fan-out-cells", "ablation-report"):
            assert not caching and task["retryPolicy"]["maxRetryCount"] >= 2, name
    passthrough = [c for c in spec["components"].values() if c.get("taskConfigPassthroughs")]
    assert passthrough and all({p["field"] for p in c["taskConfigPassthroughs"]} ==
                               {"RESOURCES", "KUBERNETES_TOLERATIONS", "KUBERNETES_NODE_SELECTOR"} for c in passthrough)
    for name, executor in executors.items():
        if name.startswith(("exec-evaluate", "exec-train")):
            # launchers: the GPUs belong to the jobs they start (trainer image), never to the step's pod
            assert "accelerator" not in executor["container"].get("resources", {}), name
        if name not in ("exec-aggregate-seeds", "exec-fan-out-seeds", "exec-fan-out-downstream"):  # no S3, no MLflow
            secret = platform[name]["secretAsEnv"][0]
            assert secret["secretNameParameter"] == {"componentInputParameter": "pipelinechannel--credentials_secret"} \
                or secret["secretNameParameter"]["componentInputParameter"].endswith("credentials_secret")


@pytest.mark.parametrize("recipe_id", list_recipes())
def test_last_stage_fans_out_over_seeds_and_every_suite_is_evaluated(recipe_id):
    spec, _ = compiled(recipe_id)
    plan = plan_dag(recipe_id)
    loop = next(c for n, c in spec["components"].items() if n.startswith("comp-for-loop")
                and "evaluate downstream" not in {t["taskInfo"]["name"] for t in c["dag"]["tasks"].values()})
    names = {t["componentRef"]["name"] for t in loop["dag"]["tasks"].values()}
    stage_args = [t["inputs"]["parameters"]["stage"] for t in loop["dag"]["tasks"].values()
                  if t["componentRef"]["name"].startswith("comp-train")]
    assert [a["runtimeValue"]["constant"] for a in stage_args] == [plan.last]
    assert sum(n.startswith("comp-evaluate") for n in names) == len(plan.suites)
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["seeds"]["defaultValue"] == plan.seeds
    assert defaults["backend"]["defaultValue"] == "cluster"


def test_headless_ssl_backbones_get_every_suite_through_a_linear_probe():
    plan = plan_dag("dinov2-giant")
    assert plan.stages == ["pretrain"] and plan.suites == ["in1k", "in_r", "knn"]
    assert plan.linear_probe and plan.skipped == {}
    assert "knn_train" in plan.data and plan.data["pretrain"].layout == "folder"  # uncurated-142m is a folder of images
    spec, _ = compiled("dinov2-giant")
    loop = next(c for n, c in spec["components"].items() if n.startswith("comp-for-loop"))
    tasks = loop["dag"]["tasks"]
    probe = next(k for k, t in tasks.items() if t["componentRef"]["name"] == "comp-linear-probe")
    exports = {t["inputs"]["parameters"]["suite"]["runtimeValue"]["constant"]: t["inputs"]["parameters"]["export"]
               for t in tasks.values() if t["componentRef"]["name"].startswith("comp-evaluate")}
    # in1k and in_r read the probe's classifier export; k-NN reads the backbone itself
    for suite in ("in1k", "in_r"):
        assert exports[suite]["taskOutputParameter"] == {"producerTask": probe, "outputParameterKey": "classifier"}
    assert exports["knn"]["taskOutputParameter"]["producerTask"].startswith("train")
    assert not plan_dag("meta-dinov2-giant").linear_probe  # k-NN only: nothing needs a classifier
    vit = plan_dag("vit-huge")
    assert vit.stages == ["pretrain", "finetune"] and vit.suites == ["in1k", "in_c", "in_r", "knn"] and vit.seeds == [0, 1, 2]


def test_the_ablation_fans_out_over_its_cells_with_a_parallelism_limit_into_one_report():
    plan = plan_dag("convnext-xl-ablation")
    assert plan.recipe_id == "convnext-xl" and len(plan.cells) == 15 and plan.suites == ["in1k"]
    spec, _ = compiled("convnext-xl-ablation")
    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    loop = body["for-loop-2"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4  # ablation.concurrent_cells
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("fan-out-cells-Output")
    shards = sorted(t["inputs"]["parameters"]["dataset"]["componentInputParameter"] for k, t in body.items()
                    if k.startswith("shard-ablation-subset"))
    assert shards == ["pipelinechannel--train_layout", "pipelinechannel--val_layout"]  # the subset, once
    inner = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]
    train, ev = inner["train"], inner["evaluate"]
    for task in (train, ev):  # each cell: its own overrides and name, from the loop item
        params = task["inputs"]["parameters"]
        assert params["cell"]["componentInputParameter"] == "pipelinechannel--fan-out-cells-Output-loop-item"
        assert params["cell"]["parameterExpressionSelector"] == 'parseJson(string_value)["cell"]'
        assert params["overrides"]["parameterExpressionSelector"] == 'parseJson(string_value)["overrides"]'
    assert train["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == "pretrain"
    assert ev["inputs"]["parameters"]["suite"]["runtimeValue"]["constant"] == "in1k"
    report = body["ablation-report"]["inputs"]["parameters"]["results"]
    assert report["taskOutputParameter"]["producerTask"] == "for-loop-2"  # dsl.Collected over every cell


def test_jobs_go_to_the_namespace_rbac_lets_the_runner_create_them_in():
    import yaml as _yaml

    rbac = list(_yaml.safe_load_all((PIPELINES.parent / "manifests/base/rbac.yaml").read_text()))
    binding = next(o for o in rbac if o["kind"] == "RoleBinding" and o["roleRef"]["name"] == "vfm-pytorchjob-launcher")
    role = next(o for o in rbac if o["kind"] == "Role" and o["metadata"]["name"] == "vfm-pytorchjob-launcher")
    assert any("pytorchjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    runner = binding["subjects"][0]["name"]
    for recipe_id in list_recipes():
        spec, _ = compiled(recipe_id)
        defaults = spec["root"]["inputDefinitions"]["parameters"]
        assert defaults["namespace"]["defaultValue"] == binding["metadata"]["namespace"], recipe_id
    from vfm.pipeline import config

    assert config.PIPELINE_RUNNER_SERVICE_ACCOUNT == runner


@pytest.mark.parametrize("recipe_id", pipeline_ids())
def test_mlflow_auth_keys_are_optional_the_s3_keys_are_not(recipe_id):
    _, platform = compiled(recipe_id)
    for name, executor in platform.items():
        by_key = {k["secretKey"]: bool(s.get("optional")) for s in executor.get("secretAsEnv", [])
                  for k in s["keyToEnv"]}
        if not by_key:
            continue
        assert by_key == {"AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False,
                          "MLFLOW_TRACKING_USERNAME": True, "MLFLOW_TRACKING_PASSWORD": True}, name


def test_imagenet_c_workers_match_its_cpu_request():
    spec, _ = compiled("vit-huge")
    cpu = spec["deploymentSpec"]["executors"]["exec-imagenet-c"]["container"]["resources"]["cpuRequest"]
    assert spec["root"]["inputDefinitions"]["parameters"]["imagenet_c_workers"]["defaultValue"] == cpu == 8


def test_imagenet_c_reads_the_official_tarballs_from_the_raw_data_volume():
    spec, platform = compiled("vit-huge")
    assert spec["root"]["inputDefinitions"]["parameters"]["imagenet_c_source"]["defaultValue"] == ""
    mounts = platform["exec-imagenet-c"]["pvcMount"]
    assert [m["mountPath"] for m in mounts] == ["/datasets"]


@pytest.mark.parametrize("recipe_id", ["dinov2-giant", "meta-dinov2-giant", "vit-huge"])
def test_dinov2_pretraining_is_given_the_knn_sets_and_supervised_stages_are_not(recipe_id):
    spec, _ = compiled(recipe_id)
    loop = next(c for n, c in spec["components"].items() if n.startswith("comp-for-loop"))
    train = next(t for t in loop["dag"]["tasks"].values() if t["componentRef"]["name"].startswith("comp-train"))
    params = train["inputs"]["parameters"]
    if plan_dag(recipe_id).knn_during_training:
        # the loop item's labelled sets (fan_out_seeds): the k-NN reference set and the val queries
        assert params["knn_train"]["parameterExpressionSelector"] == 'parseJson(string_value)["knn_train"]'
        assert params["knn_val"]["parameterExpressionSelector"] == 'parseJson(string_value)["val"]'
    else:
        assert params["knn_train"]["runtimeValue"]["constant"] == "" and recipe_id == "vit-huge"


def test_compile_takes_anyones_registry(tmp_path):
    from vfm.errors import UserError
    from vfm.pipeline.dag import compile_pipeline

    out = compile_pipeline("vit-huge", tmp_path / "v.yaml", components_image="registry.example.com/c:7",
                           trainer_image="registry.example.com/t:7")
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/c:7"}
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "registry.example.com/t:7"
    committed, _ = compiled("vit-huge")  # the committed YAML keeps the documented defaults
    assert {e["container"]["image"] for e in committed["deploymentSpec"]["executors"].values()} == {
        "ghcr.io/vfm-project/vfm-components:0.1.0"}
    with pytest.raises(UserError, match="pin a tag"):
        compile_pipeline("vit-huge", tmp_path / "w.yaml", components_image="registry.example.com/c:latest")


def test_paper_001s_downstream_stages_train_from_the_pretraining_export_and_join_the_aggregate():
    plan = plan_dag("vit-huge-pretrain")
    assert plan.downstream == ["ade20k", "ade20k_linear", "coco"] and plan.skipped == {}
    assert {r: (d.layout, d.split, d.name) for r, d in plan.data.items() if r.startswith(("ade20k", "coco"))} == {
        "ade20k_train": ("ade20k", "train", "ade20k-train"), "ade20k_val": ("ade20k", "val", "ade20k-val"),
        "coco_train": ("coco2017", "train", "coco2017-train"), "coco_val": ("coco2017", "val", "coco2017-val")}
    assert plan.data["coco_val"].default_source.endswith("coco/val2017.zip")
    spec, _ = compiled("vit-huge-pretrain")
    tasks = dict(all_tasks(spec))
    fan = next(t for t in tasks.values() if t["componentRef"]["name"] == "comp-fan-out-downstream")
    exports = fan["inputs"]["parameters"]["exports"]["taskOutputParameter"]
    assert exports["producerTask"].startswith("for-loop")  # the collected pretraining exports
    loop = next(c for c in spec["components"].values() if "evaluate downstream" in
                {t["taskInfo"]["name"] for t in (c.get("dag") or {}).get("tasks", {}).values()})
    body = loop["dag"]["tasks"]
    train = next(t for t in body.values() if t["taskInfo"]["name"] == "downstream")
    evaluate = next(t for t in body.values() if t["taskInfo"]["name"] == "evaluate downstream")
    # every value the body reads is the loop item's (kfp.local hands a ParallelFor body its item)
    for key in ("stage", "init", "data", "seed"):
        assert "parallel-for-item" in str(train["inputs"]["parameters"][key]) or \
            "loop-item" in str(train["inputs"]["parameters"][key]), key
    assert evaluate["inputs"]["parameters"]["export"]["taskOutputParameter"]["producerTask"] == \
        next(k for k, t in body.items() if t["taskInfo"]["name"] == "downstream")
    agg = next(t for t in tasks.values() if t["componentRef"]["name"] == "comp-aggregate-seeds")
    assert "taskOutputParameter" in agg["inputs"]["parameters"]["dense"]
    shard_splits = {t["taskInfo"]["name"]: t["inputs"]["parameters"]["split"]["runtimeValue"]["constant"]
                    for t in tasks.values() if t["componentRef"]["name"].startswith("comp-shard-dataset")}
    assert shard_splits["shard ade20k-val"] == "val" and shard_splits["shard in22k-fall11"] == ""
    assert not plan_dag("vit-huge").downstream  # only paper 001 declares dense transfer


@pytest.mark.parametrize("recipe_id", ["meta-dinov2-giant", "dinov2-giant"])
def test_the_ssl_recipes_curate_their_pretraining_data_before_pretraining(recipe_id):
    """Papers 003 and 004: a curate step (a RayJob on the cluster) makes the pretraining shards; nothing shards the
    pretrain role, and the pretraining loop reads the curate step's manifest."""
    plan = plan_dag(recipe_id)
    assert plan.curate
    spec, platform = compiled(recipe_id)
    tasks = dict(all_tasks(spec))
    curate = next(t for t in tasks.values() if t["componentRef"]["name"] == "comp-curate")
    assert curate["taskInfo"]["name"] == "curate"
    assert "curate" in curate["inputs"]["parameters"]["sources"]["componentInputParameter"]
    assert not any(t["taskInfo"]["name"] == f"shard {plan.data['pretrain'].name}" for t in tasks.values())
    fan = next(t for t in tasks.values() if t["componentRef"]["name"] == "comp-fan-out-seeds")
    assert fan["inputs"]["parameters"]["data"]["taskOutputParameter"] == {
        "outputParameterKey": "manifest", "producerTask": next(k for k, t in tasks.items() if t is curate)}
    assert platform["exec-curate"]["secretAsEnv"], "the RayJob launcher needs the S3 / MLflow credentials"
    assert spec["root"]["inputDefinitions"]["parameters"]["pretrain_source"]["defaultValue"] == ""
    assert not plan_dag("vit-huge").curate
