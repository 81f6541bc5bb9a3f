"""The exit-handler tests talk to the fake Kubernetes API of tests.helpers.fake_k8s."""

from __future__ import annotations

import pytest

from tests.helpers.fake_k8s import fake_k8s_server


@pytest.fixture
def fake_k8s():
    """The fake Kubernetes API of tests.helpers.fake_k8s, one per test."""
    with fake_k8s_server() as fake:
        yield fake
