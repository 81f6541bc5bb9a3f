"""Remote upstream bases are pinned to release tags that match the SDK pins in pyproject."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PLATFORM = REPO / "manifests" / "platform"


def remote_resources() -> dict[str, list[str]]:
    found = {}
    for k in sorted(PLATFORM.rglob("kustomization.yaml")):
        doc = yaml.safe_load(k.read_text())
        found[str(k.parent.relative_to(PLATFORM))] = [
            r for r in doc.get("resources", []) if re.match(r"(https://)?github\.com/", r)
        ]
    return found


def sdk_version(name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (dep,) = [d for d in deps if re.match(rf"{re.escape(name)}\s*==", d)]
    return dep.split("==")[1].strip()


def test_every_platform_kustomization_is_remote_and_pinned():
    found = remote_resources()
    assert set(found) == {"training-operator", "trainer-v2", "kfp/cluster-scoped-resources", "kfp/platform-agnostic"}
    for where, refs in found.items():
        assert refs, f"{where}: no remote base"
        for ref in refs:
            tag = re.search(r"[?&]ref=([^&]+)$", ref)
            assert tag, f"{where}: {ref} has no ?ref= pin"
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag.group(1)), (
                f"{where}: {ref} pins {tag.group(1)}, not a release tag"
            )


def test_training_operator_matches_kubeflow_training_sdk():
    (ref,) = remote_resources()["training-operator"]
    assert ref.startswith("https://github.com/kubeflow/trainer.git//manifests/overlays/standalone?")
    tag = ref.rsplit("ref=", 1)[1]
    assert tag.startswith("v1.9."), f"training operator must stay on v1.9.x (PyTorchJob v1), got {tag}"
    assert tag == "v" + sdk_version("kubeflow-training")


def test_trainer_v2_matches_the_trainer_api_models():
    (ref,) = remote_resources()["trainer-v2"]
    assert ref.startswith("https://github.com/kubeflow/trainer.git//manifests/overlays/manager?")
    assert ref.rsplit("ref=", 1)[1] == "v" + sdk_version("kubeflow-trainer-api")  # the TrainJob models we build with


def test_kfp_matches_kfp_sdk():
    major_minor = ".".join(sdk_version("kfp").split(".")[:2])
    assert major_minor == "2.17"
    for where in ("kfp/cluster-scoped-resources", "kfp/platform-agnostic"):
        (ref,) = remote_resources()[where]
        assert ref.startswith("https://github.com/kubeflow/pipelines.git//manifests/kustomize/")
        assert ref.rsplit("ref=", 1)[1].startswith(major_minor + "."), ref
