"""Outcome of a PyTorchJob, shared by the cluster and local backends."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobResult:
    name: str
    state: str
    restarts: int
    seconds: float


class JobFailed(RuntimeError):
    """The job ended Failed (or was cancelled, deleted, or restarted past the cap): the step fails."""

    def __init__(self, name: str, reason: str, message: str):
        super().__init__(f"PyTorchJob {name} {reason}: {message}".replace("  ", " "))
        self.job, self.reason, self.message = name, reason, message


class JobTimeout(TimeoutError):
    """The job did not finish within the launcher's deadline: the step fails and the job is deleted."""

    def __init__(self, name: str, message: str):
        super().__init__(f"PyTorchJob {name} timed out: {message}")
        self.job = name
