"""The steps behind the components: run bookkeeping, fan-out, suite data, aggregation, exit handler."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from vfm.errors import UserError
from vfm.launch import JobOptions, build_job, job_name, to_manifest
from vfm.pipeline import steps
from vfm.pipeline.submit import parse_params
from vfm.recipes import load_recipe


def test_fan_out_carries_upstream_values_per_seed_and_rejects_bad_seed_lists():
    items = steps.fan_out_seeds([0, 1], init="s3://x/export", data="s3://d/manifest.json")
    assert items == [{"seed": 0, "init": "s3://x/export", "data": "s3://d/manifest.json"},
                     {"seed": 1, "init": "s3://x/export", "data": "s3://d/manifest.json"}]
    for bad in ([], [1, 1]):
        with pytest.raises(UserError):
            steps.fan_out_seeds(bad)


def test_suite_data_names_what_is_missing():
    assert steps.suite_data("knn", val="v", knn_train="t") == {"knn_train": "t", "knn": "v"}
    with pytest.raises(UserError, match="in_c needs manifests for in_c"):
        steps.suite_data("in_c", val="v")
    with pytest.raises(UserError, match="unknown suite"):
        steps.suite_data("imagenet-a", val="v")


def test_aggregate_merges_suites_per_seed_then_averages_seeds():
    results = [{"seed": 0, "suite": "in1k", "metrics": {"eval.in1k.top1": 80.0}},
               {"seed": 0, "suite": "knn", "metrics": {"eval.knn.k20.top1": 70.0}},
               {"seed": 1.0, "suite": "in1k", "metrics": {"eval.in1k.top1": 82.0}},
               {"seed": 1.0, "suite": "knn", "metrics": {"eval.knn.k20.top1": 72.0}}]
    agg = steps.aggregate(results)
    assert agg["eval.in1k.top1"] == 81.0 and agg["eval.knn.k20.top1"] == 71.0 and agg["eval.num_seeds"] == 2
    assert agg["eval.in1k.top1.std"] == pytest.approx(2**0.5)


def kubeconfig(tmp_path, url):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    return path


def test_exit_handler_marks_the_run_failed_and_deletes_only_this_runs_jobs(mlflow_uri, fake_k8s, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, fake_k8s.url)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    parent, sha = steps.start_run(recipe_id="vit-huge", profile="smoke", overrides=[], run_id="run-x",
                                  mlflow_uri=mlflow_uri)
    recipe = load_recipe("vit-huge", profile="smoke")
    assert sha == steps.recipe_digest(recipe)
    for run, stage in (("run-x", "pretrain"), ("run-x", "finetune"), ("run-y", "pretrain")):
        m = to_manifest(build_job(recipe, JobOptions(name=job_name("vit-huge", stage, run), namespace="vision",
                                                     image="ghcr.io/x/t:1", args=[], labels={"vfm.io/run": run})))
        fake_k8s.jobs[("vision", m["metadata"]["name"])] = m
    out = steps.finish(state="FAILED", error="Task finetune failed", recipe_id="vit-huge", run_id="run-x",
                       namespace="vision", backend="cluster", mlflow_uri=mlflow_uri)
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["vfm.failure"] == "Task finetune failed"
    assert sorted(fake_k8s.deleted) == sorted([job_name("vit-huge", "pretrain", "run-x"),
                                               job_name("vit-huge", "finetune", "run-x")])
    assert [n for (_, n) in fake_k8s.jobs] == [job_name("vit-huge", "pretrain", "run-y")]
    assert "deleted leftover PyTorchJobs" in out


def test_exit_handler_closes_a_successful_run_as_finished(mlflow_uri):
    parent, _ = steps.start_run(recipe_id="convnext-xl", profile="smoke", overrides=[], run_id="run-ok",
                                mlflow_uri=mlflow_uri)
    steps.finish(state="SUCCEEDED", error="", recipe_id="convnext-xl", run_id="run-ok", namespace="",
                 backend="local", mlflow_uri=mlflow_uri)
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(parent).info.status == "FINISHED"


def test_without_kfps_mlflow_plugin_stages_nest_under_vfms_parent(mlflow_uri, monkeypatch):
    from vfm.tracking import tracked_run

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    parent, _ = steps.start_run(recipe_id="vit-huge", profile="smoke", overrides=[], run_id="run-plain",
                                mlflow_uri=mlflow_uri)
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(parent).info.experiment_id == client.get_experiment_by_name("vfm/vit-huge").experiment_id
    assert steps.stage_parent(parent) == parent
    with tracked_run(load_recipe("vit-huge", profile="smoke"), stage="pretrain", run_key="plain/pretrain",
                     parent_run_id=steps.stage_parent(parent), uri=mlflow_uri) as stage:
        stage.log_metrics({"train/loss": 1.5}, step=1)
    child = client.get_run(stage.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent and child.data.metrics["train/loss"] == 1.5
    assert child.info.experiment_id == client.get_run(parent).info.experiment_id


def test_under_kfps_mlflow_plugin_vfm_nests_under_the_injected_runs(mlflow_uri, monkeypatch):
    """KFP 2.17's MLflow plugin makes a run per pipeline run and a nested run per task, and injects the
    task's as MLFLOW_RUN_ID / MLFLOW_EXPERIMENT_ID: vfm opens no second parent, and a stage's run nests
    under the run of the task that launched it."""
    import uuid

    from vfm.tracking import tracked_run

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment(f"kfp-plugin-{uuid.uuid4().hex[:8]}")
    kfp_run = client.create_run(exp, run_name="vfm-vit-huge-run").info.run_id

    def task_run(name: str) -> str:  # what the plugin's driver creates before each task's container starts
        run_id = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": kfp_run}).info.run_id
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
        return run_id

    task_run("start-run")
    parent, _ = steps.start_run(recipe_id="vit-huge", profile="smoke", overrides=[], run_id="run-plugin",
                                mlflow_uri=mlflow_uri)
    assert parent == kfp_run
    tags = client.get_run(kfp_run).data.tags
    assert tags["vfm.run_key"] == "run-plugin/pipeline" and tags["vfm.recipe"] == "vit-huge" and "claim.top1" in tags
    vfm_exp = client.get_experiment_by_name("vfm/vit-huge")
    if vfm_exp is not None:  # no vfm parent for this pipeline run anywhere else
        assert not client.search_runs([vfm_exp.experiment_id], "tags.`vfm.run_key` = 'run-plugin/pipeline'")

    train_task = task_run("pretrain")
    assert steps.stage_parent(parent) == train_task
    # the trainer pod has no plugin env: it nests under the id the step passed
    monkeypatch.delenv("MLFLOW_RUN_ID")
    with tracked_run(load_recipe("vit-huge", profile="smoke"), stage="pretrain", run_key="plugin/pretrain",
                     parent_run_id=train_task, uri=mlflow_uri) as stage:
        stage.log_metrics({"train.loss": 1.5}, step=1)
    child = client.get_run(stage.run_id)
    assert child.info.experiment_id == exp and child.data.tags["mlflow.parentRunId"] == train_task

    task_run("on-exit")
    out = steps.finish(state="FAILED", error="Task pretrain failed", recipe_id="vit-huge", run_id="run-plugin",
                       namespace="", backend="local", mlflow_uri=mlflow_uri)
    run = client.get_run(kfp_run)
    assert run.data.tags["vfm.failure"] == "Task pretrain failed"
    assert run.info.status == "RUNNING" and "the plugin closes it" in out  # the plugin owns its run's status
    names = sorted(r.info.run_name for r in client.search_runs([exp]))
    assert names == sorted(["vfm-vit-huge-run", "start-run", "pretrain", "on-exit", "vit-huge-pretrain"])


def test_train_refuses_a_recipe_that_resolves_differently_than_at_start():
    with pytest.raises(UserError, match="differs from the one the pipeline started with"):
        steps.train(recipe_id="vit-huge", stage="pretrain", profile="smoke", overrides=[], data="s3://d/m.json",
                    data_digest="0" * 64, recipe_sha="not-the-digest", image="ghcr.io/x/t:1", run_id="r",
                    parent_run_id="", runs_prefix="s3://b/runs", backend="local")


def test_submit_parameters_parse_as_yaml_values():
    assert parse_params(["profile=smoke", "seeds=[0, 1]", "train_timeout_hours=12.5"]) == {
        "profile": "smoke", "seeds": [0, 1], "train_timeout_hours": 12.5}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_params(["seeds"])


def _job_of_train(monkeypatch, tmp_path, recipe_id: str, template: dict | None = None, **kw) -> dict:
    """The PyTorchJob `steps.train` hands the launcher (captured before anything is created), with
    `template` as the namespace's vfm-trainer PodTemplate (None: none, as on the local backend)."""
    import vfm.launch as launch

    seen: dict = {}

    def capture(manifest, **_):
        seen["job"] = manifest
        raise RuntimeError("captured")

    monkeypatch.setattr(launch, "run_job", capture)
    monkeypatch.setattr(launch, "read_pod_template", lambda namespace, backend: template)
    recipe = steps._recipe(recipe_id, "paper", [])
    with pytest.raises(RuntimeError, match="captured"):
        steps.train(recipe_id=recipe_id, stage="pretrain", profile="paper", overrides=[], data="s3://d/m.json",
                    data_digest="0" * 64, recipe_sha=steps.recipe_digest(recipe), image="ghcr.io/x/t:1", run_id="r",
                    parent_run_id="", runs_prefix=str(tmp_path / "runs"), backend="cluster", namespace="vfm", **kw)
    return seen["job"]


