"""KubeRay RayJob (ray.io/v1) as the launcher's third job kind: the object built by vfm.launch.rayjob and
validated against the KubeRay v1.7.0 CRD and Pod Security `restricted`, then the cluster contract against
the fake API server — the created spec, the driver's log (the submitter pod's), Complete + SUCCEEDED,
Failed / ValidationFailed / STOPPED, the job deleted under us, adoption (409), RBAC refusal (403), cancel,
timeout and the exit handler's cleanup — and the runner's RBAC for it in manifests/base."""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
import threading
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from tests.helpers.fake_k8s import cancel_with_sigterm, submitter_pod
from vfm.deploy.policy import hygiene_violations, pod_specs, restricted_violations
from vfm.deploy.validate import validation_errors
from vfm.errors import UserError
from vfm.launch import JobFailed, JobOptions, JobTimeout, build_manifest, job_name, trainer_args
from vfm.launch import rayjob as rj
from vfm.launch.cluster import LAUNCHER_PERMISSIONS, RAYJOB, ClusterBackend, kube_configuration
from vfm.recipes import load_recipe

REPO = Path(__file__).resolve().parents[2]
RAYJOBS = "/apis/ray.io/v1/namespaces/vision/rayjobs"
RAY_TEMPLATE = yaml.safe_load((REPO / "manifests/base/ray-podtemplate.yaml").read_text())["template"]
IMAGE = "ghcr.io/vfm-project/vfm-trainer:0.1.0"
ENTRYPOINT = ["python", "-m", "vfm.curate", "--in", "s3://raw/web images/", "--out", "s3://curated/v1"]


def rayjob(run="run-1", template=None, **kw):
    args = dict(name=f"curate-{run}", namespace="vision", image=IMAGE, entrypoint=ENTRYPOINT, workers=4,
                cpus_per_worker=16, memory_per_worker="64Gi", pod_template=template, labels={"vfm.io/run": run},
                env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, secret="vfm-credentials", timeout_s=3600)
    return rj.build_rayjob(**{**args, **kw})


def pods(m):
    """{role: pod template} of a RayJob."""
    return {role: pod for role, pod, _ in rj.pod_templates(m)}


def container(pod):
    (c, *_) = pod["spec"]["containers"]
    return c


def backend(fake, lines):
    return ClusterBackend(api=k8s.ApiClient(kube_configuration(fake.url)), poll_s=0.05, log=lines.append)


def running(job_status="RUNNING"):
    return {"jobDeploymentStatus": "Running", "jobStatus": job_status, "rayClusterName": "curate-run-1-abcde"}


