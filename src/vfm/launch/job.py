"""The PyTorchJob of one training stage, built from the recipe with the kubeflow-training models.

    job = build_job(recipe, JobOptions(name=..., namespace=..., image=..., args=trainer_args(...)))
    manifest = to_manifest(job)          # camelCase dict, what the API server receives

What the recipe decides: nodes = gpus / gpus_per_node (Master + nodes-1 Workers), a numeric
`nprocPerNode` (the operator counts `auto` as 1 process per pod when it computes WORLD_SIZE), GPU limits
per pod, the node selector and toleration of the GPU product. What the run decides (`JobOptions`):
name, image, trainer arguments, credentials Secret, deadlines, restart cap, elastic / gang scheduling.

On a cluster every replica is built from the `vfm-trainer` PodTemplate of the job's namespace
(manifests/base/trainer-podtemplate.yaml, patched per overlay and owned by GitOps): its resources, node
selection, tolerations, `/dev/shm`, service account, priority class, RDMA devices and capabilities reach
every pod; the launcher adds only the image the run names, command, args, env and the GPU count.
Without a template (the local backend, tests) the launcher builds the pod itself, as follows.

Every pod template satisfies the Pod Security `restricted` level (non-root, RuntimeDefault seccomp, no
privilege escalation, all capabilities dropped); `/dev/shm` is a memory-backed emptyDir because the
container runtime's 64 MiB default starves DataLoader workers and NCCL.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kubeflow.training import models as kt
from kubernetes.client import models as k8s

from vfm.errors import UserError
from vfm.recipes import Recipe
from vfm.recipes.gpus import GPU_PRODUCTS
from vfm.train.torchrun import SHUTDOWN_TIMEOUT_S

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER = "pytorch"  # the operator reads exit codes and injects env only for this container name
PORT_NAME, PORT = "pytorchjob-port", 23456
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
RUN_LABEL = "vfm.io/run"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue reads it from the job's own metadata
POD_TEMPLATE = "vfm-trainer"  # the PodTemplate every replica is built from (manifests/base/trainer-podtemplate.yaml)
RUN_KEY_ANNOTATION = "vfm.io/run-key"
MAX_NAME = 48  # services are `<job>-worker-<i>` and must stay DNS labels (≤ 63 characters)
NON_ROOT_UID = 10001  # the images' numeric user (images/*/Dockerfile)

# the trainer exits ≥ 128 for retryable failures (SIGTERM → 143); vfm.train.torchrun (torchrun) keeps that code
TRAINER_COMMAND = ["python", "-m", "vfm.train.torchrun", "-m", "vfm.trainer"]
# evaluation runs as a job too, in the trainer image on the job's GPUs: `vfm evaluate` under the same torchrun
EVALUATOR_COMMAND = ["python", "-m", "vfm.train.torchrun", "-m", "vfm", "evaluate"]
# ...and as one plain process where the job has one rank (a CPU node): no rendezvous to hold
SINGLE_EVALUATOR_COMMAND = ["python", "-m", "vfm", "evaluate"]


@dataclass(frozen=True)
class Elastic:
    """torchrun elastic rendezvous (c10d) of worker pods: a failed node is replaced and the job goes on
    from its last checkpoint, without a full job restart.

    The node count stays the recipe's (`min_nodes == max_nodes`): a resumed run continues from per-rank
    state (each rank's data-loader position and RNG, vfm.train.checkpoint) and from the accumulation that
    makes the paper's global batch at that world size, so it must restart at the size it checkpointed."""

    min_nodes: int
    max_nodes: int
    max_restarts: int = 3


@dataclass(frozen=True)
class Gang:
    """All-or-nothing scheduling so a 12-node job never holds 11 nodes idle waiting for the 12th.

    `scheduler`: volcano / scheduler-plugins read `runPolicy.schedulingPolicy` (the operator's
    `--gang-scheduler-name`); Kueue admits the job through its queue-name label instead.
    """

    scheduler: Literal["volcano", "scheduler-plugins", "kueue"] = "volcano"
    queue: str | None = None
    min_available: int | None = None
    """None = every pod of the job."""
    priority_class: str | None = None
    schedule_timeout_seconds: int | None = None


@dataclass(frozen=True)
class JobOptions:
    name: str
    namespace: str
    image: str
    args: list[str]
    """Arguments after `command` (`trainer_args`, `evaluator_args`)."""
    command: tuple[str, ...] = tuple(TRAINER_COMMAND)
    """TRAINER_COMMAND or EVALUATOR_COMMAND."""
    secret: str | None = "vfm-credentials"
    """Secret whose keys become env vars (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN, ...)."""
    env: dict[str, str] = field(default_factory=dict)
    """Plain env: MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL_S3, ..."""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cpu_per_proc: float = 10
    memory_per_proc_gib: int = 100
    shm_gib: int = 64
    max_restarts: int = 3
    """Our restart cap: with the ExitCode policy the operator recreates pods, so `backoffLimit` never
    counts them (kubeflow/trainer#2045); the launchers count restarts and fail the job past this."""
    backoff_limit: int = 3
    clean_pod_policy: Literal["Running", "All", "None"] = "Running"
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    active_deadline_seconds: int | None = None
    elastic: Elastic | None = None
    gang: Gang | None = None
    resources: dict[str, Any] | None = None
    """KFP TaskConfig passthrough: the pipeline task's resources, forwarded to each replica (not the launcher)."""
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    extra_env: list[dict[str, Any]] | None = None


def job_name(recipe_id: str, stage: str, run_id: str, seed: int | None = None) -> str:
    """Unique per (pipeline run, stage, seed) and stable across retries of the same task, so a retried
    launcher finds the job its previous attempt created instead of starting a second one."""
    digest = hashlib.sha256(f"{run_id}/{recipe_id}/{stage}/{seed}".encode()).hexdigest()[:8]
    suffix = f"-{stage[:2]}{'' if seed is None else f's{seed}'}-{digest}"
    base = re.sub(r"[^a-z0-9-]+", "-", recipe_id.lower()).strip("-")[: MAX_NAME - len(suffix)].rstrip("-")
    return f"{base}{suffix}"


def label_value(text: str) -> str:
    """Any string → a valid label value (≤ 63 chars, alphanumeric at both ends)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)
    if len(clean) > 63:
        clean = clean[:54] + hashlib.sha256(text.encode()).hexdigest()[:9]
    return clean.strip("-_.")


def trainer_args(
    recipe_id: str,
    stage: str,
    *,
    data: str,
    out: str,
    profile: str = "paper",
    overrides: list[str] | None = None,
    init: str | None = None,
    seed: int | None = None,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    knn_train: str | None = None,
    knn_val: str | None = None,
    workers: int | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> list[str]:
    """The `python -m vfm.trainer` command line (the trainer's documented interface)."""
    args = [recipe_id, "--stage", stage, "--data", data, "--out", out, "--profile", profile]
    for item in overrides or []:
        args += ["--set", item]
    for flag, value in (("--init", init), ("--seed", seed), ("--run-key", run_key),
                        ("--parent-run-id", parent_run_id), ("--knn-train", knn_train), ("--knn-val", knn_val),
                        ("--workers", workers), ("--run-name", run_name)):
        if value is not None and value != "":
            args += [flag, str(value)]
    for key, value in sorted((tags or {}).items()):
        args += ["--tag", f"{key}={value}"]
    return args


def evaluator_args(export: str, suite: str, data: dict[str, str], *, out: str, run_key: str, parent_run_id: str,
                   run_name: str, tags: dict[str, str], profile: str, overrides: list[str] | None, workers: int,
                   gpu: bool, linear_export: str = "") -> list[str]:
    """The `vfm evaluate` command line of one suite on one export (after EVALUATOR_COMMAND): bf16 autocast
    and a larger batch on GPUs, the results JSON written to `out` (local or s3://)."""
    args = [export, "--suite", suite, "--out", out, "--run-key", run_key, "--parent-run-id", parent_run_id,
            "--run-name", run_name, "--profile", profile, "--workers", str(workers),
            "--batch-size", "256" if gpu else "64"]
    for key, url in sorted(data.items()):
        args += ["--data", f"{key}={url}"]
    for key, value in sorted(tags.items()):
        args += ["--tag", f"{key}={value}"]
    for item in overrides or []:
        args += ["--set", item]
    if linear_export:  # the linear probe also writes backbone + head as a classifier export
        args += ["--linear-export", linear_export]
    return args + (["--bf16"] if gpu else [])


def stage_hardware(recipe: Recipe, stage: str) -> Recipe:
    """The recipe with the hardware stage `stage` runs on: a downstream (transfer) stage has GPUs of its own
    (`downstream.<stage>.gpus`, whole nodes of `hardware.gpus_per_node`); every other stage the recipe's."""
    if stage not in recipe.downstream:
        return recipe
    gpus = recipe.downstream[stage].gpus
    return recipe.model_copy(update={"hardware": recipe.hardware.model_copy(
        update={"gpus": gpus, "gpus_per_node": min(gpus, recipe.hardware.gpus_per_node)})})


def one_node(recipe: Recipe) -> Recipe:
    """The recipe on one node (its GPUs per node; one process on CPU): the shape of an evaluation job."""
    procs = recipe.hardware.procs_per_node if uses_gpus(recipe) else 1
    return recipe.model_copy(update={"hardware": recipe.hardware.model_copy(
        update={"gpus": procs, "gpus_per_node": procs})})


def _security() -> tuple[k8s.V1PodSecurityContext, k8s.V1SecurityContext]:
    seccomp = k8s.V1SeccompProfile(type="RuntimeDefault")
    pod = k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=NON_ROOT_UID, run_as_group=NON_ROOT_UID,
                                   fs_group=NON_ROOT_UID, seccomp_profile=seccomp)
    container = k8s.V1SecurityContext(allow_privilege_escalation=False, run_as_non_root=True,
                                      capabilities=k8s.V1Capabilities(drop=["ALL"]), seccomp_profile=seccomp)
    return pod, container


def _resources(recipe: Recipe, opts: JobOptions) -> dict[str, dict[str, str]]:
    procs = recipe.hardware.procs_per_node
    requests = {"cpu": f"{opts.cpu_per_proc * procs:g}", "memory": f"{opts.memory_per_proc_gib * procs}Gi"}
    limits = {"memory": requests["memory"]}
    if uses_gpus(recipe):
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(procs)
    for key in ("requests", "limits"):  # the pipeline task's settings win (TaskConfig passthrough)
        (requests if key == "requests" else limits).update(
            {k: str(v) for k, v in ((opts.resources or {}).get(key) or {}).items()})
    return {"requests": requests, "limits": limits}


def cpu_request(quantity: str) -> float:
    """A Kubernetes CPU quantity ("12", "12.5", "500m") in cores."""
    q = str(quantity).strip()
    try:
        return float(q[:-1]) / 1000 if q.endswith("m") else float(q)
    except ValueError:
        raise UserError(f"CPU request {quantity!r} is not a Kubernetes quantity such as 96 or 500m") from None


# per rank, cores kept free of loader workers: the rank's own process (the step, NCCL) and its
# pin-memory thread
RANK_CORES = 2


def loader_workers(recipe: Recipe, stage: str, opts: JobOptions, pod_template: dict[str, Any] | None = None) -> int:
    """Loader workers per rank: the stage's `data.workers` when the recipe sets it, else the pod's CPU
    request (the pipeline task's passthrough, else the PodTemplate's when there is one) shared out over its ranks, less `RANK_CORES` each
    (e.g. 96 cores / 8 GPUs → 10 workers)."""
    set_ = recipe.stage(stage).data.workers
    if set_ is not None:
        return set_
    procs = recipe.hardware.procs_per_node
    passthrough = ((opts.resources or {}).get("requests") or {}).get("cpu")  # the task's own request wins
    cpu = passthrough or (template_cpu(pod_template) if pod_template is not None else None)
    cores = cpu_request(cpu or _resources(recipe, opts)["requests"]["cpu"])
    return max(1, int(cores // procs) - RANK_CORES)


def uses_gpus(recipe: Recipe) -> bool:
    """The smoke profile runs on CPU ranks (`hardware.gpu: cpu`)."""
    return recipe.hardware.gpu.lower() != "cpu"


def _pod_template(recipe: Recipe, opts: JobOptions, role: str) -> k8s.V1PodTemplateSpec:
    pod_sc, container_sc = _security()
    env = [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(opts.env.items())]
    env.append(k8s.V1EnvVar(name="VFM_MAX_RESTARTS", value=str(opts.max_restarts)))
    env += [k8s.V1EnvVar(**_snake(e)) for e in opts.extra_env or []]
    env_from = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=opts.secret))] if opts.secret else None
    container = k8s.V1Container(
        name=CONTAINER,
        image=opts.image,
        image_pull_policy="IfNotPresent",
        command=list(opts.command),
        args=list(opts.args),
        env=env,
        env_from=env_from,
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=PORT, protocol="TCP")],
        resources=k8s.V1ResourceRequirements(**_resources(recipe, opts)),
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        security_context=container_sc,
    )
    node_selector: dict[str, str] = {}
    tolerations: list[Any] = []
    if uses_gpus(recipe):
        node_selector[GPU_PRODUCT_LABEL] = GPU_PRODUCTS.get(recipe.hardware.gpu, recipe.hardware.gpu)
        tolerations.append(k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule"))
    node_selector.update(opts.node_selector or {})
    tolerations += [k8s.V1Toleration(**_snake(t)) for t in opts.tolerations or []]
    labels = {**opts.labels, "vfm.io/role": role}
    return k8s.V1PodTemplateSpec(
        # an Istio sidecar keeps a finished pod Running and blocks the job's completion (kubeflow/trainer#1180)
        metadata=k8s.V1ObjectMeta(labels=labels, annotations={"sidecar.istio.io/inject": "false"}),
        spec=k8s.V1PodSpec(
            containers=[container],
            security_context=pod_sc,
            node_selector=node_selector or None,
            tolerations=tolerations or None,
            volumes=[k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
                medium="Memory", size_limit=f"{opts.shm_gib}Gi"))],
            # the trainer's launcher gives ranks SHUTDOWN_TIMEOUT_S to checkpoint after SIGTERM; the kubelet
            # must wait longer than that before SIGKILL, or a preempted pod loses the save it started
            termination_grace_period_seconds=SHUTDOWN_TIMEOUT_S + 60,
        ),
    )


