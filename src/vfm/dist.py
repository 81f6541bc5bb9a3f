"""The process group, for training and evaluation alike, and the few collectives vfm needs.

Each collective is a no-op outside `torch.distributed` (a world of one), so the same code runs in a
pod, under torchrun on one machine and in a plain process.

Setup comes from the environment torchrun (and the PyTorchJob operator) provides.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for each process it starts;
the training operator sets MASTER_ADDR/PORT, WORLD_SIZE and RANK (= node rank) on each pod, which is
also the process rank when a pod runs one process without torchrun. A plain `python -m vfm.trainer`
with none of these set runs as a world of one on a loopback rendezvous, so the code path (DCP,
FSDP meshes, barriers) is the same everywhere.

Evaluation shards the data so that every sample is seen by exactly one rank. Ranks therefore hold
*different* numbers of samples, and `all_gather` needs equal shapes: `all_gather_uneven` pads to the
largest rank and trims each part back to its true length, so no padded row ever reaches a metric.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vfm.errors import UserError
from vfm.services import free_port


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    node_rank: int = 0
    """This process's node: torchrun's GROUP_RANK (the PyTorchJob's pod index), else rank // LOCAL_WORLD_SIZE."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; torchrun or the "
                        "PyTorchJob operator should set it") from None


def init_distributed(timeout_s: float = 1800) -> DistInfo:
    """Join (or create) the default process group: NCCL on CUDA, gloo on CPU."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise UserError(f"WORLD_SIZE={world} but MASTER_ADDR is not set; start with torchrun or set "
                        "MASTER_ADDR/MASTER_PORT as the PyTorchJob operator does")
    if world == 1:  # a lone local process: private loopback rendezvous
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                **kwargs)
    node_rank = _env_int("GROUP_RANK", rank // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                    node_rank=node_rank)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks take the same branch)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def mean_tensor_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `t` over ranks, on its device (no host sync: the caller decides when to read it)."""
    t = t.to(torch.float64)
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable value); the value itself without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed() and dist.get_world_size() > 1:
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor on the input's device). Counts stay exact in int64/float64."""
    if not is_distributed():
        return tensor.clone()
    work = tensor.to(_comm_device(tensor)).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 in rank order; ranks may hold different row counts."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    device = _comm_device(tensor)
    n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(tensor.device)
