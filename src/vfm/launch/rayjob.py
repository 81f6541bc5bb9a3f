"""The KubeRay RayJob (ray.io/v1) of one Ray Data step (curation), the launcher's third job kind.

    manifest = build_rayjob(name=..., namespace=..., image=..., entrypoint=["python", "-m", ...],
                            workers=8, cpus_per_worker=16, memory_per_worker="64Gi",
                            pod_template=ClusterBackend.from_environment().pod_template(ns, RAY_POD_TEMPLATE),
                            labels={"vfm.io/run": run}, env={...}, secret="vfm-credentials", timeout_s=6 * 3600)
    ClusterBackend.from_environment().run(manifest, timeout_s=..., max_restarts=0)

A RayJob carries its own Ray cluster: KubeRay (v1.7.0, manifests/platform/kuberay) creates a RayCluster
from `rayClusterSpec` — one head that takes no tasks (`num-cpus: "0"`; the driver runs there) and one
worker group `workers` of a fixed size (no autoscaling: min = max = replicas) — then a submitter K8s Job
(`submissionMode: K8sJobMode`) whose pod runs `ray job submit --no-wait` and `ray job logs --follow`, so
the submitter's log is the driver's log; the launcher streams it (vfm.launch.cluster). When the Ray job
ends the cluster is deleted `ttlSecondsAfterFinished` later (`shutdownAfterJobFinishes`), `backoffLimit: 0`
leaves retries to the pipeline step's own retry policy, and `activeDeadlineSeconds` fails a job that runs
past the step's timeout even if the launcher is gone.

Every pod (head, workers, submitter) is built from the namespace's `vfm-ray` PodTemplate
(manifests/base/ray-podtemplate.yaml: security context, service account, node selection, /dev/shm, /tmp,
credentials) when the caller passes its `template`, else from `restricted` defaults of our own. Either way
each pod meets Pod Security `restricted`: KubeRay (ray-operator/controllers/ray/common/pod.go, v1.7.0) adds
only what the restricted level allows — the `ray start` command, env, HTTP probes (Ray >= 2.53 has the
unified /api/healthz endpoint, so no `wget` is needed in our image) and a /dev/shm emptyDir when none is
mounted. Ray writes its session directory under /tmp/ray, so the root filesystem stays read-only with an
emptyDir at /tmp; the object store lives in a memory-backed emptyDir at /dev/shm sized like the container's
memory (what KubeRay itself would mount), because the container runtime's 64 MiB default starves it.

Names as KubeRay uses them (github.com/ray-project/kuberay at v1.7.0):
* ray-operator/apis/ray/v1/rayjob_types.go: the spec fields and the status (`jobDeploymentStatus`,
  `jobStatus`, `reason`, `message`) the launcher reads;
* ray-operator/controllers/ray/utils/constant.go: `SubmitterContainerName = "ray-job-submitter"`,
  `MaxRayJobNameLength = MaxRayClusterNameLength (53) - 6`;
* ray-operator/controllers/ray/common/association.go `RayJobK8sJobNamespacedName`: the submitter Job is
  named like the RayJob, so its pods carry the Job controller's `batch.kubernetes.io/job-name=<rayjob>`;
* ray-operator/controllers/ray/rayjob_controller.go `getSubmitterTemplate`: KubeRay uses our
  `submitterPodTemplate` as given (container 0 is the submitter; it fills in the command when we set
  none) and labels it `ray.io/originated-from-crd=RayJob`, `ray.io/originated-from-cr-name=<rayjob>`.
"""

from __future__ import annotations

import copy
import re
import shlex
from typing import Any

from vfm.errors import UserError
from vfm.launch.job import NON_ROOT_UID

