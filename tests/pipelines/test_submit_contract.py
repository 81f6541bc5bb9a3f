"""Submitting a committed pipeline to a KFP API: `vfm pipeline submit` and the README's `kfp run create`,
both against a small stub of /apis/v2beta1 on loopback (the requests kfp 2.17's client makes: healthz,
experiments list/create, runs create/get)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vfm.pipeline.submit import submit

ROOT = Path(__file__).resolve().parents[2]
CREATED = "2026-11-25T00:00:00Z"


class _KfpStub(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, dict]] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.seen.append(("GET", self.path, {}))
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply({"commit_sha": "stub", "tag_name": "2.17.0", "multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [], "total_size": 0})
        if self.path.startswith("/apis/v2beta1/runs/"):
            return self._reply({"run_id": self.path.rsplit("/", 1)[-1], "state": "PENDING", "created_at": CREATED})
        self.send_error(404)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.seen.append(("POST", self.path, body))
        if self.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        if self.path == "/apis/v2beta1/runs":
            return self._reply({**body, "run_id": "run-1", "state": "PENDING", "created_at": CREATED})
        self.send_error(404)

    def log_message(self, *args):
        return None


@pytest.fixture
def kfp_api():
    _KfpStub.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KfpStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _KfpStub.seen
    server.shutdown()


def _created_run(seen) -> dict:
    (body,) = [b for method, path, b in seen if method == "POST" and path == "/apis/v2beta1/runs"]
    return body


def test_vfm_pipeline_submit_sends_the_committed_spec(kfp_api, monkeypatch):
    host, seen = kfp_api
    monkeypatch.chdir(ROOT)
    url = submit("vit-huge", host=host, params=["profile=smoke", "seeds=[0,1]"], service_account="vfm-pipeline-runner")
    assert url == f"{host}/#/runs/details/run-1"
    run = _created_run(seen)
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "vfm-vit-huge"
    assert "platform_spec" in spec  # kfp-kubernetes settings travel with the run
    assert run["runtime_config"]["parameters"] == {"profile": "smoke", "seeds": [0, 1]}
    assert run["service_account"] == "vfm-pipeline-runner"
    assert any(m == "POST" and p == "/apis/v2beta1/experiments" and b["display_name"] == "vfm-vit-huge"
               for m, p, b in seen)


def test_readme_kfp_run_create_submits_the_committed_yaml(kfp_api):
    host, seen = kfp_api
    kfp = Path(sys.executable).with_name("kfp")
    out = subprocess.run([str(kfp), "--endpoint", host, "run", "create", "-e", "vfm-vit-huge",
                          "-f", "pipelines/vit-huge.yaml", "profile=smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "KUBECONFIG": "/nonexistent"})
    assert out.returncode == 0, out.stderr[-2000:]
    run = _created_run(seen)
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "vfm-vit-huge"
    assert run["runtime_config"]["parameters"] == {"profile": "smoke"}


def test_the_cli_submits_as_the_runner_service_account_by_default(kfp_api, monkeypatch):
    from typer.testing import CliRunner

    from vfm.cli import app

    host, seen = kfp_api
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["pipeline", "submit", "vit-huge", "--host", host])
    assert result.exit_code == 0, result.output
    # the account manifests/base/rbac.yaml binds to PyTorchJob creation in `vfm`
    assert _created_run(seen)["service_account"] == "vfm-pipeline-runner"