def pod_from_template(template: dict[str, Any], recipe: Recipe, opts: JobOptions, role: str) -> dict[str, Any]:
    """One replica's pod template from the namespace's `vfm-trainer` PodTemplate (K8s JSON): everything
    the template says is kept; added are the run's image, command, args and env, the GPU count per pod,
    the pipeline task's resources / node selector / tolerations (KFP TaskConfig passthrough), the role
    label and the SIGTERM grace the checkpoint needs."""
    t = copy.deepcopy(template)
    spec = t.setdefault("spec", {})
    container = next((c for c in spec.get("containers") or [] if c.get("name") == CONTAINER), None)
    if container is None:
        raise UserError(f"PodTemplate {opts.namespace}/{POD_TEMPLATE}: no container named `{CONTAINER}` (the "
                        "training operator only runs that one); fix manifests/base/trainer-podtemplate.yaml")
    container.update(image=opts.image, command=list(opts.command), args=list(opts.args))
    ours = dict(sorted(opts.env.items())) | {"VFM_MAX_RESTARTS": str(opts.max_restarts)}
    env = [e for e in container.get("env") or [] if e.get("name") not in ours]
    container["env"] = env + [{"name": k, "value": v} for k, v in ours.items()] + list(opts.extra_env or [])
    if not any(p.get("name") == PORT_NAME for p in container.get("ports") or []):
        container.setdefault("ports", []).append({"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"})
    res = container.setdefault("resources", {})
    if uses_gpus(recipe):
        for key in ("requests", "limits"):
            res.setdefault(key, {})[GPU_RESOURCE] = str(recipe.hardware.procs_per_node)
    # the pipeline task's own settings (KFP TaskConfig passthrough) are the run's, so they go on top
    for key in ("requests", "limits"):
        res.setdefault(key, {}).update({k: str(v) for k, v in ((opts.resources or {}).get(key) or {}).items()})
    if opts.node_selector:
        spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **opts.node_selector}
    if opts.tolerations:
        spec["tolerations"] = list(spec.get("tolerations") or []) + [t_ for t_ in opts.tolerations
                                                                      if t_ not in (spec.get("tolerations") or [])]
    meta = t.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **opts.labels, "vfm.io/role": role}
    meta["annotations"] = {**(meta.get("annotations") or {}), "sidecar.istio.io/inject": "false"}
    spec.pop("restartPolicy", None)  # the replica's ExitCode policy decides (the operator sets Never)
    spec["terminationGracePeriodSeconds"] = max(int(spec.get("terminationGracePeriodSeconds") or 0),
                                                SHUTDOWN_TIMEOUT_S + 60)
    return t


