"""Render the repository's kustomizations offline with `kubectl kustomize`.

`scripts/install-kubectl.sh` installs kubectl when the machine has none. The remote upstream bases
(training operator, KFP) live under `manifests/platform/` and are the only ones that need the network;
`offline_kustomizations()` lists every other entry point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REMOTE_DIRS = ("platform",)


class KustomizeError(RuntimeError):
    """kubectl is missing or a kustomization does not render."""


def find_kubectl() -> str:
    """kubectl from $VFM_KUBECTL, the running venv's bin, or PATH."""
    candidates = [
        os.environ.get("VFM_KUBECTL"),
        str(Path(sys.executable).parent / "kubectl"),
        shutil.which("kubectl"),
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise KustomizeError("kubectl not found: run `scripts/install-kubectl.sh <venv>` (or set VFM_KUBECTL)")


def is_component(directory: Path) -> bool:
    doc = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    return doc.get("kind") == "Component"


def offline_kustomizations(manifests_root: Path) -> list[Path]:
    """Every buildable kustomization (not a Component, not under a remote-base directory)."""
    found = []
    for k in sorted(manifests_root.rglob("kustomization.yaml")):
        rel = k.parent.relative_to(manifests_root)
        if rel.parts and rel.parts[0] in REMOTE_DIRS:
            continue
        if not is_component(k.parent):
            found.append(k.parent)
    return found


def render(directory: Path, kubectl: str | None = None, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Objects of `kubectl kustomize <directory>`; raises KustomizeError with kubectl's message."""
    cmd = [kubectl or find_kubectl(), "kustomize", str(directory)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise KustomizeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
