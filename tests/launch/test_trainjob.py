"""Kubeflow Trainer v2 (TrainJob) as the second launcher: the object built from the kubeflow-trainer-api
models and validated against the v2.3.0 CRD, the cluster contract against the fake API server (the
created spec, Complete, Failed, timeout, cancel, adoption, the node-0 log), and a real 2-node gloo
all-reduce on the local backend with the env Trainer v2's torch plugin injects."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from tests.helpers.fake_k8s import cancel_with_sigterm, cond
from vfm.deploy.validate import validation_errors
from vfm.errors import UserError
from vfm.launch import (
    Elastic,
    Gang,
    JobFailed,
    JobOptions,
    JobTimeout,
    build_manifest,
    job_name,
    trainer_args,
)
from vfm.launch.cluster import ClusterBackend, kube_configuration
from vfm.launch.local import LocalBackend, operator_env, replicas_of
from vfm.launch.trainjob import RESERVED_ENV, RUNTIME
from vfm.recipes import load_recipe

REPO = Path(__file__).resolve().parents[2]
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/vision/trainjobs"
PODTEMPLATE = yaml.safe_load((REPO / "manifests/base/trainer-podtemplate.yaml").read_text())["template"]
RUNTIME_YAML = REPO / "manifests/components/trainer-v2/cluster-training-runtime.yaml"


def opts(run="run-1", **kw):
    recipe = load_recipe("vit-huge")
    base = dict(name=job_name(recipe.id, "pretrain", run), namespace="vision",
                image="ghcr.io/vfm-project/vfm-trainer:0.1.0", labels={"vfm.io/run": run},
                args=trainer_args(recipe.id, "pretrain", data="s3://d/manifest.json", out="s3://o"),
                env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, active_deadline_seconds=3600)
    return recipe, JobOptions(**{**base, **kw})


def trainjob(run="run-1", template=PODTEMPLATE, **kw):
    recipe, o = opts(run, **kw)
    return build_manifest(recipe, o, template, launcher="trainjob")


def node_patch(m):
    (patch,) = m["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return patch["manager"], node["name"], node["template"]["spec"]["template"]


# --- the object ---------------------------------------------------------------------------------
def test_the_trainjob_names_the_vfm_runtime_and_carries_the_recipes_shape():
    m = trainjob(gang=Gang(scheduler="kueue", queue="vfm-h100"))
    assert (m["apiVersion"], m["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert m["spec"]["runtimeRef"] == {"name": RUNTIME, "kind": "ClusterTrainingRuntime",
                                       "apiGroup": "trainer.kubeflow.org"}
    t = m["spec"]["trainer"]
    # vit-huge pretraining: 64 H100s = 8 nodes × 8 ranks; torchrun through the exit-code-keeping wrapper
    assert (t["numNodes"], t["numProcPerNode"]) == (8, 8)
    assert t["command"][:3] == ["python", "-m", "vfm.train.torchrun"] and t["args"][:3] == ["vit-huge", "--stage", "pretrain"]
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"name": "VFM_MAX_RESTARTS", "value": "3"} in t["env"] and not RESERVED_ENV & {e["name"] for e in t["env"]}
    assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "vfm-h100"
    assert m["spec"]["activeDeadlineSeconds"] == 3600
    manager, name, pod = node_patch(m)
    assert (manager, name) == ("vfm.io/launcher", "node")
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["metadata"]["labels"]["vfm.io/run"] == "run-1"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 360  # the trainer's checkpoint after SIGTERM
    assert validation_errors(m) == []


def test_the_overlays_pod_settings_reach_the_trainjob_through_the_pod_template():
    h100 = yaml.safe_load((REPO / "manifests/overlays/h100/trainer-h100.yaml").read_text())["template"]
    template = {**PODTEMPLATE, "spec": {**PODTEMPLATE["spec"], **h100["spec"], "containers": [
        {**PODTEMPLATE["spec"]["containers"][0], "resources": {
            "requests": {"cpu": "96", "memory": "1000Gi", "rdma/rdma_shared_device_a": "1"},
            "limits": {"memory": "1000Gi", "rdma/rdma_shared_device_a": "1"}}}]}}
    m = trainjob(template=template)
    res = m["spec"]["trainer"]["resourcesPerNode"]
    assert res["requests"]["cpu"] == "96" and res["limits"]["rdma/rdma_shared_device_a"] == "1"
    _, _, pod = node_patch(m)
    assert {v["name"]: v for v in pod["spec"]["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "128Gi"
    assert pod["spec"]["containers"] == [{"name": "node", "securityContext": PODTEMPLATE["spec"]["containers"][0]["securityContext"]}]
    assert validation_errors(m) == []


@pytest.mark.parametrize("kw, message", [
    (dict(elastic=Elastic(8, 8)), "no elastic TrainJob"),
    (dict(gang=Gang(scheduler="volcano")), "podGroupPolicy"),
    (dict(secret="other-secret"), "cannot add envFrom"),
    (dict(env={"PET_NNODES": "2"}), "torch plugin sets these itself"),
    (dict(image="ghcr.io/vfm-project/vfm-trainer:latest"), "pin a tag"),
])
def test_what_trainer_v2_cannot_express_is_refused_with_the_way_out(kw, message):
    with pytest.raises(UserError, match=message):
        trainjob(**kw)


def test_the_crd_schema_rejects_what_the_api_server_would():
    m = trainjob()
    m["spec"]["trainer"]["numProcsPerNode"] = 8  # a typo of numProcPerNode
    m["spec"]["runtimeRef"].pop("name")
    errors = validation_errors(m)
    assert any("numProcsPerNode" in e for e in errors), errors
    assert any("'name' is a required property" in e for e in errors), errors


def test_the_runtime_validates_and_mirrors_the_pod_template():
    runtime = yaml.safe_load(RUNTIME_YAML.read_text())
    assert validation_errors(runtime) == []
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert job["name"] == "node" and runtime["metadata"]["name"] == RUNTIME
    pod = job["template"]["spec"]["template"]["spec"]
    # what a TrainJob cannot patch must say what the PodTemplate says, or the two launchers' pods drift apart
    for key in ("serviceAccountName", "automountServiceAccountToken", "priorityClassName", "securityContext"):
        assert pod[key] == PODTEMPLATE["spec"][key], key
    (container,) = pod["containers"]
    (template_container,) = PODTEMPLATE["spec"]["containers"]
    for key in ("envFrom", "volumeMounts"):
        assert container[key] == template_container[key], key
    assert {v["name"] for v in pod["volumes"]} == {v["name"] for v in PODTEMPLATE["spec"]["volumes"]}
    # the ExitCode policy of the PyTorchJob launcher: 1-127 fail for good, >= 128 restart every node
    (fail, ) = [r for r in job["template"]["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail["onExitCodes"]["values"] == list(range(1, 128)) and pod["restartPolicy"] == "Never"
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"]


# --- the cluster contract (fake API server on loopback) ----------------------------------------
def backend(fake, lines):
    return ClusterBackend(api=k8s.ApiClient(kube_configuration(fake.url)), poll_s=0.05, log=lines.append)


def test_complete_creates_the_built_spec_and_streams_node_0s_log(fake_k8s):
    m = trainjob()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [[], [cond("Suspended", "False")], [cond("Suspended", "False"), cond("Complete")]]
    fake_k8s.logs[f"{name}-node-0-0"] = "step 1 loss=6.9\nstep 2 loss=6.1\n"
    lines: list[str] = []
    result = backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=2)
    assert result.state == "Complete" and result.restarts is None  # the JobSet counts them, not the launcher
    assert fake_k8s.created == [m] and ("POST", TRAINJOBS) in fake_k8s.requests
    assert f"[{name}-node-0-0] step 2 loss=6.1" in lines
    assert fake_k8s.deleted == []


def test_failed_trainjob_fails_the_step_with_its_reason_and_is_deleted(fake_k8s):
    m = trainjob()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [[cond("Suspended", "False")],
                                [cond("Failed", reason="DeadlineExceeded", message="exceeded activeDeadlineSeconds")]]
    with pytest.raises(JobFailed, match="TrainJob .* DeadlineExceeded: exceeded activeDeadlineSeconds"):
        backend(fake_k8s, []).run(m, timeout_s=30, max_restarts=2)
    assert fake_k8s.deleted == [name] and ("DELETE", f"{TRAINJOBS}/{name}") in fake_k8s.requests


def test_timeout_and_cancel_delete_the_trainjob(fake_k8s):
    m = trainjob()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [[cond("Suspended", "False")]]
    with pytest.raises(JobTimeout, match="TrainJob .* not finished after 1 s"):
        backend(fake_k8s, []).run(m, timeout_s=1, max_restarts=2)
    assert fake_k8s.deleted == [name]
    cancel_with_sigterm(lambda: backend(fake_k8s, []).run(m, timeout_s=60, max_restarts=2))
    assert fake_k8s.deleted == [name, name]


def test_a_retried_step_adopts_its_trainjob_and_the_exit_handler_deletes_both_kinds(fake_k8s):
    m = trainjob()
    name = m["metadata"]["name"]
    fake_k8s.jobs[("vision", name)] = m  # left by an earlier attempt of this step
    fake_k8s.timelines[name] = [[cond("Complete")]]
    lines: list[str] = []
    backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=2)
    assert fake_k8s.created == [] and any(f"adopting TrainJob vision/{name}" in line for line in lines)

    from vfm.launch import to_manifest
    from vfm.launch.job import build_job

    recipe, o = opts("run-1", name="vit-huge-ft-other")
    be = backend(fake_k8s, lines)
    be.create(to_manifest(build_job(recipe, o)))  # a PyTorchJob of the same run
    assert sorted(be.delete_run_jobs("run-1", "vision")) == sorted([name, "vit-huge-ft-other"])
    fake_k8s.forbidden.add(TRAINJOBS)  # a runner without the trainer-v2 Role still cleans up its PyTorchJobs
    assert be.delete_run_jobs("run-1", "vision") == []
    assert any("may not list trainjobs" in line for line in lines)


# --- the local backend: a 2-node TrainJob as processes -----------------------------------------
SCRIPT = textwrap.dedent("""
    import json, os, pathlib
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    keys = ["PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "MASTER_ADDR", "WORLD_SIZE"]
    out = pathlib.Path(os.environ["OUT"])
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"sum": t.item(), "world": dist.get_world_size(), "env": {k: os.environ.get(k) for k in keys}}))
    dist.destroy_process_group()
