"""The restricted-pod walker and the PyTorchJob schema, on hand-made objects and on launcher output."""

from __future__ import annotations

import copy
import importlib

import pytest
from kubernetes.client import models as k8s

from vfm.deploy.policy import hygiene_violations, pod_specs, restricted_violations
from vfm.deploy.validate import validation_errors

K8S_VERSION = "1.32"
GOOD_SPEC = {
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "containers": [
        {
            "name": "pytorch",
            "image": "ghcr.io/x/vfm-trainer:0.1.0",
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
    ],
    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
}


def pytorchjob(spec=GOOD_SPEC, worker_spec=None):
    worker = worker_spec if worker_spec is not None else spec
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "vit-h", "namespace": "vfm"},
        "spec": {
            "nprocPerNode": "8",
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3},
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "ExitCode",
                    "template": {"spec": copy.deepcopy(spec)},
                },
                "Worker": {
                    "replicas": 3,
                    "restartPolicy": "ExitCode",
                    "template": {"spec": copy.deepcopy(worker)},
                },
            },
        },
    }


def test_compliant_pytorchjob_passes_everything():
    job = pytorchjob()
    assert [p for p, _ in pod_specs(job)] == [
        ".spec.pytorchReplicaSpecs.Master.template.spec",
        ".spec.pytorchReplicaSpecs.Worker.template.spec",
    ]
    assert restricted_violations(job) == []
    assert hygiene_violations(job) == []
    assert validation_errors(job, K8S_VERSION) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
            "allowPrivilegeEscalation",
        ),
        (
            lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": []}),
            "drop must contain ALL",
        ),
        (
            lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["IPC_LOCK"]),
            "IPC_LOCK",
        ),
        (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "privileged"),
        (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda s: s["securityContext"].update(runAsUser=0), "runAsUser must not be 0"),
        (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda s: s.update(hostNetwork=True), "hostNetwork"),
        (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/dev/infiniband"}}), "hostPath"),
        (lambda s: s["containers"][0].update(ports=[{"containerPort": 1, "hostPort": 1}]), "hostPort"),
        (lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "sysctl"),
        (
            lambda s: s.update(initContainers=[{"name": "init", "image": "alpine:3.10"}]),
            "initContainers[init]",
        ),
    ],
)
def test_each_restricted_rule_is_caught_in_worker_templates(mutate, expected):
    bad = copy.deepcopy(GOOD_SPEC)
    mutate(bad)
    violations = restricted_violations(pytorchjob(worker_spec=bad))
    assert violations, expected
    assert all("Worker" in v for v in violations)  # the Master template stays compliant
    assert any(expected in v for v in violations), violations


def test_ipc_lock_allowed_only_when_named():
    bad = copy.deepcopy(GOOD_SPEC)
    bad["containers"][0]["securityContext"]["capabilities"]["add"] = ["IPC_LOCK"]
    assert restricted_violations(pytorchjob(bad), {"IPC_LOCK"}) == []
    bad["containers"][0]["securityContext"]["capabilities"]["add"] = ["IPC_LOCK", "SYS_ADMIN"]
    assert any("SYS_ADMIN" in v for v in restricted_violations(pytorchjob(bad), {"IPC_LOCK"}))


def test_hygiene_catches_unpinned_images_and_missing_resources():
    bad = copy.deepcopy(GOOD_SPEC)
    bad["containers"][0]["image"] = "ghcr.io/x/vfm-trainer:latest"
    del bad["containers"][0]["resources"]["limits"]
    out = hygiene_violations(pytorchjob(worker_spec=bad))
    assert any("latest" in v for v in out) and any("limits.memory" in v for v in out)
    assert (
        hygiene_violations(
            {
                "kind": "Pod",
                "spec": {
                    **GOOD_SPEC,
                    "containers": [
                        {**GOOD_SPEC["containers"][0], "image": "ghcr.io/x/vfm@sha256:" + "0" * 64}
                    ],
                },
            }
        )
        == []
    )


