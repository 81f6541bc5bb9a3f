"""Shared fixtures: real servers on 127.0.0.1 (moto S3 in server mode, `mlflow server` on SQLite).

Both are session-scoped: starting MLflow costs a few seconds, and tests isolate themselves by bucket
or experiment name instead of by server.
"""

from __future__ import annotations

import os
import uuid

import pytest

from vfm.services import S3_ENV_DEFAULTS, embedded_services
from vfm.storage import s3_client


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    for k, v in S3_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    with embedded_services(tmp_path_factory.mktemp("services")) as svc:
        yield svc


@pytest.fixture(scope="session")
def s3_endpoint(services) -> str:
    return services.s3_endpoint


@pytest.fixture(scope="session")
def mlflow_uri(services) -> str:
    return services.mlflow_uri


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the S3 endpoint."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name
