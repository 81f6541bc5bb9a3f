"""Hand-written JSON schemas for the custom resources our manifests render, other than PyTorchJob.

Each one is the subset of the upstream CRD's openAPIV3Schema that vfm uses (field names and types as in
Argo CD v2.x/v3.x `applications.argoproj.io` and Kueue v0.9+ `kueue.x-k8s.io/v1beta1`), with unknown
fields rejected so that a typo (e.g. `syncOption`) fails the test instead of being silently pruned by the
API server. Extend a schema here when a manifest legitimately needs another upstream field.
"""

from __future__ import annotations

from typing import Any

_DEFS = "/api/_definitions.json#/$defs/"
_META = {"$ref": _DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
_QUANTITY = {"$ref": _DEFS + "io.k8s.apimachinery.pkg.api.resource.Quantity"}
_LABEL_SELECTOR = {"$ref": _DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"}
_TOLERATION = {"$ref": _DEFS + "io.k8s.api.core.v1.Toleration"}
_TAINT = {"$ref": _DEFS + "io.k8s.api.core.v1.Taint"}
_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        {
            "apiVersion": {"enum": [api_version]},
            "kind": {"enum": [kind]},
            "metadata": _META,
            "spec": spec,
            "status": {"type": "object"},
        },
        ["apiVersion", "kind", "metadata", "spec"],
    )


_KUSTOMIZE_SOURCE = _obj(
    {
        "namePrefix": _STR,
        "nameSuffix": _STR,
        "namespace": _STR,
        "images": {"type": "array", "items": _STR},
        "commonLabels": _STR_MAP,
        "commonAnnotations": _STR_MAP,
        "components": {"type": "array", "items": _STR},
        "patches": {"type": "array", "items": {"type": "object"}},
        "version": _STR,
    }
)
_APP_SOURCE = _obj(
    {
        "repoURL": _STR,
        "path": _STR,
        "targetRevision": _STR,
        "ref": _STR,
        "name": _STR,
        "kustomize": _KUSTOMIZE_SOURCE,
    },
    ["repoURL"],
)
_APPLICATION_SPEC = _obj(
    {
        "project": _STR,
        "source": _APP_SOURCE,
        "sources": {"type": "array", "items": _APP_SOURCE},
        "destination": _obj({"server": _STR, "name": _STR, "namespace": _STR}),
        "syncPolicy": _obj(
            {
                "automated": _obj(
                    {
                        "prune": {"type": "boolean"},
                        "selfHeal": {"type": "boolean"},
                        "allowEmpty": {"type": "boolean"},
                        "enabled": {"type": "boolean"},
                    }
                ),
                "syncOptions": {"type": "array", "items": _STR},
                "retry": _obj(
                    {
                        "limit": {"type": "integer"},
                        "backoff": _obj(
                            {"duration": _STR, "factor": {"type": "integer"}, "maxDuration": _STR}
                        ),
                    }
                ),
                "managedNamespaceMetadata": _obj({"labels": _STR_MAP, "annotations": _STR_MAP}),
            }
        ),
        "ignoreDifferences": {
            "type": "array",
            "items": _obj(
                {
                    "group": _STR,
                    "kind": _STR,
                    "name": _STR,
                    "namespace": _STR,
                    "jsonPointers": {"type": "array", "items": _STR},
                    "jqPathExpressions": {"type": "array", "items": _STR},
                    "managedFieldsManagers": {"type": "array", "items": _STR},
                },
                ["kind"],
            ),
        },
        "revisionHistoryLimit": {"type": "integer"},
    },
    ["project", "destination"],
)

_RESOURCE_QUOTA = _obj(
    {"name": _STR, "nominalQuota": _QUANTITY, "borrowingLimit": _QUANTITY, "lendingLimit": _QUANTITY},
    ["name", "nominalQuota"],
)
_CLUSTER_QUEUE_SPEC = _obj(
    {
        "cohort": _STR,
        "namespaceSelector": _LABEL_SELECTOR,
        "queueingStrategy": {"enum": ["StrictFIFO", "BestEffortFIFO"]},
        "stopPolicy": {"enum": ["None", "Hold", "HoldAndDrain"]},
        "resourceGroups": {
            "type": "array",
            "items": _obj(
                {
                    "coveredResources": {"type": "array", "items": _STR},
                    "flavors": {
                        "type": "array",
                        "items": _obj(
                            {"name": _STR, "resources": {"type": "array", "items": _RESOURCE_QUOTA}},
                            ["name", "resources"],
                        ),
                    },
                },
                ["coveredResources", "flavors"],
            ),
        },
        "preemption": _obj(
            {
                "reclaimWithinCohort": {"enum": ["Never", "LowerPriority", "Any"]},
                "withinClusterQueue": {"enum": ["Never", "LowerPriority", "LowerOrNewerEqualPriority"]},
            }
        ),
    }
)

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("argoproj.io/v1alpha1", "Application"): _resource(
        "argoproj.io/v1alpha1", "Application", _APPLICATION_SPEC
    ),
    ("kueue.x-k8s.io/v1beta1", "ResourceFlavor"): _resource(
        "kueue.x-k8s.io/v1beta1",
        "ResourceFlavor",
        _obj(
            {
                "nodeLabels": _STR_MAP,
                "nodeTaints": {"type": "array", "items": _TAINT},
                "tolerations": {"type": "array", "items": _TOLERATION},
            }
        ),
    ),
    ("kueue.x-k8s.io/v1beta1", "ClusterQueue"): _resource(
        "kueue.x-k8s.io/v1beta1", "ClusterQueue", _CLUSTER_QUEUE_SPEC
    ),
    ("kueue.x-k8s.io/v1beta1", "LocalQueue"): _resource(
        "kueue.x-k8s.io/v1beta1",
        "LocalQueue",
        _obj(
            {"clusterQueue": _STR, "stopPolicy": {"enum": ["None", "Hold", "HoldAndDrain"]}}, ["clusterQueue"]
        ),
    ),
}
