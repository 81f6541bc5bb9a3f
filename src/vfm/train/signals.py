"""SIGTERM → checkpoint and exit with a retryable code.

Kubernetes sends SIGTERM before killing a pod (preemption, node drain, `kubectl delete`), then SIGKILL
after the grace period. The handler only sets a flag; the loop checks it between optimiser updates
(agreed across ranks, so all ranks save the same step together), saves, and exits with 143 = 128 + 15,
which the PyTorchJob `ExitCode` restart policy treats as retryable; the restarted pod resumes.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)

RETRYABLE_EXIT = 128 + signal.SIGTERM  # 143


class StopRequest:
    """Records SIGTERM (and SIGINT, for a local Ctrl-C) instead of dying mid-step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: saving a checkpoint after this update, then exiting %d",
                        signal.Signals(signum).name, RETRYABLE_EXIT)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