API_VERSION = "ray.io/v1"
KIND = "RayJob"
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
KUBERAY_VERSION = "v1.7.0"  # manifests/platform/kuberay and src/vfm/deploy/crds/ray.io_rayjobs.yaml
RAY_VERSION = "2.60.0"  # ray[default,data] in images/trainer/Dockerfile: the head, workers and submitter run it
RAY_POD_TEMPLATE = "vfm-ray"  # the PodTemplate head, workers and submitter are built from (manifests/base)
TEMPLATE_CONTAINER = "ray"  # its container
HEAD, WORKER = "ray-head", "ray-worker"  # KubeRay's container names (it runs `ray start` in container 0)
SUBMITTER = "ray-job-submitter"  # utils.SubmitterContainerName: `ray job submit` + `ray job logs --follow`
WORKER_GROUP = "workers"
GPU = "nvidia.com/gpu"  # the NVIDIA device plugin's resource
SUBMITTER_JOB_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on the submitter Job's pods
ORIGIN_CRD_LABEL = "ray.io/originated-from-crd"  # utils.RayOriginatedFromCRDLabelKey, value "RayJob"
MAX_NAME = 47  # utils.MaxRayJobNameLength: the RayCluster (<name>-<5 chars>) must stay ≤ 53 characters
TTL_SECONDS_AFTER_FINISHED = 600  # the finished cluster's grace before KubeRay deletes it
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}  # the driver's pod, unless the PodTemplate sizes it
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
SHM, TMP, CACHE = "dshm", "tmp", "cache"
SHM_PATH, TMP_PATH = "/dev/shm", "/tmp"


def _restricted_template() -> dict[str, Any]:
    """The `vfm-ray` PodTemplate's `template` when the caller has none (tests, local use): Pod Security
    `restricted` as the image's numeric user, with a read-only root filesystem."""
    seccomp = {"type": "RuntimeDefault"}
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": RAY_POD_TEMPLATE}},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID,
                                "fsGroup": NON_ROOT_UID, "seccompProfile": seccomp},
            "containers": [{
                "name": TEMPLATE_CONTAINER,
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": seccomp},
                "volumeMounts": [{"name": SHM, "mountPath": SHM_PATH}, {"name": TMP, "mountPath": TMP_PATH},
                                 {"name": CACHE, "mountPath": "/home/vfm/.cache"}],
            }],
            "volumes": [{"name": SHM, "emptyDir": {"medium": "Memory"}}, {"name": TMP, "emptyDir": {}},
                        {"name": CACHE, "emptyDir": {}}],
        },
    }


def _template_container(template: dict[str, Any]) -> dict[str, Any]:
    containers = (template.get("spec") or {}).get("containers") or []
    found = next((c for c in containers if c.get("name") == TEMPLATE_CONTAINER), None)
    if found is None:
        raise UserError(f"PodTemplate {RAY_POD_TEMPLATE}: no container named `{TEMPLATE_CONTAINER}` (the Ray head, "
                        "workers and submitter are built from it); fix manifests/base/ray-podtemplate.yaml")
    return found


def _ensure_mount(container: dict[str, Any], volumes: list[dict[str, Any]], name: str, path: str,
                  source: dict[str, Any]) -> None:
    """Mount `path` (a volume the template already mounts there, else an emptyDir `name`)."""
    if any(m.get("mountPath") == path for m in container.get("volumeMounts") or []):
        return
    if not any(v.get("name") == name for v in volumes):
        volumes.append({"name": name, "emptyDir": source})
    container.setdefault("volumeMounts", []).append({"name": name, "mountPath": path})