def _trainer_args(job: dict) -> list[str]:
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return spec["containers"][0]["args"]


def test_training_jobs_get_loader_workers_from_the_cpu_request(monkeypatch, tmp_path):
    # 96 cores for the node's 8 GPUs (the pipeline task's TaskConfig): 12 a rank, 2 kept for the rank itself
    job = _job_of_train(monkeypatch, tmp_path, "vit-huge", task_config={"resources": {"requests": {"cpu": "96"}}})
    args = _trainer_args(job)
    assert args[args.index("--workers") + 1] == "10"
    # without a passthrough the job's own request (10 cores a GPU) decides: 8 workers
    args = _trainer_args(_job_of_train(monkeypatch, tmp_path, "vit-huge"))
    assert args[args.index("--workers") + 1] == "8"


def test_dinov2_pretraining_gets_its_knn_sets(monkeypatch, tmp_path):
    args = _trainer_args(_job_of_train(monkeypatch, tmp_path, "dinov2-giant", knn_train="s3://d/in1k",
                                       knn_val="s3://d/in1k-val"))
    assert args[args.index("--knn-train") + 1] == "s3://d/in1k" and args[args.index("--knn-val") + 1] == "s3://d/in1k-val"
    assert "--knn-train" not in _trainer_args(_job_of_train(monkeypatch, tmp_path, "vit-huge"))


