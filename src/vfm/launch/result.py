"""Outcome of a PyTorchJob or TrainJob, shared by the cluster and local backends."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobResult:
    name: str
    state: str
    restarts: int | None
    """Re-creations of the job's pods; None where the launcher cannot see them (a TrainJob: its JobSet counts)."""
    seconds: float


class JobFailed(RuntimeError):
    """The job ended Failed (or was cancelled, deleted, or restarted past the cap): the step fails."""

    def __init__(self, name: str, reason: str, message: str, kind: str = "PyTorchJob"):
        super().__init__(f"{kind} {name} {reason}: {message}".replace("  ", " "))
        self.job, self.reason, self.message, self.kind = name, reason, message, kind


class JobTimeout(TimeoutError):
    """The job did not finish within the launcher's deadline: the step fails and the job is deleted."""

    def __init__(self, name: str, message: str, kind: str = "PyTorchJob"):
        super().__init__(f"{kind} {name} timed out: {message}")
        self.job, self.kind = name, kind