def _ray_pod(template: dict[str, Any], *, container_name: str, image: str, role: str, labels: dict[str, str],
             env: dict[str, str], secret: str, cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    """A head or worker pod: the template's pod with the Ray container first (KubeRay runs `ray start` in
    container 0 and generates its command, so the template's command and args are dropped)."""
    t = copy.deepcopy(template)
    spec = t.setdefault("spec", {})
    base = _template_container(t)
    c = {k: v for k, v in base.items() if k not in ("command", "args")}
    c.update(name=container_name, image=image)
    c["env"] = [e for e in c.get("env") or [] if e.get("name") not in env] + [
        {"name": k, "value": v} for k, v in sorted(env.items())]
    if secret and not any((f.get("secretRef") or {}).get("name") == secret for f in c.get("envFrom") or []):
        c.setdefault("envFrom", []).append({"secretRef": {"name": secret}})  # S3 / MLflow credentials
    res = c.setdefault("resources", {})
    for key in ("requests", "limits"):  # requests = limits: a Ray node's resources are what it may use
        res[key] = {**(res.get(key) or {}), "cpu": cpu, "memory": memory, **({GPU: str(gpus)} if gpus else {})}
    volumes = spec.setdefault("volumes", [])
    _ensure_mount(c, volumes, SHM, SHM_PATH, {"medium": "Memory"})
    _ensure_mount(c, volumes, TMP, TMP_PATH, {})  # Ray's session directory /tmp/ray
    shm_volume = next(m["name"] for m in c["volumeMounts"] if m.get("mountPath") == SHM_PATH)
    for v in volumes:  # the object store may fill what the container's memory allows, as KubeRay sizes it
        if v.get("name") == shm_volume and (v.get("emptyDir") or {}).get("medium") == "Memory":
            v["emptyDir"] = {**v["emptyDir"], "sizeLimit": memory}
    spec["containers"] = [c] + [x for x in spec.get("containers") or [] if x is not base]
    spec.pop("restartPolicy", None)  # KubeRay's default for Ray nodes
    meta = t.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels, "vfm.io/role": role}
    # an Istio sidecar keeps a finished pod Running (and the submitter Job from completing)
    meta["annotations"] = {**(meta.get("annotations") or {}), "sidecar.istio.io/inject": "false"}
    return t


def _submitter_pod(template: dict[str, Any], *, image: str, labels: dict[str, str]) -> dict[str, Any]:
    """The submitter Job's pod: the template's pod settings and security context, one small container that
    KubeRay gives the `ray job submit ... ; ray job logs --follow` command, no credentials (the driver runs
    on the head), `restartPolicy: Never` (the Job retries a failed submit with a new pod)."""
    t = copy.deepcopy(template)
    spec = t.setdefault("spec", {})
    base = _template_container(t)
    mounts = [m for m in base.get("volumeMounts") or [] if m.get("mountPath") != SHM_PATH]
    c: dict[str, Any] = {"name": SUBMITTER, "image": image, "resources": copy.deepcopy(SUBMITTER_RESOURCES),
                         "volumeMounts": mounts}
    for key in ("securityContext", "imagePullPolicy"):
        if key in base:
            c[key] = copy.deepcopy(base[key])
    volumes = [v for v in spec.get("volumes") or [] if any(m.get("name") == v.get("name") for m in mounts)]
    _ensure_mount(c, volumes, TMP, TMP_PATH, {})
    spec.update(containers=[c], volumes=volumes, restartPolicy="Never")
    spec.pop("initContainers", None)
    meta = t.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels, "vfm.io/role": "ray-submitter"}
    meta["annotations"] = {**(meta.get("annotations") or {}), "sidecar.istio.io/inject": "false"}
    return t


def _head_resources(template: dict[str, Any]) -> tuple[str, str]:
    requests = (_template_container(template).get("resources") or {}).get("requests") or {}
    return str(requests.get("cpu") or HEAD_RESOURCES["cpu"]), str(requests.get("memory") or HEAD_RESOURCES["memory"])