def test_an_ablation_cells_job_and_mlflow_run_are_named_after_its_cell(monkeypatch, tmp_path):
    import vfm.launch as launch
    from vfm.recipes.ablation import ablation_cells

    seen = []
    monkeypatch.setattr(launch, "run_job", lambda manifest, **_: seen.append(manifest) or (_ for _ in ()).throw(
        RuntimeError("captured")))
    monkeypatch.setattr(launch, "read_pod_template", lambda namespace, backend: None)
    for cell in ablation_cells(steps._recipe("convnext-xl", "paper", []))[:2]:
        overrides = list(cell.overrides)
        with pytest.raises(RuntimeError, match="captured"):
            steps.train(recipe_id="convnext-xl", stage="pretrain", profile="paper", overrides=overrides,
                        data="s3://d/m.json", data_digest="0" * 64,
                        recipe_sha=steps.recipe_digest(steps._recipe("convnext-xl", "paper", overrides)),
                        image="ghcr.io/x/t:1", run_id="r", parent_run_id="", runs_prefix=str(tmp_path / "runs"),
                        backend="cluster", namespace="vfm", seed=0, cell=cell.name)
        args = _trainer_args(seen[-1])
        assert args[args.index("--run-name") + 1] == f"convnext-xl-{cell.name}-seed0"
        assert args[args.index("--tag") + 1] == f"vfm.cell={cell.name}"
        assert seen[-1]["metadata"]["labels"]["vfm.io/stage"] == f"pretrain-{cell.name}"
    assert seen[0]["metadata"]["name"] != seen[1]["metadata"]["name"]  # one job per cell in one run
    plain = _trainer_args(_job_of_train(monkeypatch, tmp_path, "vit-huge"))
    assert "--run-name" not in plain and "--tag" not in plain