# --- the object ---------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [None, RAY_TEMPLATE], ids=["defaults", "vfm-ray-podtemplate"])
def test_the_rayjob_runs_the_entrypoint_on_a_fixed_size_cluster_and_is_valid_and_restricted(template):
    m = rayjob(template=template)
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayJob")
    assert m["metadata"] == {"name": "curate-run-1", "namespace": "vision", "labels": {"vfm.io/run": "run-1"}}
    spec = m["spec"]
    assert shlex.split(spec["entrypoint"]) == ENTRYPOINT  # quoted: the space in the input URL survives
    assert (spec["submissionMode"], spec["shutdownAfterJobFinishes"], spec["backoffLimit"]) == ("K8sJobMode", True, 0)
    assert spec["activeDeadlineSeconds"] == 3600 and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == rj.RAY_VERSION == "2.60.0" and cluster["enableInTreeAutoscaling"] is False
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "workers" and group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    assert group["rayStartParams"] == {"num-cpus": "16"}

    p = pods(m)
    assert list(p) == ["ray-head", "workers", "ray-job-submitter"]
    head, worker, submitter = container(p["ray-head"]), container(p["workers"]), container(p["ray-job-submitter"])
    assert [c["name"] for c in (head, worker, submitter)] == ["ray-head", "ray-worker", "ray-job-submitter"]
    assert {c["image"] for c in (head, worker, submitter)} == {IMAGE}
    assert not any("command" in c or "args" in c for c in (head, worker, submitter))  # KubeRay generates them
    assert worker["resources"]["requests"] == worker["resources"]["limits"] == {"cpu": "16", "memory": "64Gi"}
    assert head["resources"]["requests"] == head["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    for c in (head, worker):  # the driver (on the head) and the workers get env and the credentials
        assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in c["env"]
        assert {"secretRef": {"name": "vfm-credentials"}} in c["envFrom"]
    assert "envFrom" not in submitter and "env" not in submitter  # `ray job submit` needs no credentials
    for role, pod in p.items():
        c, spec_ = container(pod), pod["spec"]
        mounts = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec_["volumes"]}
        assert set(mounts.values()) <= set(volumes), role
        assert volumes[mounts["/tmp"]]["emptyDir"] == {}, role  # /tmp/ray: Ray's session directory
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["metadata"]["labels"]["vfm.io/run"] == "run-1"
        assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        if role != "ray-job-submitter":  # the object store: memory-backed, as large as the container's memory
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm == {"medium": "Memory", "sizeLimit": c["resources"]["limits"]["memory"]}, role
            assert "restartPolicy" not in spec_
    assert p["ray-job-submitter"]["spec"]["restartPolicy"] == "Never"
    assert "/dev/shm" not in {v["mountPath"] for v in submitter["volumeMounts"]}
    if template is not None:  # the namespace's template reaches every pod
        for pod in p.values():
            assert pod["spec"]["priorityClassName"] == "vfm-batch" and pod["spec"]["serviceAccountName"] == "vfm-trainer"
            assert pod["spec"]["securityContext"] == RAY_TEMPLATE["spec"]["securityContext"]
        assert {"configMapRef": {"name": "vfm-endpoints"}} in head["envFrom"]
        assert template == RAY_TEMPLATE  # not mutated
    assert len(list(pod_specs(m))) == 3
    assert validation_errors(m) == []
    assert restricted_violations(m) == [] and hygiene_violations(m) == []


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda s: s["rayClusterSpec"]["headGroupSpec"].update(rayStartParam={}), "rayStartParam"),
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="4"), "'4'"),
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    (lambda s: s["submitterPodTemplate"]["spec"]["containers"][0].update(imagePullPolice="Always"), "imagePullPolice"),
    (lambda s: s.update(shutdownAfterJobsFinish=True), "shutdownAfterJobsFinish"),
])
def test_the_crd_schema_rejects_what_the_api_server_would(mutate, expected):
    m = rayjob()
    mutate(m["spec"])
    errors = validation_errors(m)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(("kw", "expected"), [
    ({"name": "c" * 48}, "≤ 47"),  # KubeRay's MaxRayJobNameLength
    ({"name": "1curate"}, "starting with a letter"),  # a DNS-1035 label
    ({"name": "Curate"}, "lowercase"),
    ({"image": "ghcr.io/vfm-project/vfm-trainer:latest"}, "pin a tag"),
    ({"image": "ghcr.io/vfm-project/vfm-trainer"}, "pin a tag"),
    ({"workers": 0}, "must be ≥ 1"),
    ({"entrypoint": []}, "entrypoint"),
    ({"timeout_s": 0}, "positive"),
    ({"template": {"spec": {"containers": [{"name": "pytorch"}]}}}, "no container named `ray`"),
])
def test_what_kuberay_or_the_cluster_would_refuse_is_a_user_error(kw, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        rayjob(**kw)


def test_ray_version_is_the_images_and_the_environments():
    dockerfile = (REPO / "images/trainer/Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(rj.RAY_VERSION)}$", dockerfile, flags=re.M)
    assert '"ray[default,data]==${RAY_VERSION}"' in dockerfile  # the dashboard's job API is in `default`
    # ray is a pinned dependency of vfm (pyproject.toml): the version the RayJob asks for is the one installed
    assert importlib.metadata.version("ray") == rj.RAY_VERSION


# --- the cluster contract -----------------------------------------------------------------------
def test_success_creates_the_built_spec_streams_the_driver_log_and_keeps_the_job(fake_k8s):
    m = rayjob()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [{"jobDeploymentStatus": "Initializing"}, running("PENDING"), running(), running(),
                                {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    pod = submitter_pod(name)
    fake_k8s.logs[pod] = ("Job submission server address: http://curate-run-1-head-svc.vision.svc.cluster.local:8265\n"
                          "curate: 1024 shards, 12 duplicates removed\n------------------------------------------\n"
                          "Job 'raysubmit_1' succeeded\n")
    lines: list[str] = []
    result = backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=0)
    assert (result.name, result.state, result.restarts) == (name, "Complete", None)
    assert fake_k8s.created == [m] and ("POST", RAYJOBS) in fake_k8s.requests
    assert ("GET", f"{RAYJOBS}/{name}") in fake_k8s.requests
    assert f"[{pod}] curate: 1024 shards, 12 duplicates removed" in lines
    assert f"[{pod}] Job 'raysubmit_1' succeeded" in lines
    assert ("GET", f"/api/v1/namespaces/vision/pods/{pod}/log") in fake_k8s.requests
    assert fake_k8s.deleted == []  # KubeRay deletes the cluster (shutdownAfterJobFinishes); the job stays


def test_the_driver_log_is_the_submitter_pods_selected_as_kuberay_and_the_job_controller_label_it():
    assert RAYJOB.container == "ray-job-submitter"
    assert RAYJOB.log_selector("curate-run-1") == ("batch.kubernetes.io/job-name=curate-run-1,"
                                                   "ray.io/originated-from-crd=RayJob")


def test_a_failed_ray_job_fails_the_step_with_its_reason_after_the_drivers_traceback(fake_k8s):
    m = rayjob()
    name = m["metadata"]["name"]
    message = "Job entrypoint command failed with exit code 1, last available logs: ValueError: no shards under s3://raw/"
    fake_k8s.timelines[name] = [running(), {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                            "reason": "AppFailed", "message": message}]
    fake_k8s.logs[submitter_pod(name)] = "Traceback (most recent call last):\nValueError: no shards under s3://raw/\n"
    lines: list[str] = []
    with pytest.raises(JobFailed, match=re.escape(f"RayJob {name} AppFailed: {message}")) as err:
        backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=0)
    assert (err.value.kind, err.value.reason) == ("RayJob", "AppFailed")
    assert f"[{submitter_pod(name)}] ValueError: no shards under s3://raw/" in lines  # read before the delete
    assert fake_k8s.deleted == [name] and ("DELETE", f"{RAYJOBS}/{name}") in fake_k8s.requests


@pytest.mark.parametrize(("status", "reason", "message"), [
    ({"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed",
      "message": "The RayJob spec is invalid: worker group workers must set both minReplicas and maxReplicas"},
     "ValidationFailed", "The RayJob spec is invalid"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED", "message": "Job was intentionally stopped."},
     "STOPPED", "Job was intentionally stopped."),  # KubeRay: Complete, but the Ray job never finished
    ({"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "reason": "DeadlineExceeded",
      "message": "The RayJob has passed the activeDeadlineSeconds."}, "DeadlineExceeded", "activeDeadlineSeconds"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "FAILED"}, "FAILED", "jobStatus FAILED"),
])
def test_validation_failure_a_stopped_job_and_kuberays_own_failures_fail_the_step(fake_k8s, status, reason, message):
    m = rayjob()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [{"jobDeploymentStatus": "Initializing"}, status]
    with pytest.raises(JobFailed, match=re.escape(f"{reason}: ") + ".*" + re.escape(message)) as err:
        backend(fake_k8s, []).run(m, timeout_s=30, max_restarts=0)
    assert err.value.reason == reason
    assert fake_k8s.deleted == [name]


