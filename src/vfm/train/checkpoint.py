"""Step checkpoints with `torch.distributed.checkpoint` (DCP), in a directory or under an s3:// prefix.

    <root>/step-000120/   .metadata, __0_0.distcp, __1_0.distcp, ...   (DCP: every rank writes its shards)
    <root>/step-000120/COMPLETE                                         (written last, by rank 0)

A checkpoint counts only once COMPLETE exists: it is written after every rank has finished (a barrier),
so a step directory left half-written by a killed pod is never loaded (it is deleted by the next purge).
For s3:// every rank writes its own DCP files straight to the bucket (multipart uploads, vfm.train.dcp_s3)
and reads back only the byte ranges it needs: no local staging, no whole-checkpoint download per node.

`save(..., asynchronous=True)` is `dcp.async_save`: the state is copied to host memory and written by a
background thread (its collectives on a gloo group of their own) while training goes on; the step is
committed (barrier, COMPLETE, purge) when the next save or `wait()` finds it written.

What a run's checkpoint holds is `TrainState`: every source of randomness and order — model,
optimiser, grad scaler, schedule, task state (EMA / teacher), the data loader's position and the
torch / numpy / python RNG states of every rank — so a run killed after a checkpoint and restarted
ends with the same parameters as one that never stopped (bit-exact on CPU). torchtitan keeps the same
split: what is saved (`ModelWrapper`, `OptimizersContainer`, ...) next to how (`CheckpointManager`,
torchtitan/components/checkpoint.py).

Tensors (model, optimiser, task state; possibly DTensor shards) go through DCP's structured path.
Plain Python state is stored as one opaque `bytes` value per key so its nesting need not be known in
advance to load it: `objects` (same on every rank: step, scaler, scheduler) under `objects`, and
per-rank state (RNG, data-loader position) under `rank<N>` so DCP does not deduplicate it across ranks.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from vfm import storage
from vfm.dist import barrier, broadcast_object
from vfm.errors import UserError
from vfm.train.dcp_s3 import S3Reader, S3Writer
from vfm.train.optim import Schedules
from vfm.train.task import StatefulLoader, Task

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(step: int) -> str:
    return f"step-{step:06d}"


class Checkpointer:
    """Save / find / load / purge step checkpoints of one run (collective calls: every rank calls them)."""

    def __init__(self, root: str, *, keep: int, rank: int, world_size: int):
        if keep < 1:
            raise ValueError("keep must be ≥ 1")
        self.root, self.keep, self.rank, self.world_size = str(root).rstrip("/"), keep, rank, world_size
        self._pending: tuple[Any, int, str, float] | None = None  # an async save in flight
        self._async_group: Any = None

    # ---- finding -------------------------------------------------------------------------------
    def _steps(self) -> tuple[list[int], list[int]]:
        """(complete steps, all step directories), sorted."""
        names: dict[int, bool] = {}
        if storage.is_s3(self.root):
            for url in storage.list_prefix(self.root):
                parts = url[len(self.root) + 1:].split("/")
                if len(parts) == 2 and (m := _STEP_DIR.match(parts[0])):
                    step = int(m.group(1))
                    names[step] = names.get(step, False) or parts[1] == MARKER
        elif Path(self.root).is_dir():
            for p in Path(self.root).iterdir():
                if p.is_dir() and (m := _STEP_DIR.match(p.name)):
                    names[int(m.group(1))] = (p / MARKER).is_file()
        return sorted(s for s, ok in names.items() if ok), sorted(names)

    def latest(self) -> int | None:
        """Newest complete step (decided on rank 0 and broadcast, so all ranks agree)."""
        found = None
        if self.rank == 0:
            complete, _ = self._steps()
            found = complete[-1] if complete else None
        return broadcast_object(found) if self.world_size > 1 else found

    # ---- saving --------------------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, Any], objects: dict[str, Any], rank_objects: dict[str, Any],
             *, asynchronous: bool = False) -> str:
        """Write `tensors` (DCP, possibly sharded), replicated `objects` and this rank's `rank_objects`;
        then mark the step complete (an asynchronous save: once written, at the next save or `wait`)."""
        self.wait()  # one save in flight at a time, committed in order
        t0 = time.perf_counter()
        name = step_dir(step)
        full = {**tensors, "objects": _pack(objects), f"rank{self.rank}": _pack(rank_objects)}
        url = f"{self.root}/{name}"
        if self.rank == 0:  # a half-written attempt at this step (killed pod) is replaced, not mixed in
            if storage.is_s3(self.root):
                storage.delete_prefix(url)
            else:
                shutil.rmtree(url, ignore_errors=True)
                Path(url).mkdir(parents=True)
        barrier()
        where: dict[str, Any] = ({"storage_writer": S3Writer(url)} if storage.is_s3(self.root)
                                 else {"checkpoint_id": url})
        if asynchronous:
            if self._async_group is None and dist.is_initialized():
                # the background writer's collectives must not interleave with the training step's
                self._async_group = dist.new_group(backend="gloo")
            future = dcp.async_save(full, process_group=self._async_group, **where)
            self._pending = (future, step, name, t0)
            log.info("checkpoint %s: state staged in %.1fs, writing in the background", url, time.perf_counter() - t0)
            return url
        dcp.save(full, **where)
        self._commit(step, name, t0)
        return url

    def wait(self) -> None:
        """Finish the asynchronous save in flight, if any, and commit it (collective)."""
        if self._pending is None:
            return
        future, step, name, t0 = self._pending
        self._pending = None
        future.result()
        self._commit(step, name, t0)

    def _commit(self, step: int, name: str, t0: float) -> None:
        barrier()  # every rank's shards are durable before the marker says so
        if self.rank == 0:
            self._write_marker(name, {"step": step, "world_size": self.world_size, "torch": torch.__version__,
                                      "time": time.time()})
            self._purge()
        barrier()
        log.info("checkpoint %s/%s saved in %.1fs", self.root, name, time.perf_counter() - t0)

    def _write_marker(self, name: str, info: dict) -> None:
        # atomic: the marker is either absent or whole (a local temp name renamed; one S3 PUT)
        storage.write_bytes(f"{self.root}/{name}/{MARKER}", json.dumps(info).encode())

    def _purge(self) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones and any stale partial directory."""
        complete, all_steps = self._steps()
        keep = set(complete[-self.keep:])
        newest = complete[-1] if complete else -1
        for step in all_steps:
            if step in keep or step > newest:  # never touch a newer directory another save may be writing
                continue
            self._delete(step_dir(step))

    def _delete(self, name: str) -> None:
        # the marker goes first so a partly deleted step is never taken for a complete one
        storage.delete(f"{self.root}/{name}/{MARKER}")
        storage.delete_prefix(f"{self.root}/{name}")

    # ---- loading -------------------------------------------------------------------------------
    def load(self, step: int, tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load `tensors` in place from checkpoint `step`; returns (objects, this rank's objects)."""
        name = step_dir(step)
        key = f"rank{self.rank}"
        full = {**tensors, "objects": b"", key: b""}
        url = f"{self.root}/{name}"
        reader = S3Reader(url) if storage.is_s3(self.root) else dcp.FileSystemReader(url)
        if key not in reader.read_metadata().state_dict_metadata:
            raise UserError(f"checkpoint {self.root}/{name} has no state for rank {self.rank}: it was "
                            f"written by a different number of processes; resume with the same world size")
        # each rank reads only its own items' byte ranges (ranged GETs on S3)
        dcp.load(full, storage_reader=S3Reader(url) if storage.is_s3(self.root) else dcp.FileSystemReader(url))
        tensors.update({k: v for k, v in full.items() if k not in (key, "objects")})
        return _unpack(full["objects"]), _unpack(full[key])


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(blob: bytes) -> Any:
    # our own checkpoint, written by this code: full unpickling is needed for numpy / python RNG states
    return torch.load(io.BytesIO(blob), weights_only=False)


# ---- what a run's checkpoint holds ----------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainState:
    """Everything a checkpoint holds, saved and restored together (see the module docstring)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    task: Task
    scaler: torch.amp.GradScaler | None
    schedules: Schedules
    loader: StatefulLoader

    def _tensors(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # DCP-ready under DDP and FSDP2
        return {"model": model_sd, "optim": optim_sd, "task": self.task.state_dict()}

    def save(self, ckpt: Checkpointer, step: int, *, asynchronous: bool = False) -> None:
        objects = {"step": step, "scaler": self.scaler.state_dict() if self.scaler else None,
                   "schedule": self.schedules.state_dict()}
        ckpt.save(step, self._tensors(), objects, {"rng": rng_state(), "loader": self.loader.state_dict()},
                  asynchronous=asynchronous)

    def restore(self, ckpt: Checkpointer, step: int) -> int:
        tensors = self._tensors()
        objects, mine = ckpt.load(step, tensors)
        set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optim"])
        self.task.load_state_dict(tensors["task"])
        if self.scaler is not None and objects["scaler"] is not None:
            self.scaler.load_state_dict(objects["scaler"])
        self.schedules.load_state_dict(objects["schedule"])
        try:
            self.loader.load_state_dict(mine["loader"])
        except ValueError as exc:  # e.g. another world size / worker count: the position does not transfer
            raise UserError(f"checkpoint step {step}: cannot restore the data position: {exc}") from None
        set_rng_state(mine["rng"])
        return int(objects["step"])
