"""Run a PyTorchJob or TrainJob spec as local processes, with the environment its operator injects.

    LocalBackend().run(manifest, timeout_s=600, max_restarts=2)

Each replica (Master, then Workers) becomes one process running the replica's container command
(`python -m vfm.train.torchrun -m vfm.trainer ...`, the same `nprocPerNode` ranks), with the env the
operator v1.9 sets (pkg/controller.v1/pytorch/envvar.go): PYTHONUNBUFFERED, MASTER_ADDR/PORT,
WORLD_SIZE = replicas × nprocPerNode, RANK = node index, PET_MASTER_ADDR/PORT, PET_NNODES,
PET_NODE_RANK, PET_NPROC_PER_NODE (elastic: PET_RDZV_ENDPOINT/BACKEND, PET_NNODES=min:max,
PET_MAX_RESTARTS). The trainer cannot tell the difference, except that the master's address is
127.0.0.1 instead of the `<job>-master-0` Service, and Secret-backed env vars come from this process's
environment (that is where local credentials live).

A TrainJob (Kubeflow Trainer v2.3) becomes `trainer.numNodes` processes of its trainer container with
the env the torch plugin injects (kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go at
v2.3.0): PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the node's Job completion index),
PET_MASTER_ADDR (`<job>-node-0-0.<job>` there, 127.0.0.1 here) and PET_MASTER_PORT (29500 there, a free
port here) — and nothing else: no MASTER_ADDR, RANK or WORLD_SIZE, which torchrun derives.

The `ExitCode` restart policy is honoured as the operator does: a replica exiting 1–127 fails the job;
≥ 128 (or killed by a signal) restarts it, up to `max_restarts` (our cap; the operator has none). A
restart re-creates every replica because the surviving ranks of a non-elastic job cannot re-join. The
vfm TrainJob runtime has the same semantics (its podFailurePolicy and JobSet failurePolicy), so a
TrainJob restarts the same way.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfm.launch import trainjob as tj
from vfm.launch.cluster import _sigterm_raises, kind_of
from vfm.launch.job import CONTAINER
from vfm.launch.result import JobFailed, JobResult, JobTimeout
from vfm.services import free_port
from vfm.train.torchrun import exit_code as exit_code_of

TAIL_LINES = 30


@dataclass
class _Replica:
    kind: str  # Master / Worker
    index: int  # within its kind
    node_rank: int
    container: dict[str, Any]
    proc: subprocess.Popen | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    @property
    def pod(self) -> str:
        return f"{self.kind.lower()}-{self.index}"


def replicas_of(manifest: dict[str, Any]) -> list[_Replica]:
    """Master first (node rank 0), then Workers 1..n, as the operator numbers them; a TrainJob's nodes
    0..numNodes-1 (the completion indexes of its `node` Job)."""
    if kind_of(manifest).kind == tj.KIND:
        trainer = manifest["spec"].get("trainer") or {}
        container = {"name": tj.NODE, **{k: trainer[k] for k in ("command", "args", "env") if k in trainer}}
        return [_Replica("Node", i, i, container) for i in range(int(trainer.get("numNodes") or 1))]
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    unknown = set(specs) - {"Master", "Worker"}
    if unknown:
        raise JobFailed(manifest["metadata"]["name"], "InvalidSpec", f"unknown replica types {sorted(unknown)}")
    out: list[_Replica] = []
    for kind in ("Master", "Worker"):
        spec = specs.get(kind)
        if spec is None:
            continue
        containers = spec["template"]["spec"]["containers"]
        container = next((c for c in containers if c["name"] == CONTAINER), None)
        if container is None:
            raise JobFailed(manifest["metadata"]["name"], "InvalidSpec", f"{kind} has no container named {CONTAINER}")
        for i in range(int(spec.get("replicas", 1))):
            out.append(_Replica(kind, i, len(out), container))
    if specs.get("Master") and int(specs["Master"].get("replicas", 1)) != 1:
        raise JobFailed(manifest["metadata"]["name"], "InvalidSpec", "Master replicas must be 1")
    return out


def trainer_v2_env(manifest: dict[str, Any], replica: _Replica, total: int, port: int) -> dict[str, str]:
    """The variables Trainer v2's torch plugin adds to the `node` container of `replica`. `numProcPerNode`
    unset is `auto`, which the plugin resolves to the CPU count per node when the node has no GPU."""
    trainer = manifest["spec"].get("trainer") or {}
    nproc = trainer.get("numProcPerNode")
    return {"PET_NNODES": str(total), "PET_NPROC_PER_NODE": str(nproc if nproc is not None else "auto"),
            "PET_NODE_RANK": str(replica.node_rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}


def operator_env(manifest: dict[str, Any], replica: _Replica, total: int, port: int) -> dict[str, str]:
    """The variables the operator adds to the `pytorch` container of `replica` (Trainer v2's for a TrainJob)."""
    if kind_of(manifest).kind == tj.KIND:
        return trainer_v2_env(manifest, replica, total, port)
    spec = manifest["spec"]
    nproc = str(spec.get("nprocPerNode", "auto"))
    env = {"PYTHONUNBUFFERED": "1", "PET_NPROC_PER_NODE": nproc}
    elastic = spec.get("elasticPolicy")
    if elastic:
        lo, hi = elastic.get("minReplicas"), elastic.get("maxReplicas")
        env.update(PET_RDZV_ENDPOINT=f"127.0.0.1:{port}", PET_RDZV_BACKEND=elastic.get("rdzvBackend", "c10d"),
                   PET_NNODES=f"{lo}:{hi}" if lo and hi else str(total))
        if elastic.get("maxRestarts") is not None:
            env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
        return env
    procs = int(nproc) if nproc.isdigit() else 1  # the operator counts auto/cpu/gpu as 1
    env.update(MASTER_ADDR="127.0.0.1", PET_MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PET_MASTER_PORT=str(port), WORLD_SIZE=str(total * procs), RANK=str(replica.node_rank),
               PET_NODE_RANK=str(replica.node_rank), PET_NNODES=str(total))
    return env


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """Literal env values; Secret/ConfigMap references resolve from this process's environment."""
    out: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            out[item["name"]] = str(item["value"])
        elif item["name"] in os.environ:
            out[item["name"]] = os.environ[item["name"]]
    return out


def local_command(container: dict[str, Any]) -> list[str]:
    """The container's command + args with `python` meaning this interpreter (the image's venv locally)."""
    cmd = list(container.get("command") or []) + list(container.get("args") or [])
    if not cmd:
        raise JobFailed("", "InvalidSpec", "container has no command; the local backend cannot use an image ENTRYPOINT")
    if cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable
    elif cmd[0] in ("torchrun",):
        cmd[:1] = [sys.executable, "-m", "torch.distributed.run"]
    elif shutil.which(cmd[0]) is None:
        raise JobFailed("", "InvalidSpec", f"command {cmd[0]!r} is not installed locally")
    return cmd


@dataclass
class LocalBackend:
    env: dict[str, str] = field(default_factory=dict)
    """Extra env for every replica (e.g. the embedded S3/MLflow endpoints)."""
    workdir: Path | None = None
    log: Callable[[str], None] = print
    grace_s: float = 15.0
    poll_s: float = 0.2

    def run(self, manifest: dict[str, Any], *, timeout_s: float, max_restarts: int) -> JobResult:
        name, kind = manifest["metadata"]["name"], kind_of(manifest)
        spec = manifest["spec"]
        deadline_s = spec.get("activeDeadlineSeconds") or spec.get("runPolicy", {}).get("activeDeadlineSeconds")
        timeout_s = min(timeout_s, deadline_s) if deadline_s else timeout_s
        start = time.monotonic()
        restarts = 0
        with _sigterm_raises():
            while True:
                reps = replicas_of(manifest)
                try:
                    self._start(manifest, reps)
                    failed = self._wait(name, kind.kind, reps, start + timeout_s, timeout_s)
                finally:
                    self._stop(reps)
                if failed is None:
                    self.log(f"{kind.kind} {name} {kind.complete} (local, {len(reps)} replicas, {restarts} restarts)")
                    return JobResult(name=name, state=kind.complete, restarts=restarts,
                                     seconds=time.monotonic() - start)
                code = exit_code_of(failed.proc.returncode)
                tail = "\n".join(failed.tail)
                if code < 128:
                    raise JobFailed(name, "ExitCode", f"{failed.pod} exited with code {code} (1-127: permanent, "
                                    f"not restarted); last lines:\n{tail}", kind=kind.kind)
                if restarts >= max_restarts:
                    raise JobFailed(name, "RestartCapExceeded", f"{failed.pod} exited with retryable code {code} "
                                    f"after {restarts} restarts (cap {max_restarts}); last lines:\n{tail}", kind=kind.kind)
                restarts += 1
                self.log(f"{kind.kind} {name}: {failed.pod} exited {code} (retryable); restart {restarts}/"
                         f"{max_restarts} of all replicas")

    def _start(self, manifest: dict[str, Any], reps: list[_Replica]) -> None:
        port = free_port()
        name = manifest["metadata"]["name"]
        cwd = self.workdir / name if self.workdir else None
        for rep in reps:
            env = {**os.environ, **self.env, **container_env(rep.container),
                   **operator_env(manifest, rep, len(reps), port)}
            if cwd is not None:
                (cwd / rep.pod).mkdir(parents=True, exist_ok=True)
            rep.proc = subprocess.Popen(
                local_command(rep.container), env=env, cwd=cwd / rep.pod if cwd else None,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            threading.Thread(target=self._pump, args=(f"{name}-{rep.pod}", rep), daemon=True).start()

    def _pump(self, prefix: str, rep: _Replica) -> None:
        assert rep.proc is not None and rep.proc.stdout is not None
        for raw in rep.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            rep.tail.append(line)
            self.log(f"[{prefix}] {line}")

    def _wait(self, name: str, kind: str, reps: list[_Replica], deadline: float, timeout_s: float) -> _Replica | None:
        """None when every replica exited 0; else the first replica that failed."""
        while True:
            codes = [r.proc.poll() for r in reps if r.proc is not None]
            for rep in reps:
                if rep.proc is not None and rep.proc.returncode not in (None, 0):
                    return rep
            if all(c == 0 for c in codes):
                return None
            if time.monotonic() >= deadline:
                raise JobTimeout(name, f"not finished after {timeout_s:.0f} s (local backend)", kind=kind)
            time.sleep(self.poll_s)

    def _stop(self, reps: list[_Replica]) -> None:
        """SIGTERM every live replica's process group, then SIGKILL after the grace period."""
        live = [r.proc for r in reps if r.proc is not None and r.proc.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        end = time.monotonic() + self.grace_s
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, sig)
