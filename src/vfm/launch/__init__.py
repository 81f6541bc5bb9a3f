"""PyTorchJob launcher: build the job from a recipe (`job`), run it on a cluster (`cluster`) or as local
processes with the operator's environment (`local`). Both backends return a `JobResult` or raise
`JobFailed` / `JobTimeout`, and both delete / kill what they started when they do not succeed."""

from __future__ import annotations

from typing import Any, Literal

from vfm.launch.job import (
    Elastic,
    Gang,
    JobOptions,
    build_job,
    evaluator_args,
    job_name,
    one_node,
    to_manifest,
    trainer_args,
)
from vfm.launch.result import JobFailed, JobResult, JobTimeout

__all__ = ["Elastic", "Gang", "JobOptions", "JobFailed", "JobResult", "JobTimeout", "build_job", "evaluator_args",
           "job_name", "one_node",
           "read_pod_template", "run_job", "to_manifest", "trainer_args"]

Backend = Literal["cluster", "local"]


def read_pod_template(namespace: str, *, backend: Backend) -> dict[str, Any] | None:
    """The namespace's `vfm-trainer` PodTemplate on a cluster; None for the local backend, which has no
    API server and builds its pods from the recipe (vfm.launch.job)."""
    if backend == "cluster":
        from vfm.launch.cluster import ClusterBackend

        return ClusterBackend.from_environment().pod_template(namespace)
    return None


def run_job(manifest: dict[str, Any], *, backend: Backend, timeout_s: float, max_restarts: int,
            env: dict[str, str] | None = None) -> JobResult:
    """Run `manifest` to completion on `backend`; the same spec either way."""
    if backend == "cluster":
        from vfm.launch.cluster import ClusterBackend

        return ClusterBackend.from_environment().run(manifest, timeout_s=timeout_s, max_restarts=max_restarts)
    if backend == "local":
        from vfm.launch.local import LocalBackend

        return LocalBackend(env=dict(env or {})).run(manifest, timeout_s=timeout_s, max_restarts=max_restarts)
    raise ValueError(f"backend {backend!r}: use 'cluster' or 'local'")
