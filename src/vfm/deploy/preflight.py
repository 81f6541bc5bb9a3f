"""`vfm preflight`: what a platform engineer runs before booking GPUs.

Offline (`check_offline`), from the repository alone: render an overlay, compile a recipe's pipeline,
build the jobs the launcher would create at paper scale from the overlay's `vfm-trainer` PodTemplate
(vfm.pipeline.steps.train_options / eval_options / job_manifest, the launcher's own code) — PyTorchJobs,
or TrainJobs with `launcher=trainjob`, whose pods are resolved against the overlay's vfm
ClusterTrainingRuntime as Trainer v2 would build them (vfm.launch.trainjob.node_pod_template) — then check that every reference resolves and every pod has what its work needs. Live
(`check_live`, `--context`): the same plan against a cluster through the kubernetes client.

Every failed check is a `Finding` naming the object, the field and the fix; the command exits 2 when
there is one. The checks are plain functions of the rendered objects, the compiled package and the job
manifests, so they run just as well on another commit's artifacts (tests/deploy/test_preflight.py runs
them on what the first cluster path produced).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vfm.deploy.policy import restricted_violations

SA_USER = "system:serviceaccount:{namespace}:{name}"
VAP_NAME = "vfm-restricted-except-ipc-lock"  # manifests/components/rdma-exemption/admission-policy.yaml
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
OPTIONAL_KEYS_ANNOTATION = "vfm.io/optional-keys"  # manifests/secrets/vfm-secrets.yaml.example
SHM_MOUNT = "/dev/shm"
GRACE_MARGIN_S = 30  # after the ranks' checkpoint window: torchrun's own teardown and the pod's exit
# the executors of a compiled pipeline whose step launches a KubeRay RayJob (a Ray Data curation step,
# vfm.launch.rayjob): the runner then needs LAUNCHER_PERMISSIONS["rayjob"] too
RAYJOB_EXECUTOR = re.compile(r"^exec-curate(-|$)")


@dataclass(frozen=True)
class Finding:
    check: str
    obj: str
    field: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.obj} {self.field}: {self.problem}\n    fix: {self.fix}"


# --- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One executor of a compiled KFP package: what its pod runs and names."""

    executor: str
    image: str
    gpus: int
    secrets: tuple[tuple[str | None, tuple[str, ...], bool], ...]
    """(Secret name or None when a parameter the run sets later names it, keys, optional)."""
    pvcs: tuple[str | None, ...]


