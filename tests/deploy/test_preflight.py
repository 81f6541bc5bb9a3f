"""`vfm preflight`: passes on what main deploys, finds the cluster-path defects of the first cluster path, and
checks a live cluster (the loopback fake API server, real MLflow and S3).

`old_main/` holds what commit 3511c1c (the first cluster path) produced: its committed `pipelines/vit-huge.yaml`,
its rendered h100 overlay (`kubectl kustomize manifests/overlays/h100`) and the pretraining PyTorchJob its train
step created (its `build_job` with the step's options; namespace "" resolved to the launcher pod's `kubeflow`).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.fake_k8s import fake_k8s_server
from vfm.deploy import preflight as pf
from vfm.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[2]
OLD = Path(__file__).parent / "old_main"
H100 = ROOT / "manifests" / "overlays" / "h100"
H100_TRAINER_V2 = ROOT / "manifests" / "overlays" / "h100-trainer-v2"
RUNTIME_PATH = "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/vfm-torch"
SECRETS_EXAMPLE = ROOT / "manifests" / "secrets" / "vfm-secrets.yaml.example"


def checks(findings) -> set[str]:
    return {f.check for f in findings}


@pytest.fixture(scope="module")
def h100_plan(kubectl):
    return pf.offline_plan("vit-huge", H100)


def run_offline(plan, objects, template, **kw):
    return pf.check_offline(plan, objects, template, **kw)


# --- main passes ----------------------------------------------------------------------------------
def test_cli_passes_for_vit_huge_on_h100(kubectl):
    proc = subprocess.run([sys.executable, "-m", "vfm", "preflight", "vit-huge", "--overlay", "h100"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 jobs (pretrain: 8 pods, finetune: 8 pods" in " ".join(proc.stdout.split())
    assert "ok: refs, rbac, template, gpu-image, images, workers, shm, grace, policy, queue" in proc.stdout


def test_queued_vit_huge_fits_the_h100_quota(kubectl):
    plan, objects, template = pf.offline_plan("vit-huge", H100, params={"kueue_queue": "vfm-h100"})
    assert all(j.manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "vfm-h100" for j in plan.jobs)
    assert run_offline(plan, objects, template) == []


def test_cli_exits_2_with_object_field_fix(kubectl):
    """The paper-scale job on the CPU-sized local overlay: too few cores for the loader workers."""
    proc = subprocess.run([sys.executable, "-m", "vfm", "preflight", "vit-huge", "--overlay", "local"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "[workers] PyTorchJob vfm/vit-huge-pr-" in proc.stdout
    assert "containers[pytorch].resources.requests.cpu: 1 cores for 8 ranks" in proc.stdout
    assert "fix: request ≥" in proc.stdout


# --- the first cluster path's defects 1-6 ----------------------------------------------------------
@pytest.fixture(scope="module")
def old_main():
    pkg = pf.Package.load(OLD / "vit-huge.yaml")
    rendered = [d for d in yaml.safe_load_all((OLD / "h100.yaml").read_text()) if d]
    objects = pf.Objects(rendered, pf.byo_declarations(SECRETS_EXAMPLE))
    params = pkg.defaults()
    job = json.loads((OLD / "pretrain-job.json").read_text())
    plan = pf.Plan("vit-huge", params, pkg.tasks(params), [pf.PlannedJob("pretrain", job, load_recipe("vit-huge"),
                                                                         "pretrain")])
    return plan, objects, rendered


def _find(findings, check, text):
    hits = [f for f in findings if f.check == check and text in str(f)]
    assert hits, f"no [{check}] finding with {text!r} in:\n" + "\n".join(map(str, findings))
    return hits


def test_old_main_defects_1_to_6(old_main):
    plan, objects, _ = old_main
    found = run_offline(plan, objects, pf.pod_template_of(objects, "vfm"))
    # 1. evaluation on the CPU-only components image while holding a GPU
    _find(found, "gpu-image", "exec-evaluate container.resources.accelerator: requests 1 GPU but runs in "
          "ghcr.io/vfm-project/vfm-components:0.1.0")
    # 2. zero loader workers
    _find(found, "workers", "passes no --workers")
    # 3. the PodTemplate never reached the job
    for field in ("spec.priorityClassName", "spec.serviceAccountName", "spec.volumes[dshm]",
                  "securityContext.capabilities.add", "resources.requests[rdma/rdma_shared_device_a]"):
        _find(found, "template", field)
    # 4. namespace "" and RBAC disagree
    _find(found, "refs", "pipeline parameter namespace defaultValue: is empty")
    _find(found, "rbac", "vfm-pipeline-runner may not create pytorchjobs, get pytorchjobs")
    # 6. the raw-data PVC is defined nowhere; MLflow's optional keys are mandatory
    _find(found, "refs", "PVC kubeflow/vfm-raw-datasets is defined nowhere")
    _find(found, "refs", "key MLFLOW_TRACKING_USERNAME of Secret kubeflow/vfm-credentials is optional")


def test_old_main_defect_5_images_frozen(old_main):
    """An overlay that deploys your registry's trainer: the old package still names ghcr.io's, and it could
    not be compiled otherwise."""
    plan, _, rendered = old_main
    mine = copy.deepcopy(rendered)
    for obj in mine:
        if obj["kind"] == "PodTemplate":
            obj["template"]["spec"]["containers"][0]["image"] = "registry.example.com/vfm-trainer:1.2.0"
    objects = pf.Objects(mine, pf.byo_declarations(SECRETS_EXAMPLE))
    found = run_offline(plan, objects, pf.pod_template_of(objects, "vfm"),
                        components_image="registry.example.com/vfm-components:1.2.0")
    _find(found, "images", "is ghcr.io/vfm-project/vfm-trainer:0.1.0, but the overlay deploys the trainer image "
          "registry.example.com/vfm-trainer:1.2.0")
    _find(found, "images", "--components-image registry.example.com/vfm-components:1.2.0")
    found = run_offline(plan, objects, pf.pod_template_of(objects, "vfm"), trainer_image="registry.example.com/t:2")
    _find(found, "images", "is ghcr.io/vfm-project/vfm-trainer:0.1.0, but you built registry.example.com/t:2")


def test_old_overlay_fails_todays_package(h100_plan, old_main):
    """Today's package and jobs against the old overlay: it lacks the raw-data PVC and lets the runner read no
    PodTemplate. The same checks pass on today's overlay, and a claim declared bring-your-own counts."""
    plan, objects, template = h100_plan
    _, _, rendered = old_main
    old_objects = pf.Objects(rendered, pf.byo_declarations(SECRETS_EXAMPLE))
    found = run_offline(plan, old_objects, pf.pod_template_of(old_objects, "vfm"))
    assert checks(found) == {"refs", "rbac"}
    _find(found, "rbac", "may not get podtemplates/vfm-trainer in vfm")
    assert {f.obj for f in found if f.check == "refs"} == {f"pipeline task {t.executor}" for t in plan.tasks if t.pvcs}
    no_pvc = [o for o in objects.items if o["kind"] != "PersistentVolumeClaim" or o["metadata"]["name"] != "vfm-raw-datasets"]
    _find(run_offline(plan, pf.Objects(no_pvc, objects.byo), template), "refs", "PVC kubeflow/vfm-raw-datasets")
    byo = pf.Objects(no_pvc, [*objects.byo, {"kind": "PersistentVolumeClaim",
                                              "metadata": {"namespace": "kubeflow", "name": "vfm-raw-datasets"}}])
    assert run_offline(plan, byo, template) == []