def test_imagenet_c_runs_its_workers(monkeypatch):
    cmds = []
    monkeypatch.setattr(steps, "_run_vfm", lambda cmd, dest, endpoint: cmds.append(cmd) or ("m", "d"))
    steps.imagenet_c(val_manifest="s3://d/val/manifest.json", data_prefix="s3://d", workers=8)
    assert cmds[0][:1] == ["make-imagenet-c"] and cmds[0][cmds[0].index("--workers") + 1] == "8"


def test_imagenet_c_shards_the_official_tarballs_when_given(monkeypatch):
    cmds = []
    monkeypatch.setattr(steps, "_run_vfm", lambda cmd, dest, endpoint: cmds.append((cmd, dest)) or ("m", "d"))
    steps.imagenet_c(source="/datasets/imagenet-c", val_manifest="s3://d/val/manifest.json", data_prefix="s3://d",
                     workers=8)
    cmd, dest = cmds[0]
    assert cmd[:4] == ["shard", "imagenet-c", "--source", "/datasets/imagenet-c"] and dest == "s3://d/imagenet-c"
    assert cmd[cmd.index("--workers") + 1] == "8"
    with pytest.raises(UserError, match="sharded whole"):
        steps.imagenet_c(source="/datasets/imagenet-c", val_manifest="v", data_prefix="s3://d", corruptions="fog")


def _h100_trainer_template() -> dict:
    """The `vfm-trainer` PodTemplate as the h100 overlay renders it (kubectl kustomize, offline)."""
    from vfm.deploy.render import render

    objs = render(Path(__file__).resolve().parents[2] / "manifests/overlays/h100")
    return next(o for o in objs if o["kind"] == "PodTemplate" and o["metadata"]["name"] == "vfm-trainer")["template"]