def template_cpu(template: dict[str, Any]) -> str | None:
    """The CPU request of a pod template's trainer container, if it states one."""
    for c in (template.get("spec") or {}).get("containers") or []:
        if c.get("name") == CONTAINER:
            return ((c.get("resources") or {}).get("requests") or {}).get("cpu")
    return None


def _snake(obj: dict[str, Any]) -> dict[str, Any]:
    """K8s JSON keys (camelCase, from a KFP TaskConfig) → the Python client's keyword names."""
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in obj.items()}


def validate_options(opts: JobOptions) -> None:
    """The checks every launcher makes before it builds a job: a DNS-safe name, a pinned image, a cap ≥ 0."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", opts.name) or len(opts.name) > MAX_NAME:
        raise UserError(f"job name {opts.name!r}: use ≤ {MAX_NAME} lowercase letters, digits and '-'")
    if not opts.image or opts.image.endswith(":latest") or ":" not in opts.image.rsplit("/", 1)[-1]:
        if "@sha256:" not in opts.image:
            raise UserError(f"image {opts.image!r}: pin a tag or digest (not latest) so pods and caches agree")
    if opts.max_restarts < 0:
        raise UserError(f"max_restarts={opts.max_restarts}: must be ≥ 0")


def build_job(recipe: Recipe, opts: JobOptions, pod_template: dict[str, Any] | None = None) -> kt.KubeflowOrgV1PyTorchJob:
    """The PyTorchJob for `recipe` under `opts` (validated: name, image, node arithmetic). With
    `pod_template` (a PodTemplate's `template`, K8s JSON) every replica is built from it."""
    validate_options(opts)
    nodes = recipe.hardware.nodes
    procs = recipe.hardware.procs_per_node
    labels = {**opts.labels, "vfm.io/recipe": label_value(recipe.id)}
    opts = replace(opts, labels=labels)
    job_labels = dict(labels)
    if opts.gang and opts.gang.scheduler == "kueue" and opts.gang.queue:
        job_labels[QUEUE_LABEL] = opts.gang.queue

    def template(role: str) -> Any:
        if pod_template is not None:
            return pod_from_template(pod_template, recipe, opts, role)
        return _pod_template(recipe, opts, role)

    replicas: dict[str, kt.KubeflowOrgV1ReplicaSpec] = {}
    elastic = None
    if opts.elastic is not None:
        e = opts.elastic
        if not e.min_nodes == nodes == e.max_nodes:
            raise UserError(f"elastic: min_nodes ({e.min_nodes}) and max_nodes ({e.max_nodes}) must both be the "
                            f"recipe's {nodes} nodes: a run resumes only at the world size it checkpointed at "
                            "(per-rank loader positions and RNG, accumulation for the global batch)")
        # elastic jobs rendezvous through worker-0 (c10d); the operator rejects elastic without Workers
        replicas["Worker"] = kt.KubeflowOrgV1ReplicaSpec(
            replicas=nodes, restart_policy="ExitCode", template=template("worker"))
        elastic = kt.KubeflowOrgV1ElasticPolicy(min_replicas=e.min_nodes, max_replicas=e.max_nodes,
                                                max_restarts=e.max_restarts, rdzv_backend="c10d")
    else:
        replicas["Master"] = kt.KubeflowOrgV1ReplicaSpec(
            replicas=1, restart_policy="ExitCode", template=template("master"))
        if nodes > 1:  # a single-node job is Master only (the old launcher forced a Worker)
            replicas["Worker"] = kt.KubeflowOrgV1ReplicaSpec(
                replicas=nodes - 1, restart_policy="ExitCode", template=template("worker"))
    scheduling = None
    if opts.gang is not None and opts.gang.scheduler != "kueue":
        g = opts.gang
        scheduling = kt.KubeflowOrgV1SchedulingPolicy(
            min_available=g.min_available or nodes, queue=g.queue, priority_class=g.priority_class,
            schedule_timeout_seconds=g.schedule_timeout_seconds)
    run_policy = kt.KubeflowOrgV1RunPolicy(
        backoff_limit=opts.backoff_limit,
        clean_pod_policy=opts.clean_pod_policy,  # a Failed job must not leave its master running (trainer#1579)
        ttl_seconds_after_finished=opts.ttl_seconds_after_finished,
        active_deadline_seconds=opts.active_deadline_seconds,
        scheduling_policy=scheduling,
    )
    return kt.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(name=opts.name, namespace=opts.namespace, labels=job_labels,
                                  annotations=dict(opts.annotations) or None),
        spec=kt.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(procs), pytorch_replica_specs=replicas, run_policy=run_policy,
            elastic_policy=elastic),
    )


def to_manifest(job: kt.KubeflowOrgV1PyTorchJob | dict[str, Any]) -> dict[str, Any]:
    """The wire format (camelCase, no nulls) of a job model; dicts pass through."""
    if isinstance(job, dict):
        return job
    from kubeflow.training.api_client import ApiClient

    return ApiClient().sanitize_for_serialization(job)
