"""Pod Security `restricted` checks for every pod template inside a Kubernetes object.

Linters such as kube-linter skip custom resources, so a PyTorchJob's replica templates would go
unchecked; here every mapping that holds a `containers` list is treated as a pod spec, wherever it
sits (Pod, Deployment, Job, CronJob, PodTemplate, PyTorchJob `pytorchReplicaSpecs.*.template`, ...).
The rules follow the Kubernetes Pod Security Standards (baseline + restricted, version "latest" as of
v1.32). `allowed_added_capabilities` exists for the one documented exemption: NCCL over InfiniBand
needs `IPC_LOCK` in the multi-node RDMA namespace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
# Safe sysctls of the baseline level (namespaced, cannot affect other pods on the node).
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def as_plain_dict(obj: Any) -> dict[str, Any]:
    """Accept a manifest dict or an OpenAPI model object (kubernetes / kubeflow-training SDK)."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "openapi_types"):
        # The SDK models' own to_dict() gives snake_case keys; the API client gives the wire format.
        from kubernetes.client import ApiClient

        return ApiClient().sanitize_for_serialization(obj)
    raise TypeError(f"expected a Kubernetes manifest dict or an OpenAPI model, got {type(obj).__name__}")


def object_name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "<unnamed>")
    return f"{obj.get('kind', '<no kind>')}/{ns + '/' if ns else ''}{name}"


def pod_specs(obj: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (path, pod spec) for every pod spec nested anywhere in `obj`."""
    if isinstance(obj, Mapping):
        if isinstance(obj.get("containers"), list):
            yield path or ".", dict(obj)
            return
        for key, value in obj.items():
            yield from pod_specs(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from pod_specs(value, f"{path}[{i}]")


def _container_violations(
    where: str, c: Mapping[str, Any], pod_sc: Mapping[str, Any], allowed_caps: frozenset[str]
) -> list[str]:
    out: list[str] = []
    sc = c.get("securityContext") or {}
    if sc.get("privileged"):
        out.append(f"{where}: privileged must not be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.append(f"{where}: securityContext.capabilities.drop must contain ALL")
    extra = sorted(set(caps.get("add") or []) - allowed_caps)
    if extra:
        out.append(f"{where}: capabilities.add {extra} not allowed (only {sorted(allowed_caps)})")
    run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if run_as_non_root is not True:
        out.append(f"{where}: runAsNonRoot must be true (container or pod securityContext)")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        out.append(f"{where}: runAsUser must not be 0")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost, got {seccomp!r}")
    if sc.get("procMount", "Default") != "Default":
        out.append(f"{where}: procMount must be Default")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"{where}: appArmorProfile.type {apparmor!r} not allowed")
    out += _selinux_violations(where, sc.get("seLinuxOptions") or {})
    for port in c.get("ports") or []:
        if port.get("hostPort"):
            out.append(f"{where}: hostPort {port['hostPort']} not allowed")
    return out


def _selinux_violations(where: str, opts: Mapping[str, Any]) -> list[str]:
    out = []
    if opts.get("type", "") not in SELINUX_TYPES:
        out.append(f"{where}: seLinuxOptions.type {opts['type']!r} not allowed")
    if opts.get("user") or opts.get("role"):
        out.append(f"{where}: seLinuxOptions.user/role must be unset")
    return out


def pod_spec_violations(
    where: str, spec: Mapping[str, Any], allowed_added_capabilities: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """Violations of the `restricted` level in one pod spec; `where` prefixes every message."""
    allowed = frozenset({"NET_BIND_SERVICE"}) | frozenset(allowed_added_capabilities)
    out: list[str] = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            out.append(f"{where}: {flag} must not be set")
    pod_sc = spec.get("securityContext") or {}
    out += _selinux_violations(where, pod_sc.get("seLinuxOptions") or {})
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append(f"{where}: pod seccompProfile must not be Unconfined")
    if pod_sc.get("runAsUser") == 0:
        out.append(f"{where}: pod runAsUser must not be 0")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"{where}: sysctl {sysctl.get('name')!r} not allowed")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        bad = sorted(kinds - RESTRICTED_VOLUME_TYPES)
        if bad:
            out.append(
                f"{where}: volume {vol.get('name')!r} uses {bad}; allowed: {sorted(RESTRICTED_VOLUME_TYPES)}"
            )
    for list_name in CONTAINER_LISTS:
        for c in spec.get(list_name) or []:
            out += _container_violations(f"{where}.{list_name}[{c.get('name')}]", c, pod_sc, allowed)
    return out


def restricted_violations(
    obj: Any, allowed_added_capabilities: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """Every `restricted` Pod Security violation in any pod template of `obj` ([] when compliant).

    `obj` is a manifest dict (any kind, custom resources included) or an SDK model object.
    """
    data = as_plain_dict(obj)
    name = object_name(data)
    out: list[str] = []
    for path, spec in pod_specs(data):
        out += pod_spec_violations(f"{name} {path}", spec, allowed_added_capabilities)
    return out


def hygiene_violations(obj: Any) -> list[str]:
    """Project rules beyond Pod Security: pinned images, resource requests and limits on every container."""
    data = as_plain_dict(obj)
    name = object_name(data)
    out: list[str] = []
    for path, spec in pod_specs(data):
        for list_name in ("initContainers", "containers"):
            for c in spec.get(list_name) or []:
                where = f"{name} {path}.{list_name}[{c.get('name')}]"
                image = c.get("image") or ""
                tag = image.rsplit("/", 1)[-1]
                if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                    out.append(f"{where}: image {image!r} must be pinned by tag (not latest) or digest")
                resources = c.get("resources") or {}
                for key in ("requests", "limits"):
                    if not resources.get(key, {}).get("memory"):
                        out.append(f"{where}: resources.{key}.memory must be set")
                if not resources.get("requests", {}).get("cpu"):
                    out.append(f"{where}: resources.requests.cpu must be set")
    return out
