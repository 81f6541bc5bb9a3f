"""Rendered manifests, once per session: {kustomization dir relative to manifests/: [objects]}."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfm.deploy.render import find_kubectl, offline_kustomizations, render

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


@pytest.fixture(scope="session")
def kubectl() -> str:
    return find_kubectl()


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    return {str(d.relative_to(MANIFESTS)): render(d, kubectl) for d in offline_kustomizations(MANIFESTS)}
