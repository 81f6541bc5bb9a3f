"""Schema validation of rendered Kubernetes objects for a stated Kubernetes version, offline.

Built-in kinds are validated strictly (unknown fields rejected) with `kubernetes-validate`'s bundled
OpenAPI schemas. `kubernetes-validate` has no custom-resource schemas, so:

* PyTorchJob (kubeflow.org/v1) gets a schema *generated* from the kubeflow-training SDK models pinned in
  pyproject (1.9.4, generated from the training-operator v1.9 CRD), with the enums the v1.9 CRD declares;
  its replica `template` is checked against the real core/v1 PodTemplateSpec schema of that version.
* TrainJob and ClusterTrainingRuntime (Kubeflow Trainer v2.3) and RayJob (KubeRay v1.7) are checked
  against the OpenAPI schema of the release's own CRDs (src/vfm/deploy/crds/, copied from kubeflow/trainer
  v2.3.0 and ray-project/kuberay v1.7.0), as the API server with strict field validation would: unknown
  fields are rejected where the CRD does not preserve them.
* The other custom resources our manifests render (Argo CD Application, Kueue queues) are checked against
  the hand-written subsets in `vfm.deploy.crd_schemas`, which reject unknown fields.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

from vfm.deploy.crd_schemas import CRD_SCHEMAS
from vfm.deploy.policy import as_plain_dict, object_name

DEFAULT_K8S_VERSION = "1.32"
_DEFS_ID = "/api/_definitions.json"
# Where SDK model type names point in the Kubernetes definitions.
_K8S_REFS = {
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1PodTemplateSpec": "io.k8s.api.core.v1.PodTemplateSpec",
    "Quantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "K8sIoApiAutoscalingV2MetricSpec": "io.k8s.api.autoscaling.v2.MetricSpec",
}
# Enums and required fields of the training-operator v1.9 CRD that the SDK models do not carry.
_PYTORCHJOB_ENUMS = {
    ("KubeflowOrgV1ReplicaSpec", "restartPolicy"): ["Always", "OnFailure", "Never", "ExitCode"],
    ("KubeflowOrgV1RunPolicy", "cleanPodPolicy"): ["All", "Running", "None"],
    ("KubeflowOrgV1RunPolicy", "managedBy"): ["kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue"],
    ("KubeflowOrgV1ElasticPolicy", "rdzvBackend"): ["c10d", "etcd", "etcd-v2"],
}
_PYTORCHJOB_REQUIRED = {"KubeflowOrgV1PyTorchJobSpec": ["pytorchReplicaSpecs"], "KubeflowOrgV1RDZVConf": []}


# (apiVersion, kind) → the CRD file under vfm/deploy/crds whose served version's schema validates it
CRD_FILES = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    ("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml",  # vfm.launch.rayjob (KubeRay v1.7.0)
}


class ManifestValidationError(ValueError):
    """A rendered object does not match its schema."""


def _schema_dir(version: str) -> str:
    from kubernetes_validate import utils

    want = utils.major_minor(version.lstrip("v"))
    known = [v for v in utils.all_versions() if utils.major_minor(v) == want]
    if not known:
        raise ManifestValidationError(
            f"kubernetes-validate has no schemas for Kubernetes {want}; available: {utils.all_versions()}"
        )
    return f"v{known[-1]}-local-strict"


@functools.cache
def _definitions(version: str) -> dict[str, Any]:
    ref = resources.files("kubernetes_validate").joinpath(f"kubernetes-json-schema/{_schema_dir(version)}")
    return json.loads(ref.joinpath("_definitions.json").read_text())


def _type_schema(type_name: str, model_name: str | None = None, field: str | None = None) -> dict[str, Any]:
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {"type": "object", "additionalProperties": _type_schema(m.group(1))}
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return {"type": "array", "items": _type_schema(m.group(1))}
    simple = {"str": "string", "int": "integer", "bool": "boolean", "object": "object"}
    if type_name in simple:
        schema: dict[str, Any] = {"type": simple[type_name]}
        if (model_name, field) in _PYTORCHJOB_ENUMS:
            schema["enum"] = _PYTORCHJOB_ENUMS[(model_name, field)]
        return schema
    if type_name in _K8S_REFS:
        return {"$ref": f"{_DEFS_ID}#/$defs/{_K8S_REFS[type_name]}"}
    if type_name.startswith("KubeflowOrgV1"):
        return _model_schema(type_name)
    raise ManifestValidationError(f"no schema mapping for SDK type {type_name!r}")


def _model_schema(model_name: str, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    from kubeflow.training import models

    model = getattr(models, model_name)
    props = {}
    for attr, type_name in model.openapi_types.items():
        wire = model.attribute_map[attr]
        if wire in skip:
            continue
        props[wire] = _type_schema(type_name, model_name, wire)
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required := _PYTORCHJOB_REQUIRED.get(model_name):
        schema["required"] = required
    return schema


@functools.cache
def pytorchjob_schema() -> dict[str, Any]:
    """JSON schema of a PyTorchJob (status accepted as any object: the operator writes it)."""
    schema = _model_schema("KubeflowOrgV1PyTorchJob", skip=frozenset({"status"}))
    schema["properties"]["apiVersion"] = {"enum": ["kubeflow.org/v1"]}
    schema["properties"]["kind"] = {"enum": ["PyTorchJob"]}
    schema["properties"]["status"] = {"type": "object"}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def _structural_to_json_schema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema as JSON Schema: objects that declare properties reject other
    fields unless the CRD marks them `x-kubernetes-preserve-unknown-fields` (the API server prunes or, under
    strict field validation, rejects them); Kubernetes' `x-kubernetes-*` and `nullable` markers drop out."""
    if isinstance(node, list):
        return [_structural_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural_to_json_schema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable" and k not in ("properties", "description")}
    if "properties" in node:
        out["properties"] = {k: _structural_to_json_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """JSON schema of `kind` from its CRD's served version (CRD_FILES)."""
    import yaml

    crd = yaml.load(resources.files("vfm.deploy").joinpath("crds", CRD_FILES[(api_version, kind)]).read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, (api_version, kind)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    schema = _structural_to_json_schema(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"$ref": f"{_DEFS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return schema


def _validate_with(schema: dict[str, Any], data: Mapping[str, Any], version: str) -> list[str]:
    import jsonschema
    from referencing import Registry, Resource

    registry = Registry().with_resource(_DEFS_ID, Resource.from_contents(_definitions(version)))
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validation_errors(obj: Any, k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """Schema errors of one object ([] when valid), each prefixed with the object's kind and name."""
    data = as_plain_dict(obj)
    name = object_name(data)
    api_kind = (data.get("apiVersion"), data.get("kind"))
    if api_kind == ("kubeflow.org/v1", "PyTorchJob"):
        errors = _validate_with(pytorchjob_schema(), data, k8s_version)
    elif api_kind in CRD_FILES:
        errors = _validate_with(crd_schema(*api_kind), data, k8s_version)
    elif api_kind in CRD_SCHEMAS:
        errors = _validate_with(CRD_SCHEMAS[api_kind], data, k8s_version)
    else:
        from kubernetes_validate import utils

        try:
            utils.validate(data, k8s_version, strict=True)
            errors = []
        except utils.SchemaNotFoundError as exc:
            errors = [f"no schema: {exc.message}; add one to vfm.deploy.crd_schemas if it is a custom resource"]
        except utils.ValidationError as exc:
            errors = [f"{'.'.join(str(p) for p in exc.absolute_path) or '<root>'}: {exc.message}"]
    return [f"{name}: {e}" for e in errors]
