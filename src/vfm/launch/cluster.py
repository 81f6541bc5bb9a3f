"""Run a PyTorchJob, a Trainer v2 TrainJob or a KubeRay RayJob on a cluster and turn its outcome into the
step's outcome.

    ClusterBackend.from_environment().run(manifest, timeout_s=..., max_restarts=3)

create → wait with a real deadline (while streaming the master's / node 0's / the Ray driver's log into
this process's stdout) → `Succeeded` (PyTorchJob) or `Complete` (TrainJob; RayJob with its Ray job
SUCCEEDED) returns; `Failed`, a deadline, more restarts than the cap, or the job vanishing raise
`JobFailed`/`JobTimeout` with the job's own reason. Any exit other than success (including SIGTERM
from a cancelled KFP run) deletes the job, so no GPU pod outlives its pipeline step.

PyTorchJobs and TrainJobs report through status conditions; a RayJob has none but two status fields,
`jobDeploymentStatus` (the RayJob's lifecycle) and `jobStatus` (the Ray job's, as Ray reports it), plus
`reason` / `message` (ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go, v1.7.0).

This talks to the API server with the plain `kubernetes` client rather than `TrainingClient`: the
latter folds every API error into a `RuntimeError` string, and the launcher must tell "already exists"
(a retried step adopting its earlier job) and "not found" (deleted under us) apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from vfm.errors import UserError
from vfm.launch import rayjob as rj
from vfm.launch import trainjob as tj
from vfm.launch.job import CONTAINER, GROUP, PLURAL, POD_TEMPLATE, RUN_LABEL, VERSION
from vfm.launch.result import JobFailed, JobResult, JobTimeout

# RayJob status values (ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go, v1.7.0):
# `JobDeploymentStatus` Initializing, Running, Complete, Failed, ValidationFailed, Suspending, Suspended,
# Retrying, Waiting; `JobStatus` (Ray's own) PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED. The controller
# (ray-operator/controllers/ray/rayjob_controller.go) sets Complete once the Ray job is terminal and the
# submitter has finished — Failed with reason AppFailed when the Ray job FAILED, Complete when it was
# STOPPED — and Failed with its own reason (SubmissionFailed, DeadlineExceeded, ...) otherwise.
RAYJOB_FAILED_DEPLOYMENT = ("Failed", "ValidationFailed")
RAYJOB_FAILED_JOB = ("FAILED", "STOPPED")


@dataclass(frozen=True)
class JobKind:
    """What the launcher needs to know of a job kind: where it lives, how its status reads (conditions, or
    a RayJob's status fields), whose log to follow."""

    kind: str
    group: str
    version: str
    plural: str
    complete: str  # the status condition (RayJob: jobDeploymentStatus) of success
    container: str  # the container whose log is the step's: the trainer's, or the Ray job submitter's
    counts_restarts: bool  # PyTorchJob: a Restarting condition per re-creation; TrainJob: the JobSet counts
    rbac: str = "manifests/base/rbac.yaml"  # where the pipeline runner's permissions for it are granted
    install: str = "manifests/platform/training-operator"  # what installs its CRD and controller
    conditions: bool = True  # False: RayJob status fields instead of conditions
    drain_on_failure: bool = False  # read the log to its end before deleting a failed job (the driver's traceback)

    def log_selector(self, name: str, elastic: bool = False) -> str:
        if self.kind == tj.KIND:  # JobSet's pod labels; node 0 is completion index 0 of the `node` job
            return (f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={tj.NODE},"
                    "batch.kubernetes.io/job-completion-index=0")
        if self.kind == rj.KIND:  # the submitter Job is named like the RayJob; KubeRay labels its pods' origin
            return f"{rj.SUBMITTER_JOB_LABEL}={name},{rj.ORIGIN_CRD_LABEL}={rj.KIND}"
        role = ("training.kubeflow.org/replica-type=worker,training.kubeflow.org/replica-index=0" if elastic
                else "training.kubeflow.org/job-role=master")
        return f"training.kubeflow.org/job-name={name},{role}"

    def succeeded(self, job: dict[str, Any]) -> bool:
        if self.conditions:
            return _last(job, self.complete) is not None
        status = job.get("status") or {}
        return status.get("jobDeploymentStatus") == self.complete and status.get("jobStatus") == "SUCCEEDED"

    def failure(self, job: dict[str, Any]) -> tuple[str, str] | None:
        """(reason, message) when the job failed, else None."""
        if self.conditions:
            failed = _last(job, "Failed")
            return None if failed is None else (failed.get("reason") or "Failed", failed.get("message") or "")
        status = job.get("status") or {}
        deployment, ray_job = status.get("jobDeploymentStatus") or "", status.get("jobStatus") or ""
        if deployment in RAYJOB_FAILED_DEPLOYMENT or ray_job in RAYJOB_FAILED_JOB:
            reason = status.get("reason") or (deployment if deployment in RAYJOB_FAILED_DEPLOYMENT else ray_job)
            message = status.get("message") or f"jobDeploymentStatus {deployment or '-'}, jobStatus {ray_job or '-'}"
            return reason, message
        return None

    def state(self, job: dict[str, Any]) -> str:
        """The job's current state in words (for a timeout)."""
        if self.conditions:
            return (_conditions(job) or [{}])[-1].get("type", "Pending")
        status = job.get("status") or {}
        return (f"jobDeploymentStatus {status.get('jobDeploymentStatus') or 'New'}, "
                f"jobStatus {status.get('jobStatus') or 'PENDING'}")


PYTORCHJOB = JobKind("PyTorchJob", GROUP, VERSION, PLURAL, "Succeeded", CONTAINER, counts_restarts=True)
TRAINJOB = JobKind(tj.KIND, tj.GROUP, tj.VERSION, tj.PLURAL, "Complete", tj.NODE, counts_restarts=False,
                   rbac="manifests/components/trainer-v2/rbac.yaml", install="manifests/platform/trainer-v2")
RAYJOB = JobKind(rj.KIND, rj.GROUP, rj.VERSION, rj.PLURAL, "Complete", rj.SUBMITTER, counts_restarts=False,
                 install="manifests/platform/kuberay", conditions=False, drain_on_failure=True)
KINDS = {k.kind: k for k in (PYTORCHJOB, TRAINJOB, RAYJOB)}


def kind_of(manifest: dict[str, Any]) -> JobKind:
    kind = KINDS.get(manifest.get("kind", ""))
    if kind is None:
        raise ValueError(f"job kind {manifest.get('kind')!r}: the launcher runs {', '.join(KINDS)}")
    return kind

SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
REQUEST_TIMEOUT = 30  # seconds per API call; the *wait* budget is `timeout_s`
# (API group, resource, verb, name) of every call below, in the job's namespace: what the pipeline runner's
# service account must be allowed (manifests/base/rbac.yaml grants it; `vfm preflight` checks it)
_LOG_READS = (("", "pods", "list", None), ("", "pods/log", "get", None))
_READS = (("", "podtemplates", "get", POD_TEMPLATE),) + _LOG_READS
LAUNCHER_PERMISSIONS = {
    "pytorchjob": tuple((GROUP, PLURAL, verb, None) for verb in ("create", "get", "list", "delete")) + _READS,
    # manifests/components/trainer-v2/rbac.yaml; the launcher never reads the (cluster-scoped) runtime
    "trainjob": tuple((tj.GROUP, tj.PLURAL, verb, None) for verb in ("create", "get", "list", "delete")) + _READS,
    # a Ray Data step's RayJob: its pods come from the `vfm-ray` PodTemplate; the log read is the submitter's
    "rayjob": tuple((rj.GROUP, rj.PLURAL, verb, None) for verb in ("create", "get", "list", "delete"))
    + (("", "podtemplates", "get", rj.RAY_POD_TEMPLATE),) + _LOG_READS,
}


def current_namespace(default: str = "default") -> str:
    """The namespace of this pod's service account (a KFP step runs in the pipeline's namespace)."""
    try:
        with open(SA_NAMESPACE) as fh:
            return fh.read().strip() or default
    except OSError:
        return default


def _api_message(exc: ApiException) -> str:
    """The message of the API server's Status in an error's body (else the body's start)."""
    try:
        return str(json.loads(exc.body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return (exc.body or "")[:300]


def _conditions(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])


def _last(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    found = [c for c in _conditions(job) if c.get("type") == kind and c.get("status") == "True"]
    return found[-1] if found else None


@dataclass
class ClusterBackend:
    api: k8s.ApiClient
    poll_s: float = 15.0
    log: Callable[[str], None] = print
    requests: list[str] = field(default_factory=list)

    @classmethod
    def from_environment(cls, **kwargs: Any) -> ClusterBackend:
        """In-cluster service account when running as a pipeline step, else the local kubeconfig."""
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            # the kubernetes package reads KUBECONFIG once at import; read it now
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        return cls(api=k8s.ApiClient(), **kwargs)

    @property
    def _custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api)

    @property
    def _core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api)

    # --- the namespace's pod template --------------------------------------------------------------
    def pod_template(self, namespace: str, name: str = POD_TEMPLATE) -> dict[str, Any]:
        """The `template` of PodTemplate `namespace/name` as K8s JSON (what every replica is built from)."""
        try:
            obj = self._core.read_namespaced_pod_template(name, namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                pods = "the Ray pods" if name == rj.RAY_POD_TEMPLATE else "the training pods"
                raise UserError(f"no PodTemplate {namespace}/{name}: {pods} are built from it; apply "
                                "the overlay (kubectl apply -k manifests/overlays/<overlay>) or let Argo CD sync "
                                "it") from None
            if exc.status == 403:
                raise UserError(f"this step's service account may not read PodTemplate {namespace}/{name}: apply "
                                "manifests/base/rbac.yaml and run the pipeline as vfm-pipeline-runner") from None
            raise
        return self.api.sanitize_for_serialization(obj)["template"]

    # --- job CRUD -------------------------------------------------------------------------------
    def get(self, name: str, namespace: str, kind: JobKind = PYTORCHJOB) -> dict[str, Any] | None:
        try:
            return self._custom.get_namespaced_custom_object(
                kind.group, kind.version, namespace, kind.plural, name, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the job; if a previous attempt of the same step created it, adopt it unless it failed."""
        kind = kind_of(manifest)
        meta = manifest["metadata"]
        name, ns = meta["name"], meta["namespace"]
        try:
            return self._custom.create_namespaced_custom_object(
                kind.group, kind.version, ns, kind.plural, manifest, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 403:  # RBAC: say which permission, where it is granted, and how to check it
                raise JobFailed(name, "CreateFailed", f"API server refused the job: 403 Forbidden: this step's "
                                f"service account may not create {kind.plural} ({kind.group}) in {ns}; grant it "
                                f"create, get, list and delete on {kind.plural} ({kind.rbac}) and check with `vfm "
                                f"preflight`: {_api_message(exc)}", kind=kind.kind) from None
            if exc.status == 404:  # the API server serves no such resource: the CRD is not installed
                raise JobFailed(name, "CreateFailed", f"API server refused the job: 404 Not Found: the cluster has "
                                f"no {kind.plural}.{kind.group} CRD; install it (kubectl apply --server-side -k "
                                f"{kind.install})", kind=kind.kind) from None
            if exc.status != 409:
                raise JobFailed(name, "CreateFailed", f"API server refused the job: {exc.status} {exc.reason}: "
                                f"{(exc.body or '')[:500]}", kind=kind.kind) from None
        existing = self.get(name, ns, kind)
        mine = (existing or {}).get("metadata", {}).get("labels", {}).get(RUN_LABEL)
        if existing is not None and mine == meta.get("labels", {}).get(RUN_LABEL) and kind.failure(existing) is None:
            self.log(f"adopting {kind.kind} {ns}/{name} created by an earlier attempt of this step")
            return existing
        self.log(f"{kind.kind} {ns}/{name} exists from a failed or foreign attempt; replacing it")
        self.delete(name, ns, wait_s=120, kind=kind)
        return self._custom.create_namespaced_custom_object(
            kind.group, kind.version, ns, kind.plural, manifest, _request_timeout=REQUEST_TIMEOUT)

    def delete(self, name: str, namespace: str, wait_s: float = 0.0, kind: JobKind = PYTORCHJOB) -> bool:
        """Delete with foreground propagation (pods go with it); True if it existed."""
        try:
            self._custom.delete_namespaced_custom_object(
                kind.group, kind.version, namespace, kind.plural, name, propagation_policy="Foreground",
                _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        deadline = time.monotonic() + wait_s
        while wait_s and time.monotonic() < deadline and self.get(name, namespace, kind) is not None:
            time.sleep(min(self.poll_s, 2.0))
        return True

    def delete_run_jobs(self, run_label: str, namespace: str) -> list[str]:
        """Delete every job of one pipeline run, of every kind (the exit handler's cleanup); returns their
        names. A kind whose CRD the cluster lacks (404 on the list) has no jobs to delete, nor one the
        runner may not list (403: the run could not have created any)."""
        names = []
        for kind in KINDS.values():
            try:
                found = self._custom.list_namespaced_custom_object(
                    kind.group, kind.version, namespace, kind.plural, label_selector=f"{RUN_LABEL}={run_label}",
                    _request_timeout=REQUEST_TIMEOUT)
            except ApiException as exc:
                if exc.status == 404:  # the cluster has no such CRD
                    continue
                if exc.status == 403:  # RBAC for one launcher only (no manifests/components/trainer-v2)
                    self.log(f"may not list {kind.plural} in {namespace}; no {kind.kind} of this run deleted")
                    continue
                raise
            for item in found.get("items", []):
                self.delete(item["metadata"]["name"], namespace, kind=kind)
                names.append(item["metadata"]["name"])
        return names

    # --- run ------------------------------------------------------------------------------------
    def run(self, manifest: dict[str, Any], *, timeout_s: float, max_restarts: int) -> JobResult:
        kind = kind_of(manifest)
        name, ns = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        start = time.monotonic()
        succeeded = False
        with _sigterm_raises():
            self.create(manifest)
            self.log(f"created {kind.kind} {ns}/{name}; waiting up to {timeout_s / 3600:.2f} h")
            streamer = _LogStreamer(self, name, ns, kind, elastic="elasticPolicy" in manifest.get("spec", {}))
            streamer.start()
            try:
                restarts = self._wait(kind, name, ns, start + timeout_s, timeout_s, max_restarts)
                succeeded = True
                return JobResult(name=name, state=kind.complete, restarts=restarts if kind.counts_restarts else None,
                                 seconds=time.monotonic() - start)
            except JobFailed as exc:
                # a RayJob's driver log ends with the traceback: read it to the end before the pods go
                if kind.drain_on_failure and exc.reason not in ("Cancelled", "Deleted"):
                    streamer.stop(drain=True)
                raise
            finally:
                if not succeeded:
                    self.log(f"deleting {kind.kind} {ns}/{name}")
                    try:
                        self.delete(name, ns, kind=kind)
                    except Exception as exc:  # report it, but the step's own error is the one to raise
                        self.log(f"could not delete {kind.kind} {ns}/{name}: {exc}; delete it by hand")
                streamer.stop(drain=succeeded)

    def _wait(self, kind: JobKind, name: str, ns: str, deadline: float, timeout_s: float, max_restarts: int) -> int:
        seen_restarts: set[str] = set()
        while True:
            job = self.get(name, ns, kind)
            if job is None:
                raise JobFailed(name, "Deleted", f"the {kind.kind} was deleted before it finished", kind=kind.kind)
            if kind.succeeded(job):
                self.log(f"{kind.kind} {ns}/{name} {kind.complete}")
                return len(seen_restarts)
            if failed := kind.failure(job):
                raise JobFailed(name, *failed, kind=kind.kind)
            for cond in _conditions(job) if kind.counts_restarts else ():  # each Restarting: one pod re-creation
                if cond.get("type") == "Restarting":
                    seen_restarts.add(str(cond.get("lastTransitionTime") or cond.get("lastUpdateTime")))
            if len(seen_restarts) > max_restarts:
                raise JobFailed(name, "RestartCapExceeded",
                                f"restarted {len(seen_restarts)} times, more than the cap of {max_restarts}",
                                kind=kind.kind)
            if time.monotonic() >= deadline:
                what = "last condition" if kind.conditions else "last status"
                raise JobTimeout(name, f"not finished after {timeout_s:.0f} s ({what}: {kind.state(job)})",
                                 kind=kind.kind)
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))


class _LogStreamer(threading.Thread):
    """Follows the master pod's log (worker-0 for elastic jobs, node 0 of a TrainJob), across pod
    re-creations."""

    def __init__(self, backend: ClusterBackend, name: str, namespace: str, kind: JobKind, elastic: bool):
        super().__init__(daemon=True, name=f"logs-{name}")
        self.backend, self.name_, self.ns, self.container = backend, name, namespace, kind.container
        self.selector = kind.log_selector(name, elastic)
        self._done = threading.Event()
        self._drain = False
        self._streamed: set[str] = set()

    def stop(self, drain: bool) -> None:
        """`drain`: the job finished, so read what its pods logged to the end (bounded by the join)."""
        self._drain = drain
        self._done.set()
        self.join(timeout=30 if drain else 5)

    def run(self) -> None:
        while True:
            finishing = self._done.is_set()
            try:
                pod = self._ready_pod()
                if pod is not None:
                    self._follow(pod)
                    continue
            except Exception as exc:  # logs are best effort; the job's status decides the step
                self.backend.log(f"(log stream interrupted: {exc})")
            if finishing:
                return
            self._done.wait(min(self.backend.poll_s, 5.0))

    def _ready_pod(self) -> Any:
        pods = self.backend._core.list_namespaced_pod(self.ns, label_selector=self.selector,
                                                      _request_timeout=REQUEST_TIMEOUT)
        for pod in pods.items:
            if pod.metadata.uid not in self._streamed and pod.status.phase in ("Running", "Succeeded", "Failed"):
                return pod
        return None

    def _follow(self, pod: Any) -> None:
        self._streamed.add(pod.metadata.uid)
        resp = self.backend._core.read_namespaced_pod_log(
            pod.metadata.name, self.ns, container=self.container, follow=True, _preload_content=False)
        try:
            for line in _lines(resp):
                self.backend.log(f"[{pod.metadata.name}] {line}")
                if self._done.is_set() and not self._drain:
                    break
        finally:
            resp.release_conn()


def _lines(resp: Any) -> Iterator[str]:
    buf = b""
    for chunk in resp.stream(4096):
        buf += chunk
        *done, buf = buf.split(b"\n")
        for line in done:
            yield line.decode(errors="replace")
    if buf:
        yield buf.decode(errors="replace")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """KFP cancels a run by deleting the step's pod (SIGTERM): turn that into an exception so the
    `finally` that deletes the job runs. Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise JobFailed("", "Cancelled", f"launcher received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def kube_configuration(host: str) -> k8s.Configuration:
    """A client configuration for an explicit API server URL (tests, port-forwards)."""
    cfg = k8s.Configuration()
    cfg.host = host
    return cfg
