"""`python -m vfm.train.torchrun [torchrun flags] -m vfm.trainer ...`: torchrun with exit codes a PyTorchJob acts on.

torchrun exits 1 whatever happened: when the pod is sent SIGTERM (preemption) its workers save a
checkpoint and exit 143, but torchrun itself raises and exits 1, which an `ExitCode` restart policy
reads as a permanent failure. This launcher runs torchrun's own `run(args)` (same flags, same PET_*
environment defaults) and maps the outcome to an exit code:

  * the launcher got a signal                  → 128 + signal   (SIGTERM: 143, retryable)
  * a worker failed: the *first* failure's code → its exit code, or 128 + signal if a signal killed it
    (a worker killed by SIGKILL / the OOM killer: 137; 1 = a bug or NaN loss; 2 = bad input)

Later failures are consequences (torchrun terminates the surviving workers), so the first is the cause.

torchrun gives workers 30 s after forwarding SIGTERM before it SIGKILLs them, too short to save a
sharded ViT-g checkpoint to S3; the launcher raises that to SHUTDOWN_TIMEOUT_S unless `--shutdown-timeout`
or TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise. The pod's terminationGracePeriodSeconds must exceed it.
"""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def exit_code(failure_code: int) -> int:
    return 128 - failure_code if failure_code < 0 else failure_code


SHUTDOWN_TIMEOUT_S = 300


def parse_args(argv: list[str] | None = None):
    args = get_args_parser().parse_args(argv)
    if args.shutdown_timeout is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        print(f"vfm.train.torchrun: worker {first.local_rank} (pid {first.pid}) failed first with exit code "
              f"{first.exitcode}", file=sys.stderr)
        return exit_code(first.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