# --- each check on a broken copy of today's plan ---------------------------------------------------
def _broken(h100_plan, edit_job=None, edit_objects=None):
    plan, objects, template = h100_plan
    plan = copy.deepcopy(plan)
    items = copy.deepcopy(objects.items)
    if edit_job:
        for pj in plan.jobs:
            edit_job(pj.manifest)
    if edit_objects:
        edit_objects(items)
    objs = pf.Objects(items, objects.byo)
    return run_offline(plan, objs, pf.pod_template_of(objs, "vfm"))


def _pods(job):
    return [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


def test_shm_too_small_for_the_workers(h100_plan):
    def small(job):
        for spec in _pods(job):
            next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] = "1Gi"
    _find(_broken(h100_plan, small), "shm", "spec.volumes[dshm].emptyDir.sizeLimit: 1Gi <")


def test_queue_label_on_the_pods_only_is_found(h100_plan):
    def pods_only(job):  # where the first launcher put it: Kueue reads the job's own metadata
        for r in job["spec"]["pytorchReplicaSpecs"].values():
            r["template"]["metadata"].setdefault("labels", {})["kueue.x-k8s.io/queue-name"] = "vfm-h100"
    _find(_broken(h100_plan, pods_only), "template", "is on the pods only; Kueue reads it from the job's own metadata")


