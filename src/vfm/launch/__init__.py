"""The launcher: build a stage's job from a recipe — a PyTorchJob (`job`, training operator v1) or a
Kubeflow Trainer v2 TrainJob (`trainjob`), the pipeline's `launcher` parameter — and run it on a cluster
(`cluster`) or as local processes with the operator's environment (`local`). Both backends return a
`JobResult` or raise `JobFailed` / `JobTimeout`, and both delete / kill what they started when they do
not succeed. The curate step's KubeRay RayJob (`rayjob`) runs on the cluster backend the same way; locally
`vfm curate` starts Ray itself."""

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
    stage_hardware,
    to_manifest,
    trainer_args,
)
from vfm.launch.result import JobFailed, JobResult, JobTimeout

__all__ = ["LAUNCHERS", "Elastic", "Gang", "JobOptions", "JobFailed", "JobResult", "JobTimeout", "build_job",
           "build_manifest", "evaluator_args", "job_name", "one_node", "stage_hardware", "read_pod_template", "run_job", "to_manifest",
           "trainer_args"]

Backend = Literal["cluster", "local"]
Launcher = Literal["pytorchjob", "trainjob"]
LAUNCHERS = ("pytorchjob", "trainjob")


def build_manifest(recipe: Any, opts: JobOptions, pod_template: dict[str, Any] | None, *,
                   launcher: str = "pytorchjob") -> dict[str, Any]:
    """The job of `launcher` kind for `recipe` under `opts`, in wire format: a PyTorchJob whose replicas are
    built from `pod_template`, or a TrainJob on the vfm runtime patched from it."""
    if launcher == "pytorchjob":
        return to_manifest(build_job(recipe, opts, pod_template))
    if launcher == "trainjob":
        from vfm.launch.trainjob import build_trainjob, trainjob_manifest

        return trainjob_manifest(build_trainjob(recipe, opts, pod_template))
    from vfm.errors import UserError

    raise UserError(f"launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")


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