def test_every_replica_is_built_from_the_overlays_pod_template(monkeypatch, tmp_path):
    from vfm.launch.job import POD_TEMPLATE  # noqa: F401  (the name the launcher reads)

    template = _h100_trainer_template()
    job = _job_of_train(monkeypatch, tmp_path, "vit-huge", template=template)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    for spec in (r["template"]["spec"] for r in replicas.values()):
        c = spec["containers"][0]
        # what GitOps owns reaches every pod: resources, placement, /dev/shm, identity, priority, RDMA
        assert c["resources"]["requests"]["cpu"] == "96" and c["resources"]["limits"]["memory"] == "1000Gi"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "128Gi"
        assert spec["serviceAccountName"] == "vfm-trainer" and spec["priorityClassName"] == "vfm-training"
        assert "IPC_LOCK" in c["securityContext"]["capabilities"].get("add", []), "rdma-exemption's capability"
        # what the run adds: its image, the trainer command, its args and env, the GPU count
        assert c["image"] == "ghcr.io/x/t:1" and c["command"][:3] == ["python", "-m", "vfm.train.torchrun"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert any(e["name"] == "VFM_MAX_RESTARTS" for e in c["env"])
        assert "restartPolicy" not in spec and spec["terminationGracePeriodSeconds"] > 300
        args = c["args"]
        assert args[args.index("--workers") + 1] == "10"  # the template's 96 cores over 8 ranks, 2 kept each


def test_the_pipeline_tasks_passthrough_goes_on_top_of_the_pod_template(monkeypatch, tmp_path):
    """`.set_cpu_request()` / node selector / tolerations on the KFP train task (TaskConfig passthrough)
    reach the replicas built from the PodTemplate, instead of being dropped."""
    tc = {"resources": {"requests": {"cpu": "120", "memory": "1200Gi"}, "limits": {"memory": "1200Gi"}},
          "node_selector": {"topology.kubernetes.io/zone": "zone-a"},
          "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "vfm", "effect": "NoSchedule"}]}
    job = _job_of_train(monkeypatch, tmp_path, "vit-huge", template=_h100_trainer_template(), task_config=tc)
    for spec in (r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()):
        c = spec["containers"][0]
        assert c["resources"]["requests"]["cpu"] == "120" and c["resources"]["limits"]["memory"] == "1200Gi"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                        "topology.kubernetes.io/zone": "zone-a"}
        assert tc["tolerations"][0] in spec["tolerations"] and len(spec["tolerations"]) == 2
        args = c["args"]
        assert args[args.index("--workers") + 1] == "13"  # 120 cores over 8 ranks, 2 kept each


def test_kueue_reads_the_queue_name_from_the_jobs_own_metadata():
    from vfm.launch import Gang, JobOptions, build_job, to_manifest
    from vfm.recipes import load_recipe

    job = to_manifest(build_job(load_recipe("vit-huge"), JobOptions(
        name="j", namespace="vfm", image="ghcr.io/x/t:1", args=[], gang=Gang(scheduler="kueue", queue="vfm-h100"))))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "vfm-h100"
    pod_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" not in pod_labels


def test_evaluation_runs_as_a_gpu_job_in_the_trainer_image(monkeypatch, tmp_path):
    import vfm.launch as launch
    from vfm.launch.job import EVALUATOR_COMMAND

    seen: dict = {}

    def capture(manifest, **_):
        seen["job"] = manifest
        raise RuntimeError("captured")

    monkeypatch.setattr(launch, "run_job", capture)
    monkeypatch.setattr(launch, "read_pod_template", lambda namespace, backend: _h100_trainer_template())
    with pytest.raises(RuntimeError, match="captured"):
        steps.evaluate(recipe_id="vit-huge", profile="paper", overrides=[], export="s3://b/runs/k/finetune/seed-1/export",
                       suite="in_c", imagenet_c="s3://d/imagenet-c", seed=1, parent_run_id="p", image="ghcr.io/x/t:1",
                       run_id="r", namespace="vfm", backend="cluster")
    job = seen["job"]
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"] and job["spec"]["nprocPerNode"] == "8"  # one node
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/x/t:1" and c["command"] == EVALUATOR_COMMAND
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    args = c["args"]
    assert "--bf16" in args and args[args.index("--workers") + 1] == "10" and args[args.index("--batch-size") + 1] == "256"
    assert args[args.index("--out") + 1] == "s3://b/runs/k/finetune/seed-1/eval/in_c/results.json"
    assert "in_c=s3://d/imagenet-c" in args and "vfm.suite=in_c" in args
    assert job["metadata"]["labels"]["vfm.io/stage"] == "eval"


def test_downstream_items_start_every_stage_and_seed_from_the_pretraining_export():
    items = steps.fan_out_downstream(
        recipe_id="vit-huge-pretrain", profile="smoke", overrides=[], exports=["s3://r/pre/seed-0/export"],
        recipe_sha="abc", parent_run_id="p",
        manifests={"ade20k": ("s3://d/ade-train", "sha-a", "s3://d/ade-val"),
                   "coco2017": ("s3://d/coco-train", "sha-c", "s3://d/coco-val")})
    assert [(i["stage"], i["seed"], i["suite"]) for i in items] == [
        ("ade20k", 0, "ade20k"), ("ade20k", 1, "ade20k"), ("ade20k_linear", 0, "ade20k"),
        ("ade20k_linear", 1, "ade20k"), ("coco", 0, "coco"), ("coco", 1, "coco")]
    assert all(i["init"] == "s3://r/pre/seed-0/export" for i in items)
    assert items[-1]["data"] == "s3://d/coco-train" and items[-1]["val"] == "s3://d/coco-val"
    with pytest.raises(UserError, match="coco2017 train and val"):
        steps.fan_out_downstream(recipe_id="vit-huge-pretrain", profile="smoke", overrides=[], exports=["e"],
                                 recipe_sha="abc", parent_run_id="p",
                                 manifests={"ade20k": ("a", "s", "v"), "coco2017": ("", "", "")})


def test_downstream_results_are_aggregated_per_stage_over_its_own_seeds():
    main = [{"seed": 0, "suite": "knn", "metrics": {"eval.knn.k20.top1": 50.0}}]
    dense = [{"seed": s, "suite": "ade20k", "stage": "ade20k", "metrics": {"eval.ade20k.miou": m}}
             for s, m in ((0, 40.0), (1, 44.0), (2, 42.0))]
    dense += [{"seed": s, "suite": "coco", "stage": "coco", "metrics": {"eval.coco.box_ap": m}}
              for s, m in ((0, 10.0), (1, 12.0))]
    agg = steps.aggregate(main, dense=dense)
    assert agg["eval.knn.k20.top1"] == 50.0 and agg["eval.num_seeds"] == 1
    assert agg["eval.ade20k.miou"] == pytest.approx(42.0) and agg["eval.ade20k.miou.std"] == pytest.approx(2.0)
    assert agg["eval.ade20k.num_seeds"] == 3 and agg["eval.coco.num_seeds"] == 2
    assert agg["eval.coco.box_ap"] == pytest.approx(11.0)


def test_a_downstream_stages_job_runs_on_the_stages_own_gpus(monkeypatch, tmp_path):
    paper = _job_of_train(monkeypatch, tmp_path, "vit-huge-pretrain", init="s3://r/pre/export")
    assert paper["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 7  # pretraining: 64 GPUs, 8 nodes
    import vfm.launch as launch

    seen = []
    monkeypatch.setattr(launch, "run_job", lambda manifest, **_: seen.append(manifest) or (_ for _ in ()).throw(
        RuntimeError("captured")))
    monkeypatch.setattr(launch, "read_pod_template", lambda namespace, backend: None)
    recipe = steps._recipe("vit-huge-pretrain", "paper", [])
    for stage, nodes in (("ade20k", 1), ("coco", 8)):
        with pytest.raises(RuntimeError, match="captured"):
            steps.train(recipe_id="vit-huge-pretrain", stage=stage, profile="paper", overrides=[], data="s3://d/m.json",
                        data_digest="0" * 64, recipe_sha=steps.recipe_digest(recipe), image="ghcr.io/x/t:1",
                        run_id="r", parent_run_id="", runs_prefix=str(tmp_path / "runs"), backend="cluster",
                        namespace="vfm", init="s3://r/pre/export", seed=0)
        specs = seen[-1]["spec"]["pytorchReplicaSpecs"]
        assert 1 + specs.get("Worker", {}).get("replicas", 0) == nodes, stage
        args = specs["Master"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--stage") + 1] == stage and args[args.index("--init") + 1] == "s3://r/pre/export"


def test_the_curate_step_runs_a_rayjob_of_the_recipe_on_a_cluster(monkeypatch, fake_k8s):
    """steps.curate with backend=cluster: a RayJob of the trainer image runs `vfm curate` with the recipe's pools from
    the raw-data volume, sized by curate.workers; its failure fails the step, naming the job's reason."""
    from kubernetes import client as k8s

    from vfm.launch import JobFailed
    from vfm.launch.cluster import ClusterBackend, kube_configuration

    api = k8s.ApiClient(kube_configuration(fake_k8s.url))
    monkeypatch.setattr(ClusterBackend, "from_environment", classmethod(lambda cls, **kw: cls(api=api, poll_s=0.05)))
    fake_k8s.pod_templates[("vfm", "vfm-ray")] = {"spec": {"containers": [{"name": "ray", "image": "x"}]}}
    fake_k8s.default_rayjob_timeline = [
        {"jobDeploymentStatus": "Initializing"},
        {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "driver exited 1"}]
    with pytest.raises(JobFailed, match="AppFailed"):
        steps.curate(recipe_id="meta-dinov2-giant", profile="paper", overrides=[], data_prefix="s3://vfm/data",
                     sources=[], eval_sets=[], run_id="run-1", parent_run_id="", image="reg/vfm-trainer:1",
                     namespace="vfm", backend="cluster", timeout_hours=1.0)
    job = fake_k8s.created[0]
    assert job["kind"] == "RayJob" and job["metadata"]["namespace"] == "vfm"
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("vfm curate meta-dinov2-giant --dest s3://vfm/data/curated-1.2b") and "--raw-root" in entry
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 64 and workers["rayStartParams"]["num-gpus"] == "8"
    assert fake_k8s.deleted == [job["metadata"]["name"]], "a failed RayJob is deleted"