def test_the_rayjob_deleted_under_the_launcher_fails_the_step(fake_k8s):
    m = rayjob()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [running()]
    threading.Timer(0.3, lambda: fake_k8s.jobs.pop(("vision", name))).start()
    with pytest.raises(JobFailed, match="RayJob curate-run-1 Deleted: the RayJob was deleted before it finished"):
        backend(fake_k8s, []).run(m, timeout_s=30, max_restarts=0)


def test_a_retried_step_adopts_its_rayjob_but_replaces_a_failed_or_foreign_one(fake_k8s):
    m = rayjob()
    name = m["metadata"]["name"]
    fake_k8s.jobs[("vision", name)] = m  # left by an earlier attempt of this step: 409, then adopted
    fake_k8s.timelines[name] = [running(), {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    lines: list[str] = []
    assert backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=0).state == "Complete"
    assert fake_k8s.created == [] and any(f"adopting RayJob vision/{name}" in line for line in lines)

    fake_k8s.jobs[("vision", name)] = m  # ... but one that failed is replaced (and the replacement runs)
    fake_k8s.timelines[name] = [{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                                 "message": "old"}]
    with pytest.raises(JobFailed, match="AppFailed: old"):  # the replacement follows the same scripted timeline
        backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=0)
    assert fake_k8s.created == [m] and fake_k8s.deleted[0] == name

    foreign = copy.deepcopy(m)
    foreign["metadata"]["labels"]["vfm.io/run"] = "another-run"
    fake_k8s.jobs[("vision", name)] = foreign
    fake_k8s.timelines[name] = [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=0)
    assert fake_k8s.jobs[("vision", name)] == m  # another run's job of that name was replaced


def test_a_runner_without_rayjob_rbac_gets_an_error_that_names_the_permission(fake_k8s):
    m = rayjob()
    fake_k8s.forbidden.add(RAYJOBS)
    with pytest.raises(JobFailed, match=r"CreateFailed: .*403 Forbidden: this step's service account may not create "
                       r"rayjobs \(ray\.io\) in vision; grant it create, get, list and delete on rayjobs "
                       r"\(manifests/base/rbac\.yaml\) and check with `vfm preflight`") as err:
        backend(fake_k8s, []).run(m, timeout_s=30, max_restarts=0)
    assert 'cannot create resource "rayjobs" in API group "ray.io"' in str(err.value)  # the API server's words
    assert fake_k8s.created == [] and fake_k8s.deleted == []


