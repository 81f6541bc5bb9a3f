"""A small fake Kubernetes API on loopback: the endpoints the launcher uses, scripted job timelines.

Each GET of a PyTorchJob or TrainJob advances its scripted timeline by one step (the last step
repeats); when a PyTorchJob's step includes Running, its master pod appears with its log; a TrainJob's
node 0 pod (JobSet's labels, `<job>-node-0-0`) appears once the TrainJob is no longer suspended. Every request is recorded so
tests can assert what the launcher did (created, polled, deleted).

For `vfm preflight --context`, any other object is served from `objects` by its API path (GET of the
path; GET of its collection lists it; 404 Status otherwise), and SubjectAccessReviews are answered from
`grants`, as the API server's authorizer would.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

JOB_PATH = re.compile(r"^/apis/(?:kubeflow\.org/v1|trainer\.kubeflow\.org/v1alpha1)/namespaces/([^/]+)/"
                      r"(pytorchjobs|trainjobs)(?:/([^/]+))?$")
SAR = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
PODS = "/api/v1/namespaces/"


def cond(kind: str, status: str = "True", reason: str = "", message: str = "", t: str = "2026-01-01T00:00:00Z"):
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": t}


class FakeK8s:
    def __init__(self):
        self.jobs: dict[tuple[str, str], dict] = {}
        self.timelines: dict[str, list[list[dict]]] = {}
        self.default_timeline: list[list[dict]] = [[cond("Created")]]
        self.pods: dict[tuple[str, str], dict] = {}
        self.logs: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.pod_templates: dict[tuple[str, str], dict] = {}
        self.forbidden: set[str] = set()
        """Request paths answered 403 Forbidden (RBAC refuses the caller)."""
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
        timeline = self.timelines.get(name, self.default_timeline)
        i = min(self._gets.get(name, 0), len(timeline) - 1)
        self._gets[name] = self._gets.get(name, 0) + 1
        conditions = timeline[i]
        if self.jobs[(ns, name)].get("kind") == "TrainJob":
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


def _plural(job: dict) -> str:
    return {"TrainJob": "trainjobs"}.get(job.get("kind", ""), "pytorchjobs")


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
                ns, name = parts[4], body["metadata"]["name"]
                if not JOB_PATH.match(url.path):
                    return self._send(404, {"kind": "Status", "code": 404})
                if (ns, name) in fake.jobs:
                    return self._send(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
                fake.jobs[(ns, name)] = body
                fake.created.append(body)
                return self._send(201, body)

        def do_GET(self):
            url, parts, query = self._route()
            with fake.lock:
                fake.requests.append(("GET", url.path))
                if url.path in fake.forbidden:
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
                if (m := JOB_PATH.match(url.path)) and m.group(3):
                    job = fake.jobs.get((m.group(1), m.group(3)))
                    if job is None or _plural(job) != m.group(2):
                        return self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                    return self._send(200, {**job, "status": fake.status_of(m.group(1), m.group(3))})
                if m:
                    sel = query.get("labelSelector", [""])[0]
                    items = [j for (ns, _), j in fake.jobs.items() if ns == m.group(1) and _plural(j) == m.group(2)
                             and _matches(j["metadata"].get("labels", {}), sel)]
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
                m = JOB_PATH.match(url.path)
                job = fake.jobs.get((parts[4], parts[6])) if m else None
                if job is None or _plural(job) != m.group(2):
                    return self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                del fake.jobs[(parts[4], parts[6])]
                fake.deleted.append(parts[6])
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