def test_grace_shorter_than_the_checkpoint_window(h100_plan):
    def short(job):
        for spec in _pods(job):
            spec["terminationGracePeriodSeconds"] = 30
    _find(_broken(h100_plan, short), "grace", "30 s; ranks take up to 300 s")


def test_privileged_pod_fails_the_policy(h100_plan):
    def privileged(job):
        for spec in _pods(job):
            spec["containers"][0]["securityContext"]["privileged"] = True
    _find(_broken(h100_plan, privileged), "policy", "privileged must not be true")


def test_ipc_lock_without_the_exemption_is_rejected(h100_plan):
    def no_vap(items):
        items[:] = [o for o in items if o["kind"] != "ValidatingAdmissionPolicy"]
        for o in items:
            if o["kind"] == "Namespace" and o["metadata"]["name"] == "vfm":
                o["metadata"]["labels"][pf.ENFORCE_LABEL] = "restricted"
    _find(_broken(h100_plan, edit_objects=no_vap), "policy", "manifests/components/rdma-exemption")


def test_missing_priority_class_secret_and_runner(h100_plan):
    def drop(items):
        items[:] = [o for o in items if not (o["kind"] == "PriorityClass" or
                                             (o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "vfm-pipeline-runner"))]
    found = _broken(h100_plan, edit_objects=drop)
    _find(found, "refs", "PriorityClass vfm-training does not exist")
    _find(found, "refs", "ServiceAccount kubeflow/vfm-pipeline-runner")
    plan, objects, template = h100_plan
    no_byo = pf.Objects(objects.items, [])
    _find(run_offline(plan, no_byo, template), "refs", "Secret kubeflow/vfm-credentials is neither in the overlay")


def test_rbac_without_pod_logs(h100_plan):
    def no_logs(items):
        for o in items:
            if o["kind"] == "Role" and o["metadata"]["name"] == "vfm-pytorchjob-launcher":
                o["rules"] = [r for r in o["rules"] if "pods/log" not in r["resources"]]
    _find(_broken(h100_plan, edit_objects=no_logs), "rbac", "get pods/log in vfm;")


def test_queue_quota_and_coverage(kubectl):
    plan, objects, template = pf.offline_plan("vit-huge", H100, params={"kueue_queue": "vfm-h100"})
    items = copy.deepcopy(objects.items)
    for o in items:
        if o["kind"] == "ClusterQueue":
            group = o["spec"]["resourceGroups"][0]
            group["coveredResources"].remove("rdma/rdma_shared_device_a")
            for r in group["flavors"][0]["resources"]:
                if r["name"] == "nvidia.com/gpu":
                    r["nominalQuota"] = 32
    found = run_offline(plan, pf.Objects(items, objects.byo), template)
    _find(found, "queue", "nominalQuota[nvidia.com/gpu]: 32 < 64")
    _find(found, "queue", "does not cover rdma/rdma_shared_device_a")
    plan2, objects2, template2 = pf.offline_plan("vit-huge", H100, params={"kueue_queue": "nope"})
    _find(run_offline(plan2, objects2, template2), "refs", "LocalQueue vfm/nope does not exist")


def test_recipe_gpu_differs_from_the_overlay(kubectl):
    plan, objects, template = pf.offline_plan("convnext-xl", H100)
    _find(run_offline(plan, objects, template), "template", "but recipe convnext-xl runs on A100-SXM-80GB")


