"""A small fake Kubernetes API on loopback: the endpoints the launcher uses, scripted job timelines.

Each GET of a PyTorchJob, TrainJob or RayJob advances its scripted timeline by one step (the last step
repeats); when a PyTorchJob's step includes Running, its master pod appears with its log; a TrainJob's
node 0 pod (JobSet's labels, `<job>-node-0-0`) appears once the TrainJob is no longer suspended. A RayJob
has no conditions: its timeline's steps are `status` dicts (`jobDeploymentStatus`, `jobStatus`, `reason`,
`message`, as KubeRay writes them), and its submitter Job's pod (`submitter_pod(name)`, with the labels the
Job controller and KubeRay give it) appears once `jobDeploymentStatus` is Running. Every request is recorded so
tests can assert what the launcher did (created, polled, deleted). A request whose path is in `forbidden`
is refused 403 as RBAC would, with the API server's Status.

For `vfm preflight --context`, any other object is served from `objects` by its API path (GET of the
path; GET of its collection lists it; 404 Status otherwise), and SubjectAccessReviews are answered from
`grants`, as the API server's authorizer would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

JOB_PATH = re.compile(r"^/apis/(kubeflow\.org/v1|trainer\.kubeflow\.org/v1alpha1|ray\.io/v1)/namespaces/([^/]+)/"
                      r"(pytorchjobs|trainjobs|rayjobs)(?:/([^/]+))?$")
# the API group/version each job plural is served under
JOB_API = {"pytorchjobs": "kubeflow.org/v1", "trainjobs": "trainer.kubeflow.org/v1alpha1", "rayjobs": "ray.io/v1"}
SAR = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
PODS = "/api/v1/namespaces/"


def submitter_pod(rayjob: str) -> str:
    """The name of a RayJob's submitter pod: the Job controller names a Job's pods `<job>-<5 characters>`,
    and KubeRay names the submitter Job like the RayJob."""
    return f"{rayjob}-{hashlib.sha256(rayjob.encode()).hexdigest()[:5]}"


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A metav1.Status as the API server answers an error."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def _forbidden(method: str, path: str) -> dict:
    m = JOB_PATH.match(path)
    verb = {"POST": "create", "DELETE": "delete"}.get(method, "get" if m and m.group(4) else "list")
    if not m:
        return _status(403, "Forbidden", f"forbidden: cannot {verb} {path}")
    group, ns, plural, name = m.group(1).split("/")[0], m.group(2), m.group(3), m.group(4)
    what = f'{plural}.{group} "{name}"' if name else f"{plural}.{group}"
    return _status(403, "Forbidden", f'{what} is forbidden: User "system:serviceaccount:kubeflow:vfm-pipeline-runner" '
                   f'cannot {verb} resource "{plural}" in API group "{group}" in the namespace "{ns}"',
                   {"name": name or "", "group": group, "kind": plural})


# the API server's answer for a resource it does not serve (no such CRD)
UNSERVED = _status(404, "NotFound", "the server could not find the requested resource")


def _not_found(plural: str, group: str, name: str) -> dict:
    return _status(404, "NotFound", f'{plural}.{group} "{name}" not found',
                   {"name": name, "group": group, "kind": plural})


def cond(kind: str, status: str = "True", reason: str = "", message: str = "", t: str = "2026-01-01T00:00:00Z"):
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": t}


class FakeK8s:
    def __init__(self):
        self.jobs: dict[tuple[str, str], dict] = {}
        self.timelines: dict[str, list[list[dict]]] = {}
        self.default_timeline: list[list[dict]] = [[cond("Created")]]
        self.default_rayjob_timeline: list[dict] = [{"jobDeploymentStatus": "Initializing"}]
        self.pods: dict[tuple[str, str], dict] = {}
        self.logs: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.pod_templates: dict[tuple[str, str], dict] = {}
        self.forbidden: set[str] = set()
        """Request paths answered 403 Forbidden (RBAC refuses the caller)."""
        self.unserved: set[str] = set()
        """Job plurals (e.g. rayjobs) whose CRD the cluster lacks: 404 for every request under them."""
        self.objects: dict[str, dict] = {}
        """Other objects by API path, e.g. /api/v1/namespaces/vfm/secrets/vfm-credentials."""
        self.grants: set[tuple[str, str, str, str, str, str | None]] = set()
        """(user, namespace, verb, group, resource[/subresource], name or None = any) a SubjectAccessReview allows."""
        self.reviews: list[dict] = []
        self._gets: dict[str, int] = {}
        self.lock = threading.Lock()

    def review(self, body: dict) -> dict:
        spec = body.get("spec") or {}
        attrs = spec.get("resourceAttributes") or {}
        resource = attrs.get("resource", "") + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        self.reviews.append(spec)
        ok = any(g[:5] == (spec.get("user"), attrs.get("namespace"), attrs.get("verb"), attrs.get("group", ""), resource)
                 and g[5] in (None, attrs.get("name")) for g in self.grants)
        return {"allowed": ok} if ok else {"allowed": False, "reason": "no RBAC policy matched"}

    def status_of(self, ns: str, name: str) -> dict:
        kind = self.jobs[(ns, name)].get("kind")
        timeline = self.timelines.get(name, self.default_rayjob_timeline if kind == "RayJob" else self.default_timeline)
        i = min(self._gets.get(name, 0), len(timeline) - 1)
        self._gets[name] = self._gets.get(name, 0) + 1
        if kind == "RayJob":
            return self._rayjob_status(ns, name, dict(timeline[i]))
        conditions = timeline[i]
        if kind == "TrainJob":
            if conditions and not any(c["type"] == "Suspended" and c["status"] == "True" for c in conditions):
                pod = f"{name}-node-0-0"
                done = any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conditions)
                self.pods.setdefault((ns, pod), {
                    "metadata": {"name": pod, "namespace": ns, "uid": str(uuid.uuid4()), "labels": {
                        "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-completion-index": "0"}},
                    "status": {"phase": "Succeeded" if done else "Running"}})
            return {"conditions": conditions}
        if any(c["type"] in ("Running", "Succeeded", "Failed") for c in conditions):
            pod = f"{name}-master-0"
            phase = "Running" if conditions[-1]["type"] == "Running" else "Succeeded"
            self.pods.setdefault((ns, pod), {
                "metadata": {"name": pod, "namespace": ns, "uid": str(uuid.uuid4()), "labels": {
                    "training.kubeflow.org/job-name": name, "training.kubeflow.org/job-role": "master",
                    "training.kubeflow.org/replica-type": "master", "training.kubeflow.org/replica-index": "0"}},
                "status": {"phase": phase}})
        return {"conditions": conditions}

    def _rayjob_status(self, ns: str, name: str, status: dict) -> dict:
        """A RayJob's scripted status; from Running on, the submitter Job's pod exists (Running while the
        RayJob runs, then Succeeded or Failed with the Ray job)."""
        deployment = status.get("jobDeploymentStatus", "")
        pod = submitter_pod(name)
        if deployment == "Running" or (ns, pod) in self.pods:
            failed = deployment in ("Failed", "ValidationFailed") or status.get("jobStatus") in ("FAILED", "STOPPED")
            phase = "Running" if deployment == "Running" else "Failed" if failed else "Succeeded"
            uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ns}/{name}"))  # the Job's uid
            existing = self.pods.setdefault((ns, pod), {
                "metadata": {"name": pod, "namespace": ns, "uid": str(uuid.uuid4()), "labels": {
                    # the Job controller's (Kubernetes >= 1.27) ...
                    "batch.kubernetes.io/job-name": name, "job-name": name,
                    "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                    # ... and KubeRay's getSubmitterTemplate (rayjob_controller.go)
                    "ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                    "app.kubernetes.io/created-by": "kuberay-operator"}},
                "status": {"phase": phase}})
            existing["status"]["phase"] = phase
        return status


def _plural(job: dict) -> str:
    return {"TrainJob": "trainjobs", "RayJob": "rayjobs"}.get(job.get("kind", ""), "pytorchjobs")


def _matches(labels: dict, selector: str) -> bool:
    for part in filter(None, selector.split(",")):
        key, _, value = part.partition("=")
        if labels.get(key) != value:
            return False
    return True


def make_handler(fake: FakeK8s):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            return None

        def _send(self, code: int, body, content_type: str = "application/json"):
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self):
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            return url, parts, parse_qs(url.query)

        def do_POST(self):
            url, parts, _ = self._route()
            with fake.lock:
                fake.requests.append(("POST", url.path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if url.path == SAR:
                    return self._send(201, {**body, "status": fake.review(body)})
                if url.path in fake.forbidden:
                    return self._send(403, _forbidden("POST", url.path))
                ns, name = parts[4], body["metadata"]["name"]
                m = JOB_PATH.match(url.path)
                if not m or m.group(3) in fake.unserved:
                    return self._send(404, UNSERVED)
                if (ns, name) in fake.jobs:
                    group = m.group(1).split("/")[0]
                    return self._send(409, _status(409, "AlreadyExists", f'{m.group(3)}.{group} "{name}" already exists',
                                                   {"name": name, "group": group, "kind": m.group(3)}))
                fake.jobs[(ns, name)] = body
                fake.created.append(body)
                return self._send(201, body)

        def do_GET(self):
            url, parts, query = self._route()
            with fake.lock:
                fake.requests.append(("GET", url.path))
                if url.path in fake.forbidden:
                    if JOB_PATH.match(url.path):
                        return self._send(403, _forbidden("GET", url.path))
                    return self._send(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "reason": "Forbidden", "code": 403,
                                            "message": f"forbidden: cannot get {url.path}"})
                if url.path.startswith(PODS) and len(parts) == 6 and parts[4] == "podtemplates":
                    found = fake.pod_templates.get((parts[3], parts[5]))
                    if found is None:
                        return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                "reason": "NotFound", "code": 404,
                                                "message": f'podtemplates "{parts[5]}" not found'})
                    return self._send(200, {"apiVersion": "v1", "kind": "PodTemplate",
                                            "metadata": {"name": parts[5], "namespace": parts[3]}, "template": found})
                if url.path in fake.objects:
                    return self._send(200, fake.objects[url.path])
                listed = [o for path, o in sorted(fake.objects.items()) if path.rsplit("/", 1)[0] == url.path]
                if listed:
                    return self._send(200, {"kind": "List", "apiVersion": "v1", "items": listed, "metadata": {}})
                if (m := JOB_PATH.match(url.path)) and m.group(3) in fake.unserved:
                    return self._send(404, UNSERVED)
                if m and m.group(4):
                    job = fake.jobs.get((m.group(2), m.group(4)))
                    if job is None or _plural(job) != m.group(3):
                        return self._send(404, _not_found(m.group(3), m.group(1).split("/")[0], m.group(4)))
                    return self._send(200, {**job, "status": fake.status_of(m.group(2), m.group(4))})
                if m:
                    sel = query.get("labelSelector", [""])[0]
                    items = [j for (ns, _), j in fake.jobs.items() if ns == m.group(2) and _plural(j) == m.group(3)
                             and _matches(j["metadata"].get("labels", {}), sel)]
                    if m.group(3) == "rayjobs":  # the list kind and apiVersion the API server answers with
                        return self._send(200, {"apiVersion": JOB_API["rayjobs"], "kind": "RayJobList",
                                                "items": items, "metadata": {"resourceVersion": "1"}})
                    return self._send(200, {"kind": "List", "items": items, "metadata": {}})
                if url.path.startswith(PODS) and parts[-1] == "log":
                    return self._send(200, fake.logs.get(parts[5], ""), "text/plain")
                if url.path.startswith(PODS) and parts[-1] == "pods":
                    sel = query.get("labelSelector", [""])[0]
                    items = [p for (ns, _), p in fake.pods.items()
                             if ns == parts[3] and _matches(p["metadata"]["labels"], sel)]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "items": items, "metadata": {}})
            return self._send(404, {"kind": "Status", "code": 404})

        def do_DELETE(self):
            url, parts, _ = self._route()
            with fake.lock:
                fake.requests.append(("DELETE", url.path))
                if url.path in fake.forbidden:
                    return self._send(403, _forbidden("DELETE", url.path))
                m = JOB_PATH.match(url.path)
                job = fake.jobs.get((parts[4], parts[6])) if m else None
                if not m or m.group(3) in fake.unserved:
                    return self._send(404, UNSERVED)
                if job is None or _plural(job) != m.group(3):
                    return self._send(404, _not_found(m.group(3), m.group(1).split("/")[0], parts[6]))
                del fake.jobs[(parts[4], parts[6])]
                fake.deleted.append(parts[6])
                if m.group(3) == "rayjobs":  # foreground deletion takes the submitter Job's pod with it ...
                    for key in [k for k, p in fake.pods.items() if k[0] == parts[4]
                                and p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == parts[6]]:
                        del fake.pods[key]
                    # ... and answers with the object, marked for deletion
                    return self._send(200, {**job, "metadata": {**job["metadata"], "finalizers": ["foregroundDeletion"],
                                                                "deletionTimestamp": "2026-01-01T00:00:00Z"}})
                return self._send(200, {"kind": "Status", "status": "Success"})

    return Handler


@contextlib.contextmanager
def fake_k8s_server() -> Iterator[FakeK8s]:
    """A `FakeK8s` serving on 127.0.0.1 (its `url`) while the context lasts."""
    fake = FakeK8s()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def cancel_with_sigterm(run, after_s: float = 0.5) -> None:
    """Call `run()` while this process receives SIGTERM after `after_s`, as a cancelled KFP step's launcher
    pod does; it must fail with the launcher's `Cancelled`."""
    import os
    import signal

    import pytest

    from vfm.launch import JobFailed

    timer = threading.Timer(after_s, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(JobFailed, match="Cancelled"):
            run()
    finally:
        timer.cancel()