def test_a_cluster_without_kuberay_says_what_to_install(fake_k8s):
    fake_k8s.unserved.add("rayjobs")  # no RayJob CRD: the API server serves no such resource
    with pytest.raises(JobFailed, match=r"404 Not Found: the cluster has no rayjobs\.ray\.io CRD; install it "
                       r"\(kubectl apply --server-side -k manifests/platform/kuberay\)"):
        backend(fake_k8s, []).run(rayjob(), timeout_s=30, max_restarts=0)
    assert backend(fake_k8s, []).delete_run_jobs("run-1", "vision") == []  # nothing of that kind to clean up


def test_cancel_and_timeout_delete_the_rayjob(fake_k8s):
    m = rayjob()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [running()]
    cancel_with_sigterm(lambda: backend(fake_k8s, []).run(m, timeout_s=60, max_restarts=0))
    assert fake_k8s.deleted == [name]
    fake_k8s.timelines[name] = [{"jobDeploymentStatus": "Initializing"}]
    with pytest.raises(JobTimeout, match=r"RayJob curate-run-1 timed out: not finished after 1 s \(last status: "
                       r"jobDeploymentStatus Initializing, jobStatus PENDING\)"):
        backend(fake_k8s, []).run(m, timeout_s=1, max_restarts=0)
    assert fake_k8s.deleted == [name, name]


def test_the_exit_handler_deletes_the_runs_rayjobs_with_its_other_jobs(fake_k8s):
    be = backend(fake_k8s, [])
    recipe = load_recipe("vit-huge")
    pytorchjob = build_manifest(recipe, JobOptions(
        name=job_name(recipe.id, "pretrain", "run-1"), namespace="vision", image=IMAGE, labels={"vfm.io/run": "run-1"},
        args=trainer_args(recipe.id, "pretrain", data="s3://d/manifest.json", out="s3://o")), None)
    for manifest in (rayjob("run-1"), rayjob("run-2"), pytorchjob):
        be.create(manifest)
    deleted = be.delete_run_jobs("run-1", "vision")
    assert sorted(deleted) == sorted(["curate-run-1", pytorchjob["metadata"]["name"]])
    assert ("DELETE", f"{RAYJOBS}/curate-run-1") in fake_k8s.requests
    assert [n for (_, n) in fake_k8s.jobs] == ["curate-run-2"]
    fake_k8s.forbidden.add(RAYJOBS)  # a runner without RayJob RBAC created none: the cleanup goes on
    lines: list[str] = []
    assert backend(fake_k8s, lines).delete_run_jobs("run-2", "vision") == []
    assert "may not list rayjobs in vision; no RayJob of this run deleted" in lines


# --- the runner's RBAC and `vfm preflight` ------------------------------------------------------
def test_the_base_role_grants_what_the_rayjob_launcher_calls_and_preflight_checks_it():
    from vfm.deploy import preflight as pf
    from vfm.deploy.render import find_kubectl, render

    objects = pf.Objects(render(REPO / "manifests/base", find_kubectl()))
    perms = LAUNCHER_PERMISSIONS["rayjob"]
    assert ("ray.io", "rayjobs", "create", None) in perms and ("", "podtemplates", "get", rj.RAY_POD_TEMPLATE) in perms
    assert ("", "pods/log", "get", None) in perms  # the submitter's (the driver's) log
    for group, resource, verb, name in perms:
        assert pf.allowed(objects, "kubeflow", "vfm-pipeline-runner", "vfm", group, resource, verb, name), (verb, resource)
    assert objects.get("PodTemplate", "vfm", rj.RAY_POD_TEMPLATE) is not None

    curate = pf.Task("exec-curate", IMAGE, 0, (), ())
    plan = pf.Plan("vit-huge", {"namespace": "vfm"}, [curate], [pf.PlannedJob("curate", rayjob(namespace="vfm"),
                                                                                None, "curate")])
    assert plan.job_kinds == ("pytorchjob", "rayjob")
    assert [role for role, _, _ in plan.jobs[0].replicas] == ["ray-head", "workers", "ray-job-submitter"]
    assert pf.check_rbac(plan, objects) == []
    without_ray = [copy.deepcopy(o) for o in objects.items]
    for o in without_ray:
        if o["kind"] == "Role":
            o["rules"] = [r for r in o["rules"] if r["apiGroups"] != ["ray.io"]]
    (found,) = pf.check_rbac(plan, pf.Objects(without_ray))
    assert "may not create rayjobs, get rayjobs, list rayjobs, delete rayjobs in vfm" in found.problem
    assert pf.Plan("vit-huge", {}, [pf.Task("exec-train", IMAGE, 8, (), ())]).job_kinds == ("pytorchjob",)
