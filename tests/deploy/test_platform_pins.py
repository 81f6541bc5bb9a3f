"""Remote upstream bases are pinned to release tags that match the SDK pins in pyproject (and, for KubeRay,
the release the RayJob CRD in src/vfm/deploy/crds/ and the launcher's RayJob builder come from)."""

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
    assert set(found) == {"training-operator", "trainer-v2", "kuberay", "kfp/cluster-scoped-resources",
                          "kfp/platform-agnostic"}
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


def test_kuberay_matches_the_rayjob_crd_and_the_launcher():
    """The operator the platform installs is the release whose RayJob CRD vfm validates against and whose
    status fields and labels vfm.launch.rayjob / vfm.launch.cluster read."""
    from vfm.launch import rayjob

    (ref,) = remote_resources()["kuberay"]
    assert ref.startswith("https://github.com/ray-project/kuberay.git//ray-operator/config/default?")
    tag = ref.rsplit("ref=", 1)[1]
    assert tag == rayjob.KUBERAY_VERSION
    crd_file = REPO / "src/vfm/deploy/crds/ray.io_rayjobs.yaml"
    header = crd_file.read_text().split("\n---\n", 1)[0]
    assert re.search(rf"ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayjobs.yaml at tag {re.escape(tag)}\b",
                     header), header
    readme = (REPO / "src/vfm/deploy/crds/README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `ray.io_rayjobs.yaml`")]
    assert f"at tag {tag} " in row, row
    crd = yaml.load(crd_file.read_text().split("\n---\n", 1)[1], Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (rayjob.GROUP, rayjob.KIND)
    assert [v["name"] for v in crd["spec"]["versions"] if v["served"] and v["storage"]] == [rayjob.VERSION]
