"""The embedded services of a local run and the test suite: a real S3 endpoint (moto server mode) and a real `mlflow server` on loopback.

`vfm pipeline run --local` and the test-suite both start these when no endpoint is configured, so
every byte goes over HTTP exactly as it would to AWS/MinIO and a remote MLflow:

    with embedded_services(workdir) as svc:
        svc.s3_endpoint   # http://127.0.0.1:PORT
        svc.mlflow_uri    # http://127.0.0.1:PORT (SQLite backend, artifacts proxied to s3://vfm-mlflow/)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# moto accepts any credentials; these only need to be present and consistent
S3_ENV_DEFAULTS = {
    "AWS_ACCESS_KEY_ID": "vfm-local",
    "AWS_SECRET_ACCESS_KEY": "vfm-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MLFLOW_ARTIFACT_BUCKET = "vfm-mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with code {proc.returncode} before answering {url}\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"no answer from {url} within {timeout:.0f}s\n{tail}")


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto in server mode on 127.0.0.1; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/moto-api/", timeout=30)
        yield url
    finally:
        server.stop()


@contextlib.contextmanager
def mlflow_server(workdir: Path, s3_endpoint: str, port: int | None = None) -> Iterator[str]:
    """A real `mlflow server` subprocess: SQLite backend, artifacts proxied to the S3 endpoint; `port` to
    bring one back where a stopped one was (its state is in `workdir`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in S3_ENV_DEFAULTS.items()}}
    env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    _ensure_bucket(s3_endpoint, MLFLOW_ARTIFACT_BUCKET, env)
    port = port or free_port()
    log = workdir / "mlflow-server.log"
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [
        mlflow_bin, "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{MLFLOW_ARTIFACT_BUCKET}/artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", timeout=120, proc=proc, log=log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ensure_bucket(endpoint: str, bucket: str, env: dict[str, str]) -> None:
    for k, v in S3_ENV_DEFAULTS.items():
        os.environ.setdefault(k, env.get(k, v))
    from vfm.storage import s3_client

    client = s3_client(endpoint)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:
        client.create_bucket(Bucket=bucket)


@dataclass(frozen=True)
class Services:
    s3_endpoint: str
    mlflow_uri: str

    def env(self) -> dict[str, str]:
        """Environment a child process (trainer, KFP component) needs to reach these services."""
        return {
            **{k: os.environ.get(k, v) for k, v in S3_ENV_DEFAULTS.items()},
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
        }


@contextlib.contextmanager
def embedded_services(workdir: Path) -> Iterator[Services]:
    """Start S3 + MLflow on loopback and export their addresses into this process's environment."""
    for k, v in S3_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    with s3_server() as s3, mlflow_server(workdir, s3) as mlf:
        svc = Services(s3_endpoint=s3, mlflow_uri=mlf)
        saved = {k: os.environ.get(k) for k in svc.env()}
        os.environ.update(svc.env())
        try:
            yield svc
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