@dataclass
class Package:
    """A compiled pipeline (the YAML `kfp run create -f` takes)."""

    spec: dict[str, Any]
    platform: dict[str, Any]
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Package:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        platform = next((d["platforms"] for d in docs if "platforms" in d), {})
        return cls(spec=docs[0], platform=platform, path=str(path))

    def defaults(self) -> dict[str, Any]:
        params = ((self.spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {}
        return {k: v.get("defaultValue") for k, v in params.items()}

    def tasks(self, params: dict[str, Any]) -> list[Task]:
        executors = (self.spec.get("deploymentSpec") or {}).get("executors") or {}
        k8s = ((self.platform.get("kubernetes") or {}).get("deploymentSpec") or {}).get("executors") or {}
        out = []
        for name, ex in sorted(executors.items()):
            container = ex.get("container") or {}
            acc = (container.get("resources") or {}).get("accelerator") or {}
            gpus = int(float(acc.get("resourceCount") or acc.get("count") or 0))
            plat = k8s.get(name) or {}
            secrets = tuple(
                (_param_value(s, "secretName", params), tuple(k["secretKey"] for k in s.get("keyToEnv") or []),
                 bool(s.get("optional", False)))
                for s in plat.get("secretAsEnv") or [])
            pvcs = tuple(_param_value(m, "pvcName", params) for m in plat.get("pvcMount") or [])
            out.append(Task(name, container.get("image", ""), gpus, secrets, pvcs))
        return out


def _param_value(entry: dict[str, Any], key: str, params: dict[str, Any]) -> str | None:
    """A kfp-kubernetes reference (`secretName`, `secretNameParameter`, `constant`, a pipeline channel)
    resolved against the run's parameters; None when it comes from another task's output."""
    if entry.get(key):
        return str(entry[key])
    ref = entry.get(f"{key}Parameter") or entry
    if "constant" in ref:
        return str(ref["constant"])
    if "runtimeValue" in ref:
        return str((ref["runtimeValue"] or {}).get("constant"))
    channel = ref.get("componentInputParameter")
    if channel:
        name = channel.removeprefix("pipelinechannel--")
        return None if params.get(name) is None else str(params[name])
    return None


class Objects:
    """The rendered overlay plus the objects declared bring-your-own, indexed by (kind, namespace, name)."""

    def __init__(self, rendered: Iterable[dict[str, Any]], byo: Iterable[dict[str, Any]] = ()):
        self.items: list[dict[str, Any]] = list(rendered)
        self.byo: list[dict[str, Any]] = list(byo)
        self._index = {_key(o): o for o in self.items + self.byo}

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._index.get((kind, namespace or "", name))

    def of_kind(self, kind: str) -> Iterator[dict[str, Any]]:
        return (o for o in self.items + self.byo if o.get("kind") == kind)


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj.get("kind", ""), meta.get("namespace") or "", meta.get("name", "")


def byo_declarations(path: Path) -> list[dict[str, Any]]:
    """The objects an operator creates out of band (Secrets), as declared by their committed example."""
    if not path.exists():
        return []
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- the plan: what the launcher would create ---------------------------------------------------
@dataclass
class PlannedJob:
    what: str
    """e.g. `pretrain`, `eval in_c`."""
    manifest: dict[str, Any]
    recipe: Any
    stage: str
    replicas: list[tuple[str, dict[str, Any], int]] = field(default_factory=list)
    """(role, pod template, pod count): a PyTorchJob's replica specs; a TrainJob's `node` pods as Trainer v2
    builds them from the runtime (none when the overlay has no runtime)."""

    def __post_init__(self) -> None:
        if not self.replicas:  # a PyTorchJob carries its pods
            self.replicas = job_replicas(self.manifest)

    @property
    def pods(self) -> int:
        return sum(n for _, _, n in self.replicas)

    @property
    def procs_per_pod(self) -> int:
        spec = self.manifest.get("spec") or {}
        return int(str(spec.get("nprocPerNode") or (spec.get("trainer") or {}).get("numProcPerNode") or 1))


@dataclass
class Plan:
    recipe_id: str
    params: dict[str, Any]
    tasks: list[Task]
    jobs: list[PlannedJob] = field(default_factory=list)
    kfp_namespace: str = "kubeflow"
    runner: str = "vfm-pipeline-runner"
    """The service account KFP runs the pipeline's steps as, in `kfp_namespace`."""

    @property
    def launcher(self) -> str:
        """The pipeline's `launcher` parameter: pytorchjob or trainjob."""
        return str(self.params.get("launcher") or "pytorchjob")

    @property
    def job_kinds(self) -> tuple[str, ...]:
        """The kinds of job one run creates (keys of vfm.launch.cluster.LAUNCHER_PERMISSIONS): the `launcher`
        parameter's, and `rayjob` where the pipeline has a Ray Data curation step (RAYJOB_EXECUTOR)."""
        curates = any(RAYJOB_EXECUTOR.match(t.executor) for t in self.tasks)
        return (self.launcher, "rayjob") if curates else (self.launcher,)


def build_jobs(recipe_id: str, params: dict[str, Any], template: dict[str, Any] | None,
               kfp_namespace: str = "kubeflow", runtime: dict[str, Any] | None = None) -> list[PlannedJob]:
    """Every job one run of the pipeline creates (one seed), built by the launcher's own code, of the
    `launcher` parameter's kind (TrainJob pods from `runtime`, the overlay's ClusterTrainingRuntime). An
    empty `namespace` parameter sends them where the launcher pod runs, as the steps do."""
    from vfm import launch, storage
    from vfm.launch.job import uses_gpus
    from vfm.pipeline import steps
    from vfm.pipeline.dag import plan_dag
    from vfm.recipes import load_recipe

    plan = plan_dag(recipe_id)
    recipe_id = plan.recipe_id  # `convnext-xl-ablation` runs the convnext-xl recipe
    profile, overrides = str(params.get("profile") or "paper"), [str(o) for o in params.get("overrides") or []]
    if plan.cells:  # every cell's job has one shape; plan the largest (the grid's last: widest kernel and MLP)
        from vfm.recipes.ablation import cell_by_name

        overrides += cell_by_name(load_recipe(recipe_id, overrides, profile), plan.cells[-1]).overrides
    recipe = load_recipe(recipe_id, overrides, profile)
    env = {"MLFLOW_TRACKING_URI": str(params.get("mlflow_uri") or "")}
    if params.get("s3_endpoint"):
        env["AWS_ENDPOINT_URL_S3"] = str(params["s3_endpoint"])
    common = dict(run_id="preflight", namespace=str(params.get("namespace") or kfp_namespace), image=str(params.get("image")),
                  secret=str(params.get("credentials_secret") or ""), env=env,
                  timeout_hours=float(params.get("train_timeout_hours") or 24), queue=str(params.get("kueue_queue") or ""))
    data_prefix, runs = str(params.get("data_prefix")), str(params.get("runs_prefix"))
    seed = int(float((params.get("seeds") or plan.seeds or [0])[0]))
    launcher = str(params.get("launcher") or "pytorchjob")

    def planned(what: str, manifest: dict[str, Any], recipe: Any, stage: str) -> PlannedJob:
        return PlannedJob(what, manifest, recipe, stage, job_replicas(manifest, runtime))

    jobs = []
    for stage in plan.stages:
        data = storage.join(storage.join(data_prefix, recipe.stages[stage].data.dataset), "manifest.json")
        out = storage.join(storage.join(runs, recipe_id), f"preflight/{stage}")
        last = stage == plan.last
        opts = steps.train_options(recipe_id, stage, seed=seed if last else None, **common)
        manifest = steps.job_manifest(recipe, stage, opts, template, lambda w, stage=stage, data=data, out=out: launch.trainer_args(
            recipe_id, stage, data=data, out=out, profile=profile, overrides=overrides, workers=w,
            seed=seed if stage == plan.last else None), launcher)
        jobs.append(planned(stage, manifest, recipe, stage))
    for stage in plan.downstream:  # paper 001's transfer stages: their own GPUs, from the pretraining export
        ds = recipe.downstream[stage]
        role = next(r for r, d in plan.data.items() if d.dataset == ds.data.dataset and d.split == "train")
        data = storage.join(storage.join(data_prefix, plan.data[role].name), "manifest.json")
        out = storage.join(storage.join(runs, recipe_id), f"preflight/{stage}")
        opts = steps.train_options(recipe_id, stage, seed=ds.seeds[0], **common)
        sized = launch.stage_hardware(recipe, stage)
        manifest = steps.job_manifest(sized, stage, opts, template, lambda w, stage=stage, data=data, out=out, ds=ds:
                                      launch.trainer_args(recipe_id, stage, data=data, out=out, profile=profile,
                                                          overrides=overrides, workers=w, seed=ds.seeds[0],
                                                          init=storage.join(runs, "preflight/export")), launcher)
        jobs.append(planned(stage, manifest, sized, stage))
    node = launch.one_node(recipe)
    for suite in plan.suites:
        opts = steps.eval_options(recipe_id, suite, seed=seed, ranks=node.hardware.gpus, **common)
        manifest = steps.job_manifest(node, plan.last, opts, template, lambda w, suite=suite: launch.evaluator_args(
            storage.join(runs, "preflight/export"), suite, {suite: storage.join(data_prefix, "manifest.json")},
            out=storage.join(runs, "preflight/results.json"), run_key="preflight", parent_run_id="preflight",
            run_name="preflight", tags={}, profile=profile, overrides=overrides, workers=w,
            gpu=uses_gpus(node)), launcher)
        jobs.append(planned(f"eval {suite}", manifest, node, plan.last))
    return jobs


def pod_template_of(objects: Objects, namespace: str) -> dict[str, Any] | None:
    from vfm.launch.job import POD_TEMPLATE

    obj = objects.get("PodTemplate", namespace, POD_TEMPLATE)
    return None if obj is None else obj.get("template")


def runtime_of(objects: Objects) -> dict[str, Any] | None:
    from vfm.launch.trainjob import RUNTIME, RUNTIME_KIND

    return objects.get(RUNTIME_KIND, None, RUNTIME)


# --- helpers over job manifests -----------------------------------------------------------------
def job_replicas(job: dict[str, Any], runtime: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any], int]]:
    """(role, pod template, count) of a PyTorchJob's replica specs, of a TrainJob's nodes on `runtime`, or of a
    RayJob's head, workers and submitter."""
    from vfm.launch import rayjob as rj
    from vfm.launch import trainjob as tj

    if job.get("kind") == rj.KIND:
        return rj.pod_templates(job)
    if job.get("kind") == tj.KIND:
        if runtime is None:
            return []
        n = int(((job.get("spec") or {}).get("trainer") or {}).get("numNodes") or 1)
        return [(tj.NODE, tj.node_pod_template(job, runtime), n)]
    return [(role, spec.get("template") or {}, int(spec.get("replicas") or 1))
            for role, spec in sorted(((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).items())]


def replicas(pj: PlannedJob) -> Iterator[tuple[str, dict[str, Any]]]:
    for role, pod, _ in pj.replicas:
        yield role, pod


def trainer_container(pod: dict[str, Any]) -> dict[str, Any]:
    """The trainer's container: `pytorch` in a PyTorchJob replica (and the PodTemplate), `node` on Trainer v2."""
    from vfm.launch.job import CONTAINER
    from vfm.launch.trainjob import NODE

    return next((c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") in (CONTAINER, NODE)), {})


def _job_ref(job: dict[str, Any], role: str | None = None) -> str:
    meta = job.get("metadata") or {}
    return f"{job.get('kind', 'PyTorchJob')} {meta.get('namespace')}/{meta.get('name')}" + (f" replica {role}" if role else "")


def _arg(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def quantity_bytes(q: Any) -> float:
    """A Kubernetes memory quantity ("128Gi", "16G", "512Mi") in bytes."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q).strip())
    if not m or (m.group(2) and m.group(2) not in _SUFFIX):
        raise ValueError(f"{q!r} is not a Kubernetes quantity")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def grouped(findings: Iterable[Finding]) -> list[str]:
    """The findings as printed: one block per distinct problem, listing every object that has it."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for f in findings:
        groups.setdefault((f.check, f.field, f.problem, f.fix), []).append(f.obj)
    return [f"[{check}] {', '.join(dict.fromkeys(objs))}\n    {field_}: {problem}\n    fix: {fix}"
            for (check, field_, problem, fix), objs in groups.items()]


# --- offline checks -----------------------------------------------------------------------------
def check_references(plan: Plan, objects: Objects) -> list[Finding]:
    """Every Secret (and key), ConfigMap, PVC, ServiceAccount, Namespace, PriorityClass and LocalQueue a
    task or replica names exists in the overlay or is declared bring-your-own."""
    from vfm.launch.job import QUEUE_LABEL

    out: list[Finding] = []
    kfp = plan.kfp_namespace
    if not plan.params.get("namespace"):
        out.append(Finding("refs", "pipeline parameter namespace", "defaultValue", f"is empty, so every job goes to "
                           f"the launcher pod's own namespace ({kfp})", "default it to vfm, where the runner may "
                           "create PyTorchJobs, or pass --param namespace=vfm"))
    if objects.get("ServiceAccount", kfp, plan.runner) is None:
        out.append(Finding("refs", f"ServiceAccount {kfp}/{plan.runner}", "metadata.name",
                           "the pipeline runner's service account is not in the overlay",
                           "apply manifests/base/rbac.yaml, or pass --runner NAMESPACE/NAME of the one KFP uses"))
    for t in plan.tasks:
        for name, keys, optional in t.secrets:
            out += _secret_keys(objects, f"pipeline task {t.executor}", kfp, name, keys, optional)
        for pvc in t.pvcs:
            if pvc is not None and objects.get("PersistentVolumeClaim", kfp, pvc) is None:
                out.append(Finding("refs", f"pipeline task {t.executor}", "pvcMount", f"PVC {kfp}/{pvc} is defined "
                                   "nowhere, so the step's pod stays Pending", "define it (manifests/base/"
                                   "raw-datasets-pvc.yaml) or declare it bring-your-own (--byo PersistentVolumeClaim/"
                                   f"{kfp}/{pvc}), or pass --param raw_data_pvc=<your claim>"))
    for pj in plan.jobs:
        job = pj.manifest
        ns = (job.get("metadata") or {}).get("namespace") or ""
        if objects.get("Namespace", None, ns) is None:
            out.append(Finding("refs", _job_ref(job), "metadata.namespace", f"namespace {ns!r} is not in the overlay "
                               "(an empty `namespace` parameter sends the job to the launcher pod's own namespace)",
                               "pass --param namespace=vfm (the pipeline's default) or add the Namespace"))
        queue = ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
        if queue and objects.get("LocalQueue", ns, queue) is None:
            out.append(Finding("refs", _job_ref(job), f"metadata.labels[{QUEUE_LABEL}]", f"LocalQueue {ns}/{queue} "
                               "does not exist; Kueue never admits the job", "include manifests/components/kueue in "
                               "the overlay or pass --param kueue_queue=<an existing LocalQueue>"))
        for role, pod in replicas(pj):
            out += _pod_references(objects, _job_ref(job, role), ns, pod.get("spec") or {})
    return out


def _secret_keys(objects: Objects, who: str, ns: str, name: str | None, keys: Iterable[str],
                 optional: bool) -> list[Finding]:
    if name is None:
        return []
    secret = objects.get("Secret", ns, name)
    if secret is None:
        if optional:
            return []
        return [Finding("refs", who, "secretAsEnv", f"Secret {ns}/{name} is neither in the overlay nor declared "
                        "bring-your-own", "create it from manifests/secrets/vfm-secrets.yaml.example (add the "
                        "namespace there), or pass --param credentials_secret=<your Secret>")]
    declared = set((secret.get("stringData") or {}) | (secret.get("data") or {}))
    optional_keys = {k.strip() for k in ((secret.get("metadata") or {}).get("annotations") or {})
                     .get(OPTIONAL_KEYS_ANNOTATION, "").split(",") if k.strip()}
    out = []
    for key in keys:
        if key not in declared and not optional:
            out.append(Finding("refs", who, f"secretAsEnv[{key}]", f"Secret {ns}/{name} declares no key {key}",
                               f"add {key} to the Secret, or reference it optionally"))
        elif key in optional_keys and not optional:
            out.append(Finding("refs", who, f"secretAsEnv[{key}]", f"key {key} of Secret {ns}/{name} is optional "
                               "(absent when MLflow has no auth) but the task requires it: its pod fails with "
                               "CreateContainerConfigError", "reference it with optional=True "
                               "(kfp.kubernetes.use_secret_as_env(..., optional=True))"))
    return out


def _pod_references(objects: Objects, who: str, ns: str, spec: dict[str, Any]) -> list[Finding]:
    out = []
    sa = spec.get("serviceAccountName")
    if sa and objects.get("ServiceAccount", ns, sa) is None:
        out.append(Finding("refs", who, "spec.serviceAccountName", f"ServiceAccount {ns}/{sa} does not exist",
                           "apply manifests/base/rbac.yaml or fix the PodTemplate"))
    pc = spec.get("priorityClassName")
    if pc and objects.get("PriorityClass", None, pc) is None:
        out.append(Finding("refs", who, "spec.priorityClassName", f"PriorityClass {pc} does not exist (the pod is "
                           "rejected at admission)", "apply manifests/base/priorityclass.yaml"))
    for c in spec.get("containers") or []:
        for src in c.get("envFrom") or []:
            for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                ref = src.get(key)
                if ref and not ref.get("optional") and objects.get(kind, ns, ref.get("name")) is None:
                    out.append(Finding("refs", who, f"containers[{c.get('name')}].envFrom.{key}",
                                       f"{kind} {ns}/{ref.get('name')} is neither in the overlay nor declared "
                                       "bring-your-own", f"create the {kind} in {ns} (manifests/secrets/README.md)"))
    for v in spec.get("volumes") or []:
        for kind, key, name_key in (("PersistentVolumeClaim", "persistentVolumeClaim", "claimName"),
                                    ("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
            ref = v.get(key)
            if ref and not ref.get("optional") and objects.get(kind, ns, ref.get(name_key)) is None:
                out.append(Finding("refs", who, f"volumes[{v.get('name')}]", f"{kind} {ns}/{ref.get(name_key)} "
                                   "does not exist", f"define the {kind} in {ns} or declare it bring-your-own"))
    return out


def check_rbac(plan: Plan, objects: Objects) -> list[Finding]:
    """The runner's service account may do what the launcher does, in the namespace each job goes to."""
    from vfm.launch.cluster import LAUNCHER_PERMISSIONS

    out = []
    user = SA_USER.format(namespace=plan.kfp_namespace, name=plan.runner)
    namespaces = sorted({(j.manifest.get("metadata") or {}).get("namespace") or "" for j in plan.jobs})
    for kind in plan.job_kinds:  # a curation step's RayJob goes where the training jobs go (`namespace`)
        permissions = LAUNCHER_PERMISSIONS[kind]
        for ns in namespaces:
            denied = [f"{verb} {resource}{'/' + name if name else ''}" for group, resource, verb, name in permissions
                      if not allowed(objects, plan.kfp_namespace, plan.runner, ns, group, resource, verb, name)]
            if denied:
                out.append(Finding("rbac", f"ServiceAccount {plan.kfp_namespace}/{plan.runner}", f"namespace {ns}",
                                   f"{user} may not {', '.join(denied)} in {ns}; the launcher does (403 at the first "
                                   "job)", f"bind it a Role with those rules in {ns} (manifests/base/rbac.yaml grants "
                                   "them in vfm"
                                   + (", manifests/components/trainer-v2 for TrainJobs" if kind == "trainjob" else "")
                                   + "), or send the jobs where it may: --param namespace=vfm"))
    return out


def allowed(objects: Objects, sa_ns: str, sa: str, ns: str, group: str, resource: str, verb: str,
            name: str | None = None) -> bool:
    """Kubernetes RBAC, evaluated over the rendered Roles/ClusterRoles and their bindings (allow rules only)."""
    def binds(b: dict[str, Any]) -> bool:
        for s in b.get("subjects") or []:
            if s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace", b["metadata"].get(
                    "namespace")) == sa_ns:
                return True
            if s.get("kind") == "Group" and s.get("name") in ("system:serviceaccounts", f"system:serviceaccounts:{sa_ns}",
                                                                "system:authenticated"):
                return True
        return False

    def grants(role: dict[str, Any] | None) -> bool:
        for r in (role or {}).get("rules") or []:
            if (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", [])) and \
               (resource in r.get("resources", []) or "*" in r.get("resources", [])) and \
               (verb in r.get("verbs", []) or "*" in r.get("verbs", [])) and \
               (not r.get("resourceNames") or (name is not None and name in r["resourceNames"])):
                return True
        return False

    for b in objects.of_kind("RoleBinding"):
        if (b.get("metadata") or {}).get("namespace") != ns or not binds(b):
            continue
        ref = b.get("roleRef") or {}
        role = objects.get(ref.get("kind", "Role"), ns if ref.get("kind") == "Role" else None, ref.get("name", ""))
        if grants(role):
            return True
    for b in objects.of_kind("ClusterRoleBinding"):
        if binds(b) and grants(objects.get("ClusterRole", None, (b.get("roleRef") or {}).get("name", ""))):
            return True
    return False


def check_template(plan: Plan, objects: Objects, template: dict[str, Any] | None) -> list[Finding]:
    """Every replica is the namespace's `vfm-trainer` PodTemplate plus the run's additions: what GitOps puts
    there (node selection, tolerations, /dev/shm, RDMA, priority, service account) reaches every pod."""
    from vfm.launch.job import GPU_PRODUCT_LABEL, POD_TEMPLATE, QUEUE_LABEL, uses_gpus
    from vfm.recipes.gpus import GPU_PRODUCTS

    ns = plan.params.get("namespace") or plan.kfp_namespace
    if template is None:
        return [Finding("template", f"PodTemplate {ns}/{POD_TEMPLATE}", "metadata", "the overlay has no trainer "
                        "PodTemplate in the jobs' namespace; the launcher builds every replica from it",
                        "render an overlay that includes manifests/base (trainer-podtemplate.yaml)")]
    out = []
    if "rayjob" in plan.job_kinds:
        from vfm.launch.rayjob import RAY_POD_TEMPLATE

        if objects.get("PodTemplate", ns, RAY_POD_TEMPLATE) is None:
            out.append(Finding("template", f"PodTemplate {ns}/{RAY_POD_TEMPLATE}", "metadata", "the overlay has no Ray "
                               "PodTemplate in the jobs' namespace; the curation step's RayJob builds its head, "
                               "workers and submitter from it", "render an overlay that includes manifests/base "
                               "(ray-podtemplate.yaml)"))
    if plan.launcher == "trainjob" and runtime_of(objects) is None:
        from vfm.launch.trainjob import RUNTIME, RUNTIME_KIND

        out.append(Finding("template", f"{RUNTIME_KIND} {RUNTIME}", "metadata.name", "the overlay has no vfm runtime, "
                           "which every TrainJob names (launcher=trainjob)", "render an overlay with "
                           "manifests/components/trainer-v2 (e.g. manifests/overlays/h100-trainer-v2)"))
    t_spec = template.get("spec") or {}
    t_container = trainer_container(template)
    for pj in plan.jobs:
        for role, pod in replicas(pj):
            who, spec, c = _job_ref(pj.manifest, role), pod.get("spec") or {}, trainer_container(pod)
            for key in ("nodeSelector", "tolerations", "priorityClassName", "serviceAccountName"):
                if t_spec.get(key) and spec.get(key) != t_spec.get(key):
                    out.append(Finding("template", who, f"spec.{key}", f"is {spec.get(key)!r}, the PodTemplate says "
                                       f"{t_spec.get(key)!r}", "build replicas from the namespace's PodTemplate "
                                       "(vfm.launch.job.pod_from_template)"))
            want_vols = {v["name"]: v for v in t_spec.get("volumes") or []}
            have_vols = {v["name"]: v for v in spec.get("volumes") or []}
            for name, v in want_vols.items():
                if have_vols.get(name) != v:
                    out.append(Finding("template", who, f"spec.volumes[{name}]", f"is {have_vols.get(name)!r}, the "
                                       f"PodTemplate says {v!r}", "build replicas from the PodTemplate"))
            want_caps = set(((t_container.get("securityContext") or {}).get("capabilities") or {}).get("add") or [])
            have_caps = set(((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or [])
            if want_caps - have_caps:
                out.append(Finding("template", who, "containers[pytorch].securityContext.capabilities.add",
                                   f"lacks {sorted(want_caps - have_caps)} (multi-node NCCL falls back to sockets)",
                                   "build replicas from the PodTemplate"))
            t_res = t_container.get("resources") or {}
            for key in ("requests", "limits"):
                for res, q in (t_res.get(key) or {}).items():
                    if str(((c.get("resources") or {}).get(key) or {}).get(res)) != str(q) and res != "nvidia.com/gpu":
                        out.append(Finding("template", who, f"containers[pytorch].resources.{key}[{res}]",
                                           f"is {((c.get('resources') or {}).get(key) or {}).get(res)!r}, the "
                                           f"PodTemplate says {q!r}", "build replicas from the PodTemplate"))
            if uses_gpus(pj.recipe):
                want = GPU_PRODUCTS.get(pj.recipe.hardware.gpu, pj.recipe.hardware.gpu)
                have = (spec.get("nodeSelector") or {}).get(GPU_PRODUCT_LABEL)
                if have and have != want:
                    out.append(Finding("template", who, f"spec.nodeSelector[{GPU_PRODUCT_LABEL}]",
                                       f"selects {have} nodes, but recipe {plan.recipe_id} runs on "
                                       f"{pj.recipe.hardware.gpu} ({want})", f"use an overlay for {want} nodes, or "
                                       f"--set hardware.gpu=<the overlay's GPU> (and check the batch arithmetic)"))
                per_pod = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
                if str(per_pod) != str(pj.recipe.hardware.procs_per_node):
                    out.append(Finding("template", who, "containers[pytorch].resources.limits[nvidia.com/gpu]",
                                       f"is {per_pod!r}, the job runs {pj.recipe.hardware.procs_per_node} ranks per "
                                       "pod", "let the launcher set the GPU count per pod"))
        labels = (pj.manifest.get("metadata") or {}).get("labels") or {}
        for _role, pod in replicas(pj):
            if QUEUE_LABEL in ((pod.get("metadata") or {}).get("labels") or {}) and QUEUE_LABEL not in labels:
                out.append(Finding("template", _job_ref(pj.manifest), f"metadata.labels[{QUEUE_LABEL}]",
                                   "is on the pods only; Kueue reads it from the job's own metadata",
                                   "set it on the PyTorchJob (--param kueue_queue=...)"))
                break
    return out


def check_images(plan: Plan, objects: Objects, template: dict[str, Any] | None,
                 components_image: str | None = None, trainer_image: str | None = None) -> list[Finding]:
    """GPU work runs in the CUDA trainer image; the run's images are the ones given (the ones you built),
    else the ones the overlay deploys; all pinned."""
    out = []
    trainer = str(plan.params.get("image") or "")
    components = {t.image for t in plan.tasks}
    for t in plan.tasks:
        if t.gpus and t.image != trainer:
            out.append(Finding("gpu-image", f"pipeline task {t.executor}", "container.resources.accelerator",
                               f"requests {t.gpus} GPU but runs in {t.image}, the CPU-only components image "
                               "(images/components/Dockerfile has no CUDA): it computes on CPU while holding the GPU",
                               "run the GPU work as a job in the trainer image (vfm.pipeline.steps.evaluate) and "
                               "request no GPU for the step"))
        if components_image and t.image != components_image:
            out.append(Finding("images", f"pipeline task {t.executor}", "container.image", f"runs {t.image}, not the "
                               f"components image you built ({components_image})", "vfm pipeline compile "
                               f"{plan.recipe_id} --components-image {components_image}"))
    for pj in plan.jobs:
        for role, pod in replicas(pj):
            c = trainer_container(pod)
            gpus = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
            if gpus and c.get("image") in components:
                out.append(Finding("gpu-image", _job_ref(pj.manifest, role), "containers[pytorch].image",
                                   f"runs the components image {c.get('image')} on GPUs", "pass the trainer image "
                                   "(--param image=<registry>/vfm-trainer:<tag>)"))
    t_image = trainer_image or trainer_container(template or {}).get("image")
    if t_image and t_image != trainer:
        out.append(Finding("images", "pipeline parameter image", "defaultValue", f"is {trainer}, but "
                           + (f"you built {t_image}" if trainer_image else f"the overlay deploys the trainer image {t_image}"), f"vfm pipeline compile {plan.recipe_id} "
                           f"--trainer-image {t_image} (or pass --param image={t_image} at submit)"))
    for image in sorted(components | {trainer}):
        tag = image.rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
            out.append(Finding("images", f"image {image}", "tag", "is not pinned; pods on different nodes may run "
                               "different code", "build and compile with a version tag or a digest"))
    return out


def check_pods(plan: Plan, objects: Objects) -> list[Finding]:
    """Loader workers fit the CPU request, /dev/shm holds what they have in flight, the grace period covers
    the checkpoint window, and every pod passes the namespace's Pod Security level."""
    from vfm.data.loader import PREFETCH_FACTOR
    from vfm.launch.job import RANK_CORES, cpu_request, uses_gpus
    from vfm.train.torchrun import SHUTDOWN_TIMEOUT_S

    out = []
    for pj in plan.jobs:
        job = pj.manifest
        procs = pj.procs_per_pod
        for role, pod in replicas(pj):
            who, spec, c = _job_ref(job, role), pod.get("spec") or {}, trainer_container(pod)
            args = [str(a) for a in c.get("args") or []]
            workers = int(_arg(args, "--workers") or 0)
            gpu = uses_gpus(pj.recipe)
            if gpu and workers == 0:
                out.append(Finding("workers", who, "containers[pytorch].args", "passes no --workers: every rank "
                                   "decodes and augments in its own thread (the loader's default is 0 workers)",
                                   "pass --workers (vfm.launch.job.loader_workers derives it from the CPU request)"))
            cpu = ((c.get("resources") or {}).get("requests") or {}).get("cpu")
            if gpu and cpu is not None and procs * (workers + RANK_CORES) > cpu_request(cpu):
                out.append(Finding("workers", who, "containers[pytorch].resources.requests.cpu",
                                   f"{cpu} cores for {procs} ranks × ({workers} workers + {RANK_CORES})",
                                   f"request ≥ {procs * (workers + RANK_CORES)} cores or set data.workers lower"))
            mount = next((m for m in c.get("volumeMounts") or [] if m.get("mountPath") == SHM_MOUNT), None)
            shm = next((v for v in spec.get("volumes") or [] if mount and v.get("name") == mount.get("name")), None)
            need = procs * workers * PREFETCH_FACTOR * _batch_bytes(pj, args)
            if workers and (shm is None or (shm.get("emptyDir") or {}).get("medium") != "Memory"):
                out.append(Finding("shm", who, "spec.volumes", f"no memory-backed emptyDir at {SHM_MOUNT}: the runtime's "
                                   "64 MiB default starves the loader workers", "mount one (the PodTemplate's dshm)"))
            elif workers and shm is not None:
                size = (shm.get("emptyDir") or {}).get("sizeLimit")
                if size is None or quantity_bytes(size) < need:
                    out.append(Finding("shm", who, f"spec.volumes[{shm['name']}].emptyDir.sizeLimit",
                                       f"{size} < {_gib(need)} in flight ({procs} ranks × {workers} workers × "
                                       f"{PREFETCH_FACTOR} prefetched batches)", f"raise it to ≥ {_gib(need * 1.25)} "
                                       "in the overlay's PodTemplate patch"))
                mem = ((c.get("resources") or {}).get("limits") or {}).get("memory")
                if size is not None and mem is not None and quantity_bytes(size) > quantity_bytes(mem):
                    out.append(Finding("shm", who, f"spec.volumes[{shm['name']}].emptyDir.sizeLimit",
                                       f"{size} exceeds the memory limit {mem} it is charged against",
                                       "raise the memory limit or lower the sizeLimit"))
            grace = int(spec.get("terminationGracePeriodSeconds") or 30)
            if grace < SHUTDOWN_TIMEOUT_S + GRACE_MARGIN_S:
                out.append(Finding("grace", who, "spec.terminationGracePeriodSeconds", f"{grace} s; ranks take up to "
                                   f"{SHUTDOWN_TIMEOUT_S} s to checkpoint after SIGTERM, so a preempted pod is killed "
                                   "mid-save", f"set ≥ {SHUTDOWN_TIMEOUT_S + GRACE_MARGIN_S} s"))
        out += _policy(pj, objects)
    return out


def _batch_bytes(pj: PlannedJob, args: list[str]) -> float:
    """Bytes of one batch a loader worker hands over (float32 CHW images; DINOv2: all its crops)."""
    stage = pj.recipe.stage(pj.stage)
    batch = int(_arg(args, "--batch-size") or stage.batch.micro_batch)
    mc = stage.data.multicrop
    pixels = (mc.global_crops_count * mc.global_crops_size ** 2 + mc.local_crops_count * mc.local_crops_size ** 2
              if mc is not None and _arg(args, "--batch-size") is None else stage.data.resolution ** 2)
    return batch * 3 * pixels * 4


def _policy(pj: PlannedJob, objects: Objects) -> list[Finding]:
    job = pj.manifest
    ns = (job.get("metadata") or {}).get("namespace") or ""
    namespace = objects.get("Namespace", None, ns) or {}
    enforce = ((namespace.get("metadata") or {}).get("labels") or {}).get(ENFORCE_LABEL, "privileged")
    exempt = enforce == "privileged" and objects.get("ValidatingAdmissionPolicy", None, VAP_NAME) is not None
    if enforce != "restricted" and not exempt:
        return [Finding("policy", f"Namespace {ns}", f"metadata.labels[{ENFORCE_LABEL}]", f"is {enforce!r}: nothing "
                        "holds the training pods to `restricted`", "label the namespace restricted "
                        "(manifests/base/namespace.yaml), or add components/rdma-exemption for IPC_LOCK")]
    # the pods as the API server admits them (a TrainJob's come from its runtime and patches)
    pods = {"kind": job.get("kind"), "metadata": job.get("metadata"), "spec": {
        role: {"template": pod} for role, pod in replicas(pj)}}
    found = restricted_violations(pods, {"IPC_LOCK"} if exempt else set())
    fix = ("fix the PodTemplate (manifests/base/trainer-podtemplate.yaml)" if not exempt else
           "only IPC_LOCK is exempt (components/rdma-exemption); fix the PodTemplate")
    return [Finding("policy", _job_ref(job), v.split(": ", 1)[0].split(" ", 1)[-1], v.split(": ", 1)[-1],
                    fix if "capabilities.add" not in v or exempt else "NCCL over InfiniBand needs IPC_LOCK: include "
                    "manifests/components/rdma-exemption in the overlay") for v in found]


def check_queue(plan: Plan, objects: Objects) -> list[Finding]:
    """A queued job fits its ClusterQueue's quota and every resource it asks for is covered, else Kueue
    never admits it."""
    from vfm.launch.job import QUEUE_LABEL

    out = []
    for pj in plan.jobs:
        meta = pj.manifest.get("metadata") or {}
        lq = objects.get("LocalQueue", meta.get("namespace"), (meta.get("labels") or {}).get(QUEUE_LABEL, ""))
        if lq is None:
            continue
        cq_name = (lq.get("spec") or {}).get("clusterQueue", "")
        cq = objects.get("ClusterQueue", None, cq_name)
        if cq is None:
            out.append(Finding("queue", f"LocalQueue {meta.get('namespace')}/{lq['metadata']['name']}",
                               "spec.clusterQueue", f"ClusterQueue {cq_name} does not exist", "define it"))
            continue
        total: dict[str, float] = {}
        for _role, pod, n in pj.replicas:
            for res, q in (((trainer_container(pod).get("resources") or {}).get("requests")) or {}).items():
                total[res] = total.get(res, 0.0) + n * _amount(res, q)
        quota: dict[str, float] = {}
        covered: set[str] = set()
        for group in (cq.get("spec") or {}).get("resourceGroups") or []:
            covered |= set(group.get("coveredResources") or [])
            for flavor in group.get("flavors") or []:
                for r in flavor.get("resources") or []:
                    quota[r["name"]] = quota.get(r["name"], 0.0) + _amount(r["name"], r.get("nominalQuota", 0))
        for res, need in sorted(total.items()):
            if res not in covered:
                out.append(Finding("queue", f"ClusterQueue {cq_name}", "spec.resourceGroups[].coveredResources",
                                   f"does not cover {res}, which {_job_ref(pj.manifest)} requests", f"add {res}"))
            elif need > quota.get(res, 0.0):
                out.append(Finding("queue", f"ClusterQueue {cq_name}", f"nominalQuota[{res}]",
                                   f"{_show(res, quota.get(res, 0.0))} < {_show(res, need)} that {_job_ref(pj.manifest)} ({pj.what}) asks "
                                   "for at once", "raise the quota to the cluster's capacity, or run the recipe on "
                                   "fewer GPUs (--set hardware.gpus=...)"))
    return out


def _show(resource: str, amount: float) -> str:
    return _gib(amount) if resource == "memory" else f"{amount:g}"


def _amount(resource: str, q: Any) -> float:
    from vfm.launch.job import cpu_request

    return cpu_request(q) if resource == "cpu" else quantity_bytes(q)


OFFLINE_CHECKS = ("refs", "rbac", "template", "gpu-image", "images", "workers", "shm", "grace", "policy", "queue")


def check_offline(plan: Plan, objects: Objects, template: dict[str, Any] | None,
                  components_image: str | None = None, trainer_image: str | None = None) -> list[Finding]:
    return (check_references(plan, objects) + check_rbac(plan, objects) + check_template(plan, objects, template)
            + check_images(plan, objects, template, components_image, trainer_image) + check_pods(plan, objects)
            + check_queue(plan, objects))


def offline_plan(recipe_id: str, overlay: Path, *, package: Path | None = None, params: dict[str, Any] | None = None,
                 kfp_namespace: str = "kubeflow", runner: str = "vfm-pipeline-runner",
                 byo: Iterable[dict[str, Any]] = (), manifests_root: Path | None = None,
                 ) -> tuple[Plan, Objects, dict[str, Any] | None]:
    """Render `overlay`, compile (or load) the pipeline, build the jobs: what the checks run on."""
    from vfm.deploy.render import render
    from vfm.pipeline.dag import compile_pipeline

    root = manifests_root or overlay.resolve().parents[1]
    objects = Objects(render(overlay), [*byo_declarations(root / "secrets" / "vfm-secrets.yaml.example"), *byo])
    if package is None:
        with tempfile.TemporaryDirectory() as tmp:
            pkg = Package.load(compile_pipeline(recipe_id, Path(tmp) / f"{recipe_id}.yaml"))
    else:
        pkg = Package.load(package)
    values = {**pkg.defaults(), **(params or {})}
    template = pod_template_of(objects, str(values.get("namespace") or kfp_namespace))
    plan = Plan(recipe_id, values, pkg.tasks(values), kfp_namespace=kfp_namespace, runner=runner)
    plan.jobs = build_jobs(recipe_id, values, template, kfp_namespace, runtime_of(objects))
    return plan, objects, template


# --- live checks (--context) --------------------------------------------------------------------
# launcher → (its CRD, the Deployment that runs its jobs, the install that provides both)
OPERATORS = {
    "pytorchjob": ("pytorchjobs.kubeflow.org", ("kubeflow", "training-operator"),  # kubeflow/training-operator v1.9
                   "manifests/platform/training-operator", "PyTorchJobs"),
    "trainjob": ("trainjobs.trainer.kubeflow.org", ("kubeflow-system", "kubeflow-trainer-controller-manager"),
                 "manifests/platform/trainer-v2", "TrainJobs"),  # kubeflow/trainer v2.3 manifests/base/manager
    # ray-project/kuberay v1.7.0 ray-operator/config/manager/manager.yaml, moved to ray-system
    "rayjob": ("rayjobs.ray.io", ("ray-system", "kuberay-operator"), "manifests/platform/kuberay", "RayJobs"),
}


def check_live(plan: Plan, api: Any, *, mlflow_uri: str | None = None, s3_endpoint: str | None = None,
               timeout_s: float = 10) -> list[Finding]:
    """The plan against a cluster (`api`: a kubernetes ApiClient): the operator, GPU nodes, the runner's
    permissions, Secrets, the raw-data PVC, the PodTemplate, then MLflow and the S3 buckets."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from vfm.launch.cluster import LAUNCHER_PERMISSIONS
    from vfm.launch.job import GPU_PRODUCT_LABEL, GPU_RESOURCE, POD_TEMPLATE
    from vfm.launch.rayjob import RAY_POD_TEMPLATE

    core, out = k8s.CoreV1Api(api), []

    def read(what: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args, _request_timeout=timeout_s)
        except ApiException as exc:
            if exc.status == 404:
                return None
            reason = "forbidden to you (kubectl's user)" if exc.status == 403 else f"{exc.status} {exc.reason}"
            out.append(Finding("live", what, "read", f"the API server answered {reason}", "run preflight as a user "
                               "who may read it (kubectl auth can-i get ...)"))
            return False

    for kind in plan.job_kinds:
        crd_name, (op_ns, op_name), install, jobs = OPERATORS[kind]
        crd = read(f"CustomResourceDefinition {crd_name}",
                   k8s.ApiextensionsV1Api(api).read_custom_resource_definition, crd_name)
        if crd is None:
            out.append(Finding("live", f"CustomResourceDefinition {crd_name}", "metadata.name", "is not installed",
                               f"kubectl apply --server-side -k {install}"))
        op = read(f"Deployment {op_ns}/{op_name}", k8s.AppsV1Api(api).read_namespaced_deployment, op_name, op_ns)
        if op is None or (op and not (op.status.available_replicas or 0)):
            out.append(Finding("live", f"Deployment {op_ns}/{op_name}", "status.availableReplicas",
                               f"the {jobs[:-1]} controller is not running: {jobs} are accepted but never start",
                               f"kubectl apply --server-side -k {install}; then kubectl -n {op_ns} get pods"))
    if plan.launcher == "trainjob":
        from vfm.launch import trainjob as tj

        runtime = read(f"{tj.RUNTIME_KIND} {tj.RUNTIME}", k8s.CustomObjectsApi(api).get_cluster_custom_object,
                       tj.GROUP, tj.VERSION, "clustertrainingruntimes", tj.RUNTIME)
        if runtime is None:
            out.append(Finding("live", f"{tj.RUNTIME_KIND} {tj.RUNTIME}", "metadata.name", "does not exist: every "
                               "TrainJob names it", "kubectl apply -k manifests/overlays/h100-trainer-v2 (or an "
                               "overlay with manifests/components/trainer-v2)"))
    nodes = read("nodes", core.list_node)
    if nodes is None or (nodes and not nodes.items):
        out.append(Finding("live", "nodes", "items", "the cluster lists no nodes", "check the kubeconfig context"))
    for pj in plan.jobs:
        for role, pod, count in pj.replicas:
            limits = (trainer_container(pod).get("resources") or {}).get("limits") or {}
            if GPU_RESOURCE not in limits or not nodes:
                continue
            want = int(limits[GPU_RESOURCE])
            selector = (pod.get("spec") or {}).get("nodeSelector") or {}
            fit = [n for n in nodes.items if all((n.metadata.labels or {}).get(k) == v for k, v in selector.items())
                   and int((n.status.allocatable or {}).get(GPU_RESOURCE, 0)) >= want]
            if len(fit) < count:
                out.append(Finding("live", _job_ref(pj.manifest, role), "spec.nodeSelector", f"{len(fit)} node(s) "
                                   f"match {selector or 'any'} with ≥ {want} allocatable {GPU_RESOURCE}; the replica "
                                   f"needs {count}", f"check the nodes' {GPU_PRODUCT_LABEL} label and the GPU device "
                                   "plugin (kubectl describe node), or use an overlay for this cluster's GPUs"))
    user = SA_USER.format(namespace=plan.kfp_namespace, name=plan.runner)
    authz = k8s.AuthorizationV1Api(api)
    permissions = list(dict.fromkeys(p for kind in plan.job_kinds for p in LAUNCHER_PERMISSIONS[kind]))
    templates = [POD_TEMPLATE] + ([RAY_POD_TEMPLATE] if "rayjob" in plan.job_kinds else [])
    for ns in sorted({pj.manifest["metadata"]["namespace"] for pj in plan.jobs}):
        for group, resource, verb, name in permissions:
            res, _, sub = resource.partition("/")
            review = k8s.V1SubjectAccessReview(spec=k8s.V1SubjectAccessReviewSpec(
                user=user, groups=["system:serviceaccounts", f"system:serviceaccounts:{plan.kfp_namespace}"],
                resource_attributes=k8s.V1ResourceAttributes(namespace=ns, verb=verb, group=group, resource=res,
                                                             subresource=sub or None, name=name)))
            try:
                allowed_ = authz.create_subject_access_review(review, _request_timeout=timeout_s).status.allowed
            except ApiException as exc:
                out.append(Finding("live", "SubjectAccessReview", "create", f"{exc.status} {exc.reason}",
                                   "run preflight as a user who may create subjectaccessreviews"))
                break
            if not allowed_:
                out.append(Finding("live", f"ServiceAccount {plan.kfp_namespace}/{plan.runner}", f"namespace {ns}",
                                   f"may not {verb} {resource} ({group or 'core'}) (kubectl auth can-i {verb} "
                                   f"{resource} -n {ns} --as {user})", "kubectl apply -k manifests/overlays/<overlay> "
                                   "(manifests/base/rbac.yaml)"))
        for template in templates:
            if read(f"PodTemplate {ns}/{template}", core.read_namespaced_pod_template, template, ns) is None:
                out.append(Finding("live", f"PodTemplate {ns}/{template}", "metadata.name", "does not exist",
                                   "apply the overlay (or let Argo CD sync it)"))
    wanted: dict[tuple[str, str], set[str]] = {}
    for t in plan.tasks:
        for name, keys, optional in t.secrets:
            if name and not optional:
                wanted.setdefault((plan.kfp_namespace, name), set()).update(keys)
    if plan.params.get("credentials_secret"):
        from vfm.pipeline.config import REQUIRED_SECRET_KEYS

        for pj in plan.jobs:
            wanted.setdefault((pj.manifest["metadata"]["namespace"], str(plan.params["credentials_secret"])),
                              set()).update(REQUIRED_SECRET_KEYS)
    for (ns, name), keys in sorted(wanted.items()):
        secret = read(f"Secret {ns}/{name}", core.read_namespaced_secret, name, ns)
        if secret is None:
            out.append(Finding("live", f"Secret {ns}/{name}", "metadata.name", "does not exist", "create it from "
                               "manifests/secrets/vfm-secrets.yaml.example (manifests/secrets/README.md)"))
        elif secret:
            missing = sorted(keys - set(secret.data or {}))
            if missing:
                out.append(Finding("live", f"Secret {ns}/{name}", "data", f"lacks {', '.join(missing)}",
                                   "add the keys (manifests/secrets/README.md)"))
    for pvc_name in sorted({p for t in plan.tasks for p in t.pvcs if p}):
        pvc = read(f"PersistentVolumeClaim {plan.kfp_namespace}/{pvc_name}",
                   core.read_namespaced_persistent_volume_claim, pvc_name, plan.kfp_namespace)
        if pvc is None or (pvc and pvc.status.phase != "Bound"):
            phase = "does not exist" if pvc is None else f"is {pvc.status.phase}, not Bound"
            out.append(Finding("live", f"PersistentVolumeClaim {plan.kfp_namespace}/{pvc_name}", "status.phase", phase,
                               "check its storage class and provisioner (kubectl describe pvc -n "
                               f"{plan.kfp_namespace} {pvc_name})"))
    out += _check_mlflow(mlflow_uri or str(plan.params.get("mlflow_uri") or ""), timeout_s)
    out += _check_buckets(plan, s3_endpoint if s3_endpoint is not None else str(plan.params.get("s3_endpoint") or ""))
    return out


def _check_mlflow(uri: str, timeout_s: float) -> list[Finding]:
    import urllib.request

    if not uri:
        return [Finding("live", "pipeline parameter mlflow_uri", "defaultValue", "is empty", "pass --param mlflow_uri=...")]
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status == 200:
                return []
            problem = f"answered {resp.status} on /health"
    except Exception as exc:  # every way of not answering is the same finding
        problem = f"does not answer ({exc})"
    return [Finding("live", f"MLflow {uri}", "/health", problem, "an in-cluster URI is only reachable from the "
                    "cluster: kubectl -n vfm port-forward svc/mlflow 5000 and pass --mlflow-uri http://127.0.0.1:5000")]


def _check_buckets(plan: Plan, endpoint: str) -> list[Finding]:
    from vfm import storage

    out = []
    for param in ("data_prefix", "runs_prefix"):
        url = str(plan.params.get(param) or "")
        if not url.startswith("s3://"):
            continue
        bucket = url[5:].split("/", 1)[0]
        try:
            storage.s3_client(endpoint or None, max_attempts=2).head_bucket(Bucket=bucket)
        except Exception as exc:  # credentials, DNS, 403 and 404 all stop the run the same way
            out.append(Finding("live", f"S3 bucket {bucket}", f"pipeline parameter {param}", f"is not reachable: {exc}",
                               "check AWS_* in this shell and --s3-endpoint; create the bucket"))
    return out