def test_sdk_model_objects_are_walked_in_wire_format():
    pod = k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=k8s.V1ObjectMeta(name="p"),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="c", image="busybox:1.36")]),
    )
    out = restricted_violations(pod)
    assert any("runAsNonRoot" in v for v in out) and all(v.startswith("Pod/p") for v in out)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda j: j["spec"].update(pytorchReplicaSpec={}), "pytorchReplicaSpec"),
        (lambda j: j["spec"].pop("pytorchReplicaSpecs"), "pytorchReplicaSpecs"),
        (lambda j: j["spec"]["runPolicy"].update(cleanPodPolicy="Always"), "Always"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"), "Sometimes"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="3"), "'3'"),
        # the replica template is checked against the real core/v1 PodTemplateSpec schema
        (
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(
                imagePullPolice="Always"
            ),
            "imagePullPolice",
        ),
    ],
)
def test_pytorchjob_schema_rejects_bad_specs(mutate, expected):
    job = pytorchjob()
    mutate(job)
    errors = validation_errors(job, K8S_VERSION)
    assert any(expected in e for e in errors), errors


def test_launcher_jobs_are_restricted_and_valid():
    # Imported lazily: vfm.launch is another area's module; this test holds its output to our policy.
    job_mod = importlib.import_module("vfm.launch.job")
    from vfm.recipes import list_recipes, load_recipe

    checked = 0
    for recipe_id in list_recipes():
        for profile in ("paper", "smoke"):
            recipe = load_recipe(recipe_id, profile=profile)
            for extra in (
                {},
                {"gang": job_mod.Gang(scheduler="kueue", queue="vfm-h100")},
                {"elastic": job_mod.Elastic(min_nodes=recipe.hardware.nodes, max_nodes=recipe.hardware.nodes)},
            ):
                opts = job_mod.JobOptions(
                    name=job_mod.job_name(recipe.id, "pretrain", "run-1"),
                    namespace="vfm",
                    image="ghcr.io/vfm-project/vfm-trainer:0.1.0",
                    args=job_mod.trainer_args(recipe.id, "pretrain", data="s3://d/", out="s3://o/"),
                    **extra,
                )
                manifest = job_mod.to_manifest(job_mod.build_job(recipe, opts))
                assert len(list(pod_specs(manifest))) >= 1
                problems = (
                    restricted_violations(manifest)
                    + hygiene_violations(manifest)
                    + validation_errors(manifest, K8S_VERSION)
                )
                assert problems == [], f"{recipe_id}/{profile}/{extra}:\n" + "\n".join(problems)
                checked += 1
    assert checked >= 30


def test_launcher_rayjobs_are_restricted_and_valid_and_a_bad_template_is_caught_in_every_ray_pod():
    # The RayJob of a curation step: head, workers and submitter, from restricted defaults and from the
    # base's `vfm-ray` PodTemplate; validated against the KubeRay v1.7.0 CRD (vfm.deploy.crds).
    from pathlib import Path

    import yaml

    rayjob = importlib.import_module("vfm.launch.rayjob")
    base = Path(__file__).resolve().parents[2] / "manifests/base/ray-podtemplate.yaml"
    template = yaml.safe_load(base.read_text())["template"]

    def build(pod_template):
        return rayjob.build_rayjob(
            name="curate-run-1", namespace="vfm", image="ghcr.io/vfm-project/vfm-trainer:0.1.0",
            entrypoint=["python", "-m", "vfm.curate"], workers=2, cpus_per_worker=8, memory_per_worker="32Gi",
            pod_template=pod_template, labels={"vfm.io/run": "run-1"}, env={}, secret="vfm-credentials",
            timeout_s=3600)

    for pod_template in (None, template):
        manifest = build(pod_template)
        assert [p for p, _ in pod_specs(manifest)] == [
            ".spec.rayClusterSpec.headGroupSpec.template.spec",
            ".spec.rayClusterSpec.workerGroupSpecs[0].template.spec",
            ".spec.submitterPodTemplate.spec",
        ]
        problems = (restricted_violations(manifest) + hygiene_violations(manifest)
                    + validation_errors(manifest, K8S_VERSION))
        assert problems == [], "\n".join(problems)
    bad = copy.deepcopy(template)
    bad["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]
    bad["spec"]["securityContext"].pop("runAsNonRoot")
    violations = restricted_violations(build(bad))
    for where in ("ray-head", "ray-worker", "ray-job-submitter"):
        assert any(f"[{where}]: capabilities.add ['SYS_ADMIN']" in v for v in violations), violations
        assert any(f"[{where}]: runAsNonRoot must be true" in v for v in violations), violations
