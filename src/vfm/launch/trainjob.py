"""The Kubeflow Trainer v2 TrainJob of one stage, built with the kubeflow-trainer-api models (v2.3).

    job = build_trainjob(recipe, JobOptions(...), pod_template)   # the same options as build_job
    manifest = trainjob_manifest(job)                             # camelCase dict for the API server

A TrainJob names a runtime instead of carrying pods: `vfm-torch`, the ClusterTrainingRuntime of
manifests/components/trainer-v2 (torch policy, one replicated job `node`, the exit-code failure policy,
the parts of the pod no TrainJob may patch: priority class, Secret/ConfigMap env, service account token).
What the run decides goes into the TrainJob:

* `trainer`: image, command (torchrun through vfm.train.torchrun, as for PyTorchJobs), args, env,
  `numNodes`, `numProcPerNode` and `resourcesPerNode`. Trainer v2.2 removed `numProcPerNode` and the
  elastic policy from the runtime's Torch policy; in v2.3 `numProcPerNode` lives on `trainer` (the torch
  plugin turns it into PET_NPROC_PER_NODE) and there is no elastic TrainJob.
* `runtimePatches` (manager `vfm.io/launcher`): what the namespace's `vfm-trainer` PodTemplate says per
  overlay — node selection, tolerations, volumes (the /dev/shm size), the container's security context
  (IPC_LOCK under the RDMA exemption) — plus the GPU product the recipe names, the run's labels and the
  Istio opt-out. `resourcesPerNode` starts from the template's container resources (RDMA devices
  included) so the overlay's sizing reaches Trainer v2 pods too.

The torch plugin (kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go, v2.3.0) injects
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the Job completion index), PET_MASTER_ADDR
(`<job>-node-0-0.<job>`) and PET_MASTER_PORT=29500 into the `node` container and rejects a TrainJob that
sets any of them itself.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from kubeflow_trainer_api import models as tm

from vfm.errors import UserError
from vfm.launch.job import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    QUEUE_LABEL,
    JobOptions,
    _resources,
    label_value,
    uses_gpus,
    validate_options,
)
from vfm.recipes import Recipe
from vfm.recipes.gpus import GPU_PRODUCTS
from vfm.train.torchrun import SHUTDOWN_TIMEOUT_S

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "vfm-torch"  # manifests/components/trainer-v2/cluster-training-runtime.yaml
RUNTIME_KIND = "ClusterTrainingRuntime"
NODE = "node"  # the runtime's replicated job and container: the torch plugin only injects env there
TRAINER_PORT = 29500  # constants.ContainerTrainerPort: PET_MASTER_PORT
PATCH_MANAGER = "vfm.io/launcher"
# the torch plugin refuses a TrainJob that sets these (constants.TorchRunReservedEnvNames)
RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"})
RUNTIME_SECRET = "vfm-credentials"  # the runtime's envFrom: a TrainJob cannot add envFrom


def _template_container(template: dict[str, Any] | None) -> dict[str, Any]:
    for c in ((template or {}).get("spec") or {}).get("containers") or []:
        if c.get("name") in ("pytorch", NODE):
            return c
    return {}


def _resources_per_node(recipe: Recipe, opts: JobOptions, template: dict[str, Any] | None) -> dict[str, Any]:
    """The template's container resources (an overlay's sizing and RDMA devices) with the recipe's GPU
    count per node and the pipeline task's own settings on top; the recipe's sizing without a template."""
    if not template:
        return _resources(recipe, opts)
    res = copy.deepcopy(_template_container(template).get("resources") or {})
    if uses_gpus(recipe):
        for key in ("requests", "limits"):
            res.setdefault(key, {})[GPU_RESOURCE] = str(recipe.hardware.procs_per_node)
    for key in ("requests", "limits"):
        res.setdefault(key, {}).update({k: str(v) for k, v in ((opts.resources or {}).get(key) or {}).items()})
    return res


def _pod_patch(recipe: Recipe, opts: JobOptions, template: dict[str, Any] | None) -> tm.TrainerV1alpha1PodTemplatePatch:
    spec = (template or {}).get("spec") or {}
    node_selector = dict(spec.get("nodeSelector") or {})
    tolerations = list(spec.get("tolerations") or [])
    if uses_gpus(recipe):
        node_selector[GPU_PRODUCT_LABEL] = GPU_PRODUCTS.get(recipe.hardware.gpu, recipe.hardware.gpu)
        gpu_toleration = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        tolerations += [gpu_toleration] if gpu_toleration not in tolerations else []
    node_selector.update(opts.node_selector or {})
    tolerations += [t for t in opts.tolerations or [] if t not in tolerations]
    patch: dict[str, Any] = {}
    if node_selector:
        patch["nodeSelector"] = node_selector
    if tolerations:
        patch["tolerations"] = tolerations
    if spec.get("volumes"):
        patch["volumes"] = spec["volumes"]
    # the kubelet must wait out the checkpoint the trainer starts on SIGTERM (vfm.launch.job._pod_template)
    patch["terminationGracePeriodSeconds"] = max(int(spec.get("terminationGracePeriodSeconds") or 0),
                                                 SHUTDOWN_TIMEOUT_S + 60)
    if sc := _template_container(template).get("securityContext"):
        patch["containers"] = [{"name": NODE, "securityContext": sc}]
    meta = (template or {}).get("metadata") or {}
    return tm.TrainerV1alpha1PodTemplatePatch.from_dict({
        "metadata": {"labels": {**(meta.get("labels") or {}), **opts.labels, "vfm.io/role": NODE},
                     # an Istio sidecar keeps a finished pod Running and blocks the job's completion
                     "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": patch or None})


def build_trainjob(recipe: Recipe, opts: JobOptions, pod_template: dict[str, Any] | None = None) -> tm.TrainerV1alpha1TrainJob:
    """The TrainJob for `recipe` under `opts` (the PyTorchJob launcher's options and checks). With
    `pod_template` (the namespace's `vfm-trainer` PodTemplate `template`) its overlay settings reach the pods."""
    validate_options(opts)
    if opts.elastic is not None:
        raise UserError("elastic: Trainer v2.3 has no elastic TrainJob (v2.2 removed the Torch elastic policy); "
                        "use launcher=pytorchjob for elastic training, or drop `elastic`")
    if opts.gang is not None and opts.gang.scheduler != "kueue":
        raise UserError(f"gang scheduler {opts.gang.scheduler!r}: on Trainer v2 gang scheduling is the runtime's "
                        "`podGroupPolicy` (coscheduling / volcano) or Kueue (a queue); use Gang(scheduler='kueue')")
    if opts.secret and opts.secret != RUNTIME_SECRET:
        raise UserError(f"secret {opts.secret!r}: a TrainJob cannot add envFrom; on Trainer v2 the credentials are "
                        f"the {RUNTIME} runtime's Secret {RUNTIME_SECRET!r} (patch the ClusterTrainingRuntime to change it)")
    env = dict(sorted(opts.env.items())) | {"VFM_MAX_RESTARTS": str(opts.max_restarts)}
    env_vars = [{"name": k, "value": v} for k, v in env.items()] + list(opts.extra_env or [])
    reserved = sorted({e["name"] for e in env_vars} & RESERVED_ENV)
    if reserved:
        raise UserError(f"env {reserved}: Trainer v2's torch plugin sets these itself and rejects a TrainJob that does")
    labels = {**opts.labels, "vfm.io/recipe": label_value(recipe.id)}
    job_labels = dict(labels)
    if opts.gang and opts.gang.queue:
        job_labels[QUEUE_LABEL] = opts.gang.queue  # Kueue admits TrainJobs natively (its trainjob integration)
    opts_labeled = replace(opts, labels=labels)
    trainer = tm.TrainerV1alpha1Trainer.from_dict({
        "image": opts.image, "command": list(opts.command), "args": list(opts.args), "env": env_vars,
        "numNodes": recipe.hardware.nodes, "numProcPerNode": recipe.hardware.procs_per_node,
        "resourcesPerNode": _resources_per_node(recipe, opts, pod_template)})
    patch = tm.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        training_runtime_spec=tm.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=tm.TrainerV1alpha1JobSetTemplatePatch(
                spec=tm.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[tm.TrainerV1alpha1ReplicatedJobPatch(
                    name=NODE, template=tm.TrainerV1alpha1JobTemplatePatch(
                        spec=tm.TrainerV1alpha1JobSpecPatch(
                            template=_pod_patch(recipe, opts_labeled, pod_template))))]))))
    return tm.TrainerV1alpha1TrainJob(
        api_version=API_VERSION, kind=KIND,
        metadata=tm.IoK8sApimachineryPkgApisMetaV1ObjectMeta.from_dict({
            "name": opts.name, "namespace": opts.namespace, "labels": job_labels,
            **({"annotations": dict(opts.annotations)} if opts.annotations else {})}),
        spec=tm.TrainerV1alpha1TrainJobSpec(
            runtime_ref=tm.TrainerV1alpha1RuntimeRef(name=RUNTIME, kind=RUNTIME_KIND, api_group=GROUP),
            trainer=trainer, runtime_patches=[patch],
            active_deadline_seconds=opts.active_deadline_seconds))