# --- live -----------------------------------------------------------------------------------------
def _healthy_cluster(fake, plan, template):
    user = pf.SA_USER.format(namespace="kubeflow", name="vfm-pipeline-runner")
    from vfm.launch.cluster import LAUNCHER_PERMISSIONS

    for group, resource, verb, name in LAUNCHER_PERMISSIONS[plan.launcher]:
        fake.grants.add((user, "vfm", verb, group, resource, name))
    fake.objects["/apis/apiextensions.k8s.io/v1/customresourcedefinitions/trainjobs.trainer.kubeflow.org"] = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "trainjobs.trainer.kubeflow.org"},
        "spec": {"group": "trainer.kubeflow.org", "scope": "Namespaced",
                 "names": {"kind": "TrainJob", "plural": "trainjobs"},
                 "versions": [{"name": "v1alpha1", "served": True, "storage": True}]}}
    fake.objects["/apis/apps/v1/namespaces/kubeflow-system/deployments/kubeflow-trainer-controller-manager"] = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "kubeflow-trainer-controller-manager", "namespace": "kubeflow-system"},
        "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "trainer"}},
                 "template": {"spec": {"containers": [{"name": "manager"}]}}},
        "status": {"availableReplicas": 1, "replicas": 1}}
    fake.objects[RUNTIME_PATH] = yaml.safe_load(
        (ROOT / "manifests/components/trainer-v2/cluster-training-runtime.yaml").read_text())
    fake.pod_templates[("vfm", "vfm-trainer")] = template
    fake.objects["/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pytorchjobs.kubeflow.org"] = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "pytorchjobs.kubeflow.org"},
        "spec": {"group": "kubeflow.org", "scope": "Namespaced", "names": {"kind": "PyTorchJob", "plural": "pytorchjobs"},
                 "versions": [{"name": "v1", "served": True, "storage": True}]}}
    fake.objects["/apis/apps/v1/namespaces/kubeflow/deployments/training-operator"] = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "training-operator", "namespace": "kubeflow"},
        "spec": {"selector": {"matchLabels": {"app": "training-operator"}},
                 "template": {"spec": {"containers": [{"name": "training-operator"}]}}},
        "status": {"availableReplicas": 1, "replicas": 1}}
    for i in range(8):
        fake.objects[f"/api/v1/nodes/h100-{i}"] = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"h100-{i}", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "112", "memory": "2000Gi"}}}
    for ns in ("kubeflow", "vfm"):
        fake.objects[f"/api/v1/namespaces/{ns}/secrets/vfm-credentials"] = {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vfm-credentials", "namespace": ns},
            "data": {"AWS_ACCESS_KEY_ID": "eA==", "AWS_SECRET_ACCESS_KEY": "eA=="}}
    fake.objects["/api/v1/namespaces/kubeflow/persistentvolumeclaims/vfm-raw-datasets"] = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "vfm-raw-datasets", "namespace": "kubeflow"},
        "spec": {"accessModes": ["ReadWriteMany"]}, "status": {"phase": "Bound"}}


def _live(fake, plan, mlflow_uri, s3_endpoint):
    from kubernetes import client

    from vfm.launch.cluster import kube_configuration

    return pf.check_live(plan, client.ApiClient(kube_configuration(fake.url)), mlflow_uri=mlflow_uri,
                         s3_endpoint=s3_endpoint, timeout_s=5)


@pytest.fixture
def live_plan(h100_plan, s3_endpoint, bucket):
    plan, objects, template = h100_plan
    plan = copy.deepcopy(plan)
    plan.params.update(data_prefix=f"s3://{bucket}/data", runs_prefix=f"s3://{bucket}/runs")
    return plan, template


def test_live_healthy_cluster_passes(live_plan, mlflow_uri, s3_endpoint):
    plan, template = live_plan
    with fake_k8s_server() as fake:
        _healthy_cluster(fake, plan, template)
        assert _live(fake, plan, mlflow_uri, s3_endpoint) == []
        # every permission was asked as the runner's service account, in the jobs' namespace
        assert {(r["user"], r["resourceAttributes"]["namespace"]) for r in fake.reviews} == {
            ("system:serviceaccount:kubeflow:vfm-pipeline-runner", "vfm")}


def test_live_finds_what_a_broken_cluster_lacks(live_plan, mlflow_uri, s3_endpoint):
    plan, template = live_plan
    with fake_k8s_server() as fake:
        _healthy_cluster(fake, plan, template)
        del fake.objects["/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pytorchjobs.kubeflow.org"]
        fake.objects["/apis/apps/v1/namespaces/kubeflow/deployments/training-operator"]["status"] = {"replicas": 1}
        for i in range(2, 8):  # two nodes left for an 8-node job
            del fake.objects[f"/api/v1/nodes/h100-{i}"]
        fake.grants = {g for g in fake.grants if g[2] != "create"}
        del fake.objects["/api/v1/namespaces/vfm/secrets/vfm-credentials"]["data"]["AWS_SECRET_ACCESS_KEY"]
        fake.objects["/api/v1/namespaces/kubeflow/persistentvolumeclaims/vfm-raw-datasets"]["status"] = {"phase": "Pending"}
        fake.forbidden.add("/api/v1/namespaces/kubeflow/secrets/vfm-credentials")
        plan.params["runs_prefix"] = "s3://no-such-bucket/runs"
        found = _live(fake, plan, "http://127.0.0.1:9", s3_endpoint)
    text = "\n".join(map(str, found))
    for expected in ("CustomResourceDefinition pytorchjobs.kubeflow.org metadata.name: is not installed",
                     "Deployment kubeflow/training-operator status.availableReplicas",
                     "2 node(s) match {'nvidia.com/gpu.product': 'NVIDIA-H100-80GB-HBM3'} with ≥ 8 allocatable",
                     "may not create pytorchjobs (kubeflow.org)",
                     "Secret vfm/vfm-credentials data: lacks AWS_SECRET_ACCESS_KEY",
                     "Secret kubeflow/vfm-credentials read: the API server answered forbidden",
                     "PersistentVolumeClaim kubeflow/vfm-raw-datasets status.phase: is Pending, not Bound",
                     "MLflow http://127.0.0.1:9 /health: does not answer",
                     "S3 bucket no-such-bucket pipeline parameter runs_prefix: is not reachable"):
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert "S3 bucket " + plan.params["data_prefix"][5:].split("/")[0] not in text