""")


def test_a_two_node_local_trainjob_all_reduces_with_trainer_v2s_env(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(SCRIPT)
    recipe = load_recipe("vit-huge", profile="smoke", overrides=[
        "hardware.gpus=2", "hardware.gpus_per_node=1", "stages.pretrain.batch.micro_batch=4",
        "stages.pretrain.batch.global_batch=8", "stages.finetune.batch.micro_batch=4",
        "stages.finetune.batch.global_batch=8"])
    o = JobOptions(name="local-trainjob", namespace="default", image="ghcr.io/x/t:1", secret=None, args=[str(script)],
                   command=("python", "-m", "vfm.train.torchrun"), env={"OUT": str(tmp_path)})
    m = build_manifest(recipe, o, None, launcher="trainjob")
    # exactly the torch plugin's variables, no operator-v1 MASTER_ADDR / RANK / WORLD_SIZE
    (node0, _) = replicas_of(m)
    assert set(operator_env(m, node0, 2, 29500)) == RESERVED_ENV
    lines: list[str] = []
    result = LocalBackend(log=lines.append).run(m, timeout_s=180, max_restarts=0)
    assert result.state == "Complete", lines[-20:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [3.0, 3.0] and {r["world"] for r in ranks} == {2}
    assert [r["env"]["PET_NODE_RANK"] for r in ranks] == ["0", "1"]
    assert {(r["env"]["PET_NNODES"], r["env"]["PET_NPROC_PER_NODE"], r["env"]["PET_MASTER_ADDR"]) for r in ranks} == {
        ("2", "1", "127.0.0.1")}
    # torchrun derives its workers' WORLD_SIZE from PET_NNODES × PET_NPROC_PER_NODE
    assert {r["env"]["WORLD_SIZE"] for r in ranks} == {"2"}
    assert any("TrainJob local-trainjob Complete (local, 2 replicas" in line for line in lines)


def test_an_unknown_launcher_is_refused_before_anything_starts(tmp_path):
    recipe, o = opts()
    with pytest.raises(UserError, match="launcher 'mpijob': use one of pytorchjob, trainjob"):
        build_manifest(recipe, o, None, launcher="mpijob")
    from vfm.pipeline.local import run_local

    with pytest.raises(UserError, match="--launcher 'mpijob'"):
        run_local("vit-huge", workdir=tmp_path, launcher="mpijob")
    assert not (tmp_path / "services").exists()  # no embedded server was started