def _validate(name: str, image: str, entrypoint: list[str], workers: int, cpus_per_worker: int,
              timeout_s: int) -> None:
    # KubeRay's ValidateRayJobMetadata: a DNS-1035 label of at most MaxRayJobNameLength characters
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME:
        raise UserError(f"RayJob name {name!r}: use ≤ {MAX_NAME} lowercase letters, digits and '-', starting "
                        "with a letter (KubeRay names the RayCluster <name>-<5 chars>, ≤ 53)")
    tag = image.rsplit("/", 1)[-1]
    if not image or ("@sha256:" not in image and (":" not in tag or tag.endswith(":latest"))):
        raise UserError(f"image {image!r}: pin a tag or digest (not latest) so every Ray node runs the same code")
    if not entrypoint:
        raise UserError("entrypoint: the Ray driver's command line is empty")
    if workers < 1 or cpus_per_worker < 1:
        raise UserError(f"workers={workers}, cpus_per_worker={cpus_per_worker}: both must be ≥ 1")
    if not 0 < timeout_s < 2**31:
        raise UserError(f"timeout_s={timeout_s}: activeDeadlineSeconds must be a positive int32")


def build_rayjob(*, name: str, namespace: str, image: str, entrypoint: list[str], workers: int,
                 cpus_per_worker: int, memory_per_worker: str, pod_template: dict[str, Any] | None,
                 labels: dict[str, str], env: dict[str, str], secret: str, timeout_s: int,
                 gpus_per_worker: int = 0) -> dict[str, Any]:
    """The RayJob manifest (wire format) that runs `entrypoint` as the driver of a Ray cluster of one head
    and `workers` workers of `cpus_per_worker` CPUs and `memory_per_worker` memory each, every pod built
    from `pod_template` (the `template` of the namespace's `vfm-ray` PodTemplate, K8s JSON) or, without one,
    from restricted defaults; `env` and the `secret`'s keys reach the driver and the workers; `labels` go
    on the RayJob and its pods (the run label makes `delete_run_jobs` find it). `gpus_per_worker` > 0 gives each
    worker that many GPUs (the embedding model of `vfm curate`), requested from the device plugin and announced to
    Ray (`num-gpus`)."""
    _validate(name, image, entrypoint, workers, cpus_per_worker, timeout_s)
    template = copy.deepcopy(pod_template) if pod_template else _restricted_template()
    head_cpu, head_memory = _head_resources(template)
    common = dict(image=image, labels=dict(labels), env=dict(env), secret=secret)
    head = _ray_pod(template, container_name=HEAD, role=HEAD, cpu=head_cpu, memory=head_memory, **common)
    worker = _ray_pod(template, container_name=WORKER, role=WORKER, cpu=str(cpus_per_worker),
                      memory=str(memory_per_worker), gpus=gpus_per_worker, **common)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "entrypoint": shlex.join(entrypoint),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
            "activeDeadlineSeconds": int(timeout_s),
            "backoffLimit": 0,  # each KubeRay retry is a new cluster; the pipeline step's retry owns retries
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": False,
                # the head runs the driver and the GCS, no tasks; the dashboard serves `ray job submit`
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                                  "template": head},
                "workerGroupSpecs": [{
                    "groupName": WORKER_GROUP, "replicas": workers, "minReplicas": workers,
                    "maxReplicas": workers, "rayStartParams": {
                        "num-cpus": str(cpus_per_worker), **({"num-gpus": str(gpus_per_worker)} if gpus_per_worker else {})},
                    "template": worker}],
            },
            "submitterPodTemplate": _submitter_pod(template, image=image, labels=dict(labels)),
        },
    }


def pod_templates(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any], int]]:
    """(role, pod template, pod count) of a RayJob: head, workers, submitter (what preflight and the
    policy checks walk)."""
    spec = manifest.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or {}
    out = [(HEAD, (cluster.get("headGroupSpec") or {}).get("template") or {}, 1)]
    out += [(g.get("groupName", WORKER_GROUP), g.get("template") or {}, int(g.get("replicas") or 0))
            for g in cluster.get("workerGroupSpecs") or []]
    if spec.get("submitterPodTemplate"):
        out.append((SUBMITTER, spec["submitterPodTemplate"], 1))
    return out