def test_cli_live_against_the_fake_cluster(live_plan, mlflow_uri, s3_endpoint, tmp_path):
    plan, template = live_plan
    kubeconfig = tmp_path / "kubeconfig"
    with fake_k8s_server() as fake:
        _healthy_cluster(fake, plan, template)
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
            "users": [{"name": "u", "user": {"token": "t"}}]}))
        cmd = [sys.executable, "-m", "vfm", "preflight", "vit-huge", "--overlay", "h100", "--context", "fake",
               "--kubeconfig", str(kubeconfig), "--mlflow-uri", mlflow_uri, "--s3-endpoint", s3_endpoint,
               "--param", f"data_prefix={plan.params['data_prefix']}", "--param", f"runs_prefix={plan.params['runs_prefix']}"]
        ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        del fake.objects["/api/v1/namespaces/kubeflow/persistentvolumeclaims/vfm-raw-datasets"]
        missing = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "and cluster fake" in ok.stdout and "ok: refs" in ok.stdout and "live" in ok.stdout
    assert missing.returncode == 2 and "PersistentVolumeClaim kubeflow/vfm-raw-datasets" in missing.stdout


# --- launcher=trainjob (Kubeflow Trainer v2) ------------------------------------------------------
@pytest.fixture(scope="module")
def trainjob_plan(kubectl):
    return pf.offline_plan("vit-huge", H100_TRAINER_V2, params={"launcher": "trainjob", "kueue_queue": "vfm-h100"})


def test_trainjobs_on_the_trainer_v2_overlay_pass_every_check(trainjob_plan):
    plan, objects, template = trainjob_plan
    assert {j.manifest["kind"] for j in plan.jobs} == {"TrainJob"}
    pretrain = next(j for j in plan.jobs if j.what == "pretrain")
    # the pods the checks ran on: the runtime's node pod with the job's trainer and the PodTemplate's patches
    ((role, pod, count),) = pretrain.replicas
    assert (role, count) == ("node", 8) and pf.trainer_container(pod)["image"] == plan.params["image"]
    assert pod["spec"]["priorityClassName"] == "vfm-training"
    assert "IPC_LOCK" in pf.trainer_container(pod)["securityContext"]["capabilities"]["add"]  # the RDMA exemption
    assert run_offline(plan, objects, template) == []


def test_trainjobs_without_the_runtime_or_their_rbac_are_found(kubectl):
    plan, objects, template = pf.offline_plan("vit-huge", H100, params={"launcher": "trainjob"})
    found = run_offline(plan, objects, template)
    _find(found, "template", "ClusterTrainingRuntime vfm-torch metadata.name: the overlay has no vfm runtime")
    _find(found, "rbac", "may not create trainjobs")


def test_live_trainjob_cluster_passes_and_a_missing_runtime_is_found(trainjob_plan, s3_endpoint, bucket, mlflow_uri):
    plan, _, template = trainjob_plan
    plan = copy.deepcopy(plan)
    plan.params.update(data_prefix=f"s3://{bucket}/data", runs_prefix=f"s3://{bucket}/runs")
    with fake_k8s_server() as fake:
        _healthy_cluster(fake, plan, template)
        assert _live(fake, plan, mlflow_uri, s3_endpoint) == []
        assert {r["resourceAttributes"]["resource"] for r in fake.reviews} >= {"trainjobs"}
        del fake.objects[RUNTIME_PATH]
        del fake.objects["/apis/apps/v1/namespaces/kubeflow-system/deployments/kubeflow-trainer-controller-manager"]
        text = "\n".join(map(str, _live(fake, plan, mlflow_uri, s3_endpoint)))
    assert "ClusterTrainingRuntime vfm-torch metadata.name: does not exist" in text, text
    assert "Deployment kubeflow-system/kubeflow-trainer-controller-manager status.availableReplicas" in text, text
