"""Re-export the fake Kubernetes API fixture of tests/launch for the exit-handler tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("launch_fake_k8s", Path(__file__).parents[1] / "launch" / "conftest.py")
_fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fake)
fake_k8s = _fake.fake_k8s
