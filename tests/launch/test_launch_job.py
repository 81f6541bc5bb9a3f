"""The PyTorchJob built from a recipe: shape, scheduling, security, and the wire format."""

from __future__ import annotations

import pytest

from vfm.deploy.policy import hygiene_violations, restricted_violations
from vfm.deploy.validate import validation_errors
from vfm.errors import UserError
from vfm.launch import Elastic, Gang, JobOptions, build_job, job_name, to_manifest, trainer_args
from vfm.recipes import load_recipe

IMAGE = "ghcr.io/vfm-project/vfm-trainer:0.1.0"


def manifest(recipe_id="vit-huge", profile="paper", **kw):
    recipe = load_recipe(recipe_id, profile=profile)
    args = trainer_args(recipe.id, "pretrain", data="s3://d/manifest.json", out="s3://o/pretrain",
                        profile=profile, run_key="run-1/pretrain")
    opts = JobOptions(name=job_name(recipe.id, "pretrain", "run-1"), namespace="vision", image=IMAGE, args=args,
                      labels={"vfm.io/run": "run-1"}, **kw)
    return to_manifest(build_job(recipe, opts))


def test_paper_recipe_is_master_plus_workers_with_numeric_nproc_and_gpus():
    m = manifest("vit-huge")  # 64 GPUs, 8 per node
    spec = m["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 7
    for rep in spec["pytorchReplicaSpecs"].values():
        assert rep["restartPolicy"] == "ExitCode"
        pod = rep["template"]["spec"]
        c = pod["containers"][0]
        assert c["name"] == "pytorch"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert c["command"][:3] == ["python", "-m", "vfm.train.torchrun"]
        assert c["args"][:3] == ["vit-huge", "--stage", "pretrain"]
        assert c["envFrom"] == [{"secretRef": {"name": "vfm-credentials"}}]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    run = spec["runPolicy"]
    assert run["cleanPodPolicy"] == "Running" and run["backoffLimit"] == 3 and run["ttlSecondsAfterFinished"] > 0


def test_pod_templates_are_restricted_pinned_and_schema_valid():
    for rid in ("vit-huge", "dinov2-giant", "convnext-xl"):
        m = manifest(rid, active_deadline_seconds=3600, gang=Gang(queue="gpu"))
        assert restricted_violations(m) == []
        assert hygiene_violations(m) == []
        assert validation_errors(m) == []


def test_single_node_smoke_job_is_master_only_without_gpus():
    m = manifest("vit-huge", profile="smoke")
    reps = m["spec"]["pytorchReplicaSpecs"]
    assert list(reps) == ["Master"] and m["spec"]["nprocPerNode"] == "2"
    pod = reps["Master"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod


def test_gang_elastic_and_deadline_options():
    m = manifest("dinov2-giant", gang=Gang(queue="h100", min_available=12, priority_class="train"),
                 active_deadline_seconds=7200, elastic=Elastic(min_nodes=16, max_nodes=16))
    spec = m["spec"]
    assert spec["runPolicy"]["schedulingPolicy"] == {"minAvailable": 12, "queue": "h100", "priorityClass": "train"}
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 7200
    assert spec["elasticPolicy"] == {"minReplicas": 16, "maxReplicas": 16, "maxRestarts": 3, "rdzvBackend": "c10d"}
    # a node count that may change would resume at a world size no checkpoint fits
    with pytest.raises(UserError, match="resumes only at the world size it checkpointed at"):
        manifest("dinov2-giant", elastic=Elastic(min_nodes=8, max_nodes=16))
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"] and spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 128 // 8  # paper 004: 128 accelerators
    kueue = manifest("dinov2-giant", gang=Gang(scheduler="kueue", queue="team-a"))
    # Kueue reads the queue from the job's own metadata (its jobframework), not from the pods
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "schedulingPolicy" not in kueue["spec"]["runPolicy"]


def test_task_config_passthrough_overrides_resources_and_placement():
    m = manifest("convnext-xl", resources={"limits": {"nvidia.com/gpu": 4}, "requests": {"cpu": "40"}},
                 node_selector={"pool": "h100"}, tolerations=[{"key": "dedicated", "operator": "Exists"}],
                 extra_env=[{"name": "NCCL_DEBUG", "value": "INFO"}])
    pod = m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" and c["resources"]["requests"]["cpu"] == "40"
    assert pod["nodeSelector"]["pool"] == "h100"
    assert {"key": "dedicated", "operator": "Exists"} in pod["tolerations"]
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in c["env"]


def test_job_names_are_unique_per_run_stable_per_retry_and_dns_safe():
    a = job_name("meta-dinov2-giant", "pretrain", "run-a")
    assert a == job_name("meta-dinov2-giant", "pretrain", "run-a")
    assert a != job_name("meta-dinov2-giant", "pretrain", "run-b")
    assert job_name("vit-huge", "finetune", "r", seed=0) != job_name("vit-huge", "finetune", "r", seed=1)
    assert len(a) <= 48 and a.replace("-", "").isalnum() and a == a.lower()


@pytest.mark.parametrize("kw, match", [({"image": "ghcr.io/x/trainer:latest"}, "pin a tag"),
                                       ({"image": "trainer"}, "pin a tag"),
                                       ({"max_restarts": -1}, "max_restarts")])
def test_bad_options_are_user_errors(kw, match):
    recipe = load_recipe("vit-huge")
    opts = {"name": "ok", "namespace": "n", "image": IMAGE, "args": [], **kw}
    with pytest.raises(UserError, match=match):
        build_job(recipe, JobOptions(**opts))


def test_trainer_args_carry_every_run_parameter():
    args = trainer_args("vit-huge", "finetune", data="s3://d/m.json", out="s3://o", profile="smoke",
                        overrides=["stages.finetune.steps=2"], init="s3://o/pretrain/export", seed=1,
                        run_key="r/finetune/1", parent_run_id="abc")
    assert args == ["vit-huge", "--stage", "finetune", "--data", "s3://d/m.json", "--out", "s3://o",
                    "--profile", "smoke", "--set", "stages.finetune.steps=2", "--init", "s3://o/pretrain/export",
                    "--seed", "1", "--run-key", "r/finetune/1", "--parent-run-id", "abc"]


def test_grace_period_outlasts_the_trainers_checkpoint_window():
    """SIGTERM → the trainer's launcher waits SHUTDOWN_TIMEOUT_S for ranks to save; the kubelet must not SIGKILL first."""
    from vfm.train.torchrun import SHUTDOWN_TIMEOUT_S

    for replica in manifest("vit-huge")["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_TIMEOUT_S


def test_every_known_gpu_has_a_peak_and_a_node_label():
    """One key per GPU across the tables: a GPU `vfm plan` prices is one the launcher can place."""
    from vfm.recipes.gpus import GPU_PRODUCTS, GPU_SPECS

    assert set(GPU_PRODUCTS) == set(GPU_SPECS)
    for rid in ("vit-huge", "convnext-xl", "dinov2-giant"):
        recipe = load_recipe(rid)
        spec = to_manifest(build_job(recipe, JobOptions(name="j", namespace="vfm", image="ghcr.io/x/t:1", args=[])))
        selector = spec["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["nodeSelector"]
        assert selector["nvidia.com/gpu.product"] == GPU_PRODUCTS[recipe.hardware.gpu]
