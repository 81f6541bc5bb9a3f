"""`torchrun` that keeps the trainer's exit code: the container command of every PyTorchJob replica.

    python -m vfm.launch.torchrun -m vfm.train RECIPE --stage pretrain ...

Plain `torchrun` exits 1 whenever a worker fails (it raises `ChildFailedError`), so a trainer that
exits 143 after SIGTERM (preemption: retryable) and one that exits 2 on a bad recipe (permanent) look
the same to the training operator, and the `ExitCode` restart policy (retry only codes ≥ 128) cannot
work. This wrapper runs the same `torch.distributed.run` (flags and `PET_*` env defaults unchanged) and
exits with the root-cause worker's code; a worker killed by signal N and a SIGTERM/SIGINT delivered to
the agent itself both become 128 + N, the shell convention the operator treats as retryable.
"""

from __future__ import annotations

import sys


def exit_code_of(code: int) -> int:
    """Process return code → container exit code (negative = killed by that signal)."""
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = exit_code_of(failure.exitcode)
        print(f"vfm.launch.torchrun: rank {rank} failed first with exit code {code}", file=sys.stderr)
        return code or 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
