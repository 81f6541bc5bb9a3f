"""Every offline kustomization renders, validates for Kubernetes 1.32 and meets Pod Security `restricted`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vfm.deploy.policy import hygiene_violations, pod_specs, restricted_violations
from vfm.deploy.render import is_component, offline_kustomizations
from vfm.deploy.validate import validation_errors

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
K8S_VERSION = "1.32"  # the Kubernetes version every rendered object is validated against
OVERLAYS = ("overlays/local", "overlays/h100", "overlays/h100-trainer-v2")


def all_objects(rendered):
    return [(where, obj) for where, objs in rendered.items() for obj in objs]


def test_every_entry_point_is_rendered(rendered):
    # The overlays and Argo CD apps are what operators apply; the base must also build on its own.
    assert {"base", "argocd", *OVERLAYS} <= set(rendered)
    for components_dir in (MANIFESTS / "components").iterdir():
        assert is_component(components_dir), f"{components_dir} must be a kustomize Component"
    assert all(objs for objs in rendered.values())


def test_every_component_is_used_by_an_overlay():
    used = set()
    for overlay in OVERLAYS:
        doc = yaml.safe_load((MANIFESTS / overlay / "kustomization.yaml").read_text())
        used |= {(MANIFESTS / overlay / c).resolve() for c in doc.get("components", [])}
    unused = [c.name for c in (MANIFESTS / "components").iterdir() if c.resolve() not in used]
    assert not unused, f"components not rendered by any overlay (so never validated): {unused}"


def test_rendered_objects_validate(rendered):
    errors = [
        f"{where}: {e}" for where, obj in all_objects(rendered) for e in validation_errors(obj, K8S_VERSION)
    ]
    assert not errors, "\n".join(errors)


def test_restricted_fields_on_every_pod_template(rendered):
    # IPC_LOCK is allowed only where the documented RDMA exemption applies (h100 trainer template).
    violations = []
    templates = 0
    for where, obj in all_objects(rendered):
        templates += len(list(pod_specs(obj)))
        rdma = where in ("overlays/h100", "overlays/h100-trainer-v2") and obj["kind"] == "PodTemplate"
        violations += restricted_violations(obj, {"IPC_LOCK"} if rdma else set())
    assert templates >= 5
    assert not violations, "\n".join(violations)


def test_images_pinned_and_resources_set(rendered):
    violations = [v for _, obj in all_objects(rendered) for v in hygiene_violations(obj)]
    assert not violations, "\n".join(violations)


def test_ipc_lock_only_with_the_documented_exemption(rendered):
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in rendered["overlays/h100"]}
    ns_labels = by_kind[("Namespace", "vfm")]["metadata"]["labels"]
    assert ns_labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert ns_labels["pod-security.kubernetes.io/audit"] == "restricted"
    assert ns_labels["pod-security.kubernetes.io/warn"] == "restricted"
    # The lost enforcement is replaced by an admission policy bound to the namespace.
    binding = by_kind[("ValidatingAdmissionPolicyBinding", "vfm-restricted-except-ipc-lock")]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert ("ValidatingAdmissionPolicy", "vfm-restricted-except-ipc-lock") in by_kind
    # Without the exemption, the namespace enforces restricted.
    local_ns = next(o for o in rendered["overlays/local"] if o["kind"] == "Namespace")
    assert local_ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # ... and the trainer template really needs it: without the allowance it violates restricted.
    assert restricted_violations(by_kind[("PodTemplate", "vfm-trainer")])


def test_h100_trainer_template_targets_gpu_nodes(rendered):
    tpl = next(o for o in rendered["overlays/h100"]
               if o["kind"] == "PodTemplate" and o["metadata"]["name"] == "vfm-trainer")["template"]["spec"]
    assert tpl["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tpl["tolerations"]
    res = tpl["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
    assert tpl["containers"][0]["name"] == "pytorch"  # the training operator requires this name
    shm = next(v for v in tpl["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_pipeline_runner_may_only_manage_pytorchjobs_and_rayjobs_in_vfm(rendered):
    objs = rendered["overlays/h100"]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = [o for o in objs if o["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "vfm"
    for rule in role["rules"]:
        writes = set(rule["verbs"]) - {"get", "list", "watch"}
        if writes:
            assert (rule["apiGroups"], rule["resources"]) in ((["kubeflow.org"], ["pytorchjobs"]),
                                                              (["ray.io"], ["rayjobs"])), rule
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "vfm-pipeline-runner", "namespace": "kubeflow"}
    ]


def test_network_policies_default_deny(rendered):
    for overlay in OVERLAYS:
        policies = {o["metadata"]["name"]: o for o in rendered[overlay] if o["kind"] == "NetworkPolicy"}
        deny = policies["default-deny-ingress"]["spec"]
        assert deny["podSelector"] == {} and "ingress" not in deny
        assert {"mlflow-from-clients", "postgres-from-mlflow", "pytorchjob-peers", "ray-cluster-peers"} <= set(policies)


def test_argocd_applications_use_server_side_apply(rendered):
    apps = [o for o in rendered["argocd"] if o["kind"] == "Application"]
    assert len(apps) == 4
    for app in apps:
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"], app["metadata"]["name"]
        path = REPO / app["spec"]["source"]["path"]
        assert (path / "kustomization.yaml").is_file(), (
            f"{app['metadata']['name']}: {path} is not a kustomization"
        )


def test_no_plaintext_secrets(rendered):
    for where, obj in all_objects(rendered):
        assert obj["kind"] != "Secret", (
            f"{where}: Secret {obj['metadata']['name']} rendered; reference it instead"
        )
    for path in MANIFESTS.rglob("*"):
        if path.suffix in (".yaml", ".yml") and path.is_file():
            for doc in yaml.safe_load_all(path.read_text()):
                assert not (doc and doc.get("kind") == "Secret"), f"{path}: Secrets belong in *.example only"
    for example in MANIFESTS.rglob("*.example"):
        for doc in yaml.safe_load_all(example.read_text()):
            for key, value in {**doc.get("data", {}), **doc.get("stringData", {})}.items():
                assert "REPLACE_ME" in value, (
                    f"{example}: {doc['metadata']['name']}.{key} is not a placeholder"
                )


@pytest.mark.parametrize("bad_field", ["syncOption", "automatic"])
def test_schema_rejects_typos_in_custom_resources(rendered, bad_field):
    app = next(o for o in rendered["argocd"] if o["kind"] == "Application")
    broken = yaml.safe_load(yaml.safe_dump(app))
    broken["spec"]["syncPolicy"][bad_field] = True
    assert validation_errors(broken, K8S_VERSION)


def test_yamllint_clean():
    targets = ["manifests", "images", ".yamllint.yaml", *map(str, MANIFESTS.rglob("*.example"))]
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", ".yamllint.yaml", *targets],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_offline_kustomizations_exclude_remote_bases():
    dirs = offline_kustomizations(MANIFESTS)
    assert not [d for d in dirs if "platform" in d.relative_to(MANIFESTS).parts]


def _secret_refs(obj, found):
    if isinstance(obj, dict):
        for key in ("secretRef", "secretKeyRef"):
            if isinstance(obj.get(key), dict):
                found.add(obj[key]["name"])
        if isinstance(obj.get("secret"), dict) and "secretName" in obj["secret"]:
            found.add(obj["secret"]["secretName"])
        for value in obj.values():
            _secret_refs(value, found)
    elif isinstance(obj, list):
        for value in obj:
            _secret_refs(value, found)
    return found


def test_every_referenced_secret_has_a_valid_example(rendered):
    examples = [d for p in MANIFESTS.rglob("*.example") for d in yaml.safe_load_all(p.read_text()) if d]
    for doc in examples:
        assert validation_errors(doc, K8S_VERSION) == []
    defined = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in examples}
    for where, obj in all_objects(rendered):
        # the cluster-scoped runtime's pods run in their TrainJob's namespace: vfm, where the jobs go
        ns = obj["metadata"].get("namespace") or ("vfm" if obj["kind"] == "ClusterTrainingRuntime" else None)
        for name in _secret_refs(obj, set()):
            assert (ns, name) in defined, (
                f"{where}: {obj['kind']} uses Secret {ns}/{name} missing from *.example"
            )


@pytest.mark.parametrize("overlay", ["overlays/h100", "overlays/local"])
def test_the_raw_data_claim_the_pipelines_mount_exists_where_their_pods_run(rendered, overlay):
    from vfm.pipeline import config

    spec, platform = yaml.safe_load_all((MANIFESTS.parent / "pipelines/vit-huge.yaml").read_text())
    mounts = [m for e in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
              for m in e.get("pvcMount", [])]
    assert mounts and all(m["mountPath"] == config.RAW_DATA_MOUNT for m in mounts)
    assert spec["root"]["inputDefinitions"]["parameters"]["raw_data_pvc"]["defaultValue"] == config.RAW_DATA_PVC
    # KFP runs pipeline pods in `kubeflow`, the namespace of the runner's service account
    (runner,) = [o for o in rendered[overlay] if o["kind"] == "ServiceAccount"
                 and o["metadata"]["name"] == config.PIPELINE_RUNNER_SERVICE_ACCOUNT]
    claims = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in rendered[overlay]
              if o["kind"] == "PersistentVolumeClaim"}
    assert (runner["metadata"]["namespace"], config.RAW_DATA_PVC) in claims