def trainjob_manifest(job: tm.TrainerV1alpha1TrainJob) -> dict[str, Any]:
    """The wire format (camelCase, no nulls) of a TrainJob model."""
    return job.to_dict()


def node_pod_template(manifest: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The pod template (K8s JSON) of a TrainJob's nodes as Trainer v2 builds it from `runtime` (the
    ClusterTrainingRuntime object): the runtime's `node` pod, the trainer's image, command, args, env and
    resources, the torch plugin's PET_* env and port, then the TrainJob's runtime patches. What `vfm
    preflight` checks a TrainJob's pods on (they exist only once the controller has made them)."""
    jobs = ((runtime.get("spec") or {}).get("template") or {}).get("spec", {}).get("replicatedJobs") or []
    node = next((j for j in jobs if j.get("name") == NODE), None)
    if node is None:
        raise UserError(f"ClusterTrainingRuntime {runtime.get('metadata', {}).get('name')}: no replicatedJob "
                        f"`{NODE}`; the torch plugin configures only that one (manifests/components/trainer-v2)")
    pod = copy.deepcopy(((node.get("template") or {}).get("spec") or {}).get("template") or {})
    spec = pod.setdefault("spec", {})
    container = next((c for c in spec.get("containers") or [] if c.get("name") == NODE), None)
    if container is None:
        raise UserError(f"ClusterTrainingRuntime {runtime.get('metadata', {}).get('name')}: no container `{NODE}`")
    trainer = (manifest.get("spec") or {}).get("trainer") or {}
    name = manifest["metadata"]["name"]
    for key in ("image", "command", "args"):
        if trainer.get(key):
            container[key] = copy.deepcopy(trainer[key])
    if trainer.get("resourcesPerNode"):
        container["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    nproc = trainer.get("numProcPerNode")
    plugin_env = [{"name": "PET_NNODES", "value": str(trainer.get("numNodes") or 1)},
                  {"name": "PET_NPROC_PER_NODE", "value": str(nproc if nproc is not None else "auto")},
                  {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                      "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                  {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
                  {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)}]
    container["env"] = _merge_by_name(container.get("env"), list(trainer.get("env") or []) + plugin_env)
    container["ports"] = _merge_by_name(container.get("ports"), [{"containerPort": TRAINER_PORT, "name": "trainer"}],
                                        key="containerPort")
    for patch in (manifest.get("spec") or {}).get("runtimePatches") or []:
        tpl = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for rj in tpl.get("replicatedJobs") or []:
            if rj.get("name") != NODE:
                continue
            p = ((rj.get("template") or {}).get("spec") or {}).get("template") or {}
            meta = pod.setdefault("metadata", {})
            for key in ("labels", "annotations"):
                if (p.get("metadata") or {}).get(key):
                    meta[key] = {**(meta.get(key) or {}), **p["metadata"][key]}
            ps = p.get("spec") or {}
            if ps.get("nodeSelector"):
                spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **ps["nodeSelector"]}
            if ps.get("tolerations"):
                spec["tolerations"] = list(spec.get("tolerations") or []) + list(ps["tolerations"])
            if ps.get("volumes"):
                spec["volumes"] = _merge_by_name(spec.get("volumes"), ps["volumes"])
            for key in ("serviceAccountName", "terminationGracePeriodSeconds", "securityContext"):
                if key in ps:
                    spec[key] = ps[key]
            for cp in ps.get("containers") or []:
                target = next((c for c in spec.get("containers") or [] if c.get("name") == cp.get("name")), None)
                if target is None:
                    raise UserError(f"TrainJob {name}: runtimePatches name container {cp.get('name')!r}, which the "
                                    "runtime does not have")
                if "securityContext" in cp:
                    target["securityContext"] = cp["securityContext"]
                for key in ("env", "volumeMounts"):
                    if cp.get(key):
                        target[key] = _merge_by_name(target.get(key), cp[key])
    return pod


def _merge_by_name(base: list[dict[str, Any]] | None, extra: list[dict[str, Any]], key: str = "name") -> list[dict[str, Any]]:
    """List-map merge as the API server applies it: an item of `extra` replaces the one with its key."""
    out = {item[key]: item for item in base or []}
    out.update({item[key]: item for item in extra})
    return list(out.values())
