"""The local backend runs a PyTorchJob spec as processes with the operator's env: a real 2-replica
gloo all-reduce, the ExitCode restart policy, our restart cap and the deadline."""

from __future__ import annotations

import json
import textwrap

import pytest

from vfm.launch import JobFailed, JobOptions, JobTimeout, build_job, to_manifest
from vfm.launch.local import LocalBackend
from vfm.recipes import load_recipe

SCRIPT = textwrap.dedent("""
    import json, os, pathlib, sys, time

    out = pathlib.Path(os.environ["OUT"])
    mode = os.environ.get("MODE", "ok")
    rank_node = os.environ["PET_NODE_RANK"]
    if mode == "flaky" and rank_node == "0" and not (out / "attempted").exists():
        (out / "attempted").write_text("1")
        sys.exit(143)  # SIGTERM-style: retryable
    if mode == "permanent":
        sys.exit(3)
    if mode == "sleep":
        time.sleep(600)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    keys = ["MASTER_ADDR", "WORLD_SIZE", "RANK", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "GROUP_RANK"]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"sum": t.item(), "world": dist.get_world_size(), **{k: os.environ.get(k) for k in keys}}))
    dist.destroy_process_group()
""")


def two_replica_job(tmp_path, mode: str, nodes: int = 2, torchrun: bool = True):
    script = tmp_path / "allreduce.py"
    script.write_text(SCRIPT)
    recipe = load_recipe("vit-huge", profile="smoke", overrides=[f"hardware.gpus={nodes}", "hardware.gpus_per_node=1",
                                                                "stages.pretrain.batch.micro_batch=4",
                                                                f"stages.pretrain.batch.global_batch={4 * nodes}",
                                                                "stages.finetune.batch.micro_batch=4",
                                                                f"stages.finetune.batch.global_batch={4 * nodes}"])
    m = to_manifest(build_job(recipe, JobOptions(name="local-test", namespace="default",
                                                 image="ghcr.io/x/t:1", args=[], secret=None,
                                                 env={"OUT": str(tmp_path), "MODE": mode})))
    # the exit-code-keeping torchrun with a tiny script instead of vfm.trainer; exit-code policy tests that
    # never reach torch.distributed skip torchrun's start-up (seconds per process on 2 shared cores)
    command = ["python", "-m", "vfm.train.torchrun", str(script)] if torchrun else ["python", str(script)]
    for rep in m["spec"]["pytorchReplicaSpecs"].values():
        rep["template"]["spec"]["containers"][0]["command"] = command
    return m


def test_two_replicas_all_reduce_after_a_retryable_failure(tmp_path):
    m = two_replica_job(tmp_path, "flaky")
    assert list(m["spec"]["pytorchReplicaSpecs"]) == ["Master", "Worker"]
    lines: list[str] = []
    result = LocalBackend(log=lines.append).run(m, timeout_s=120, max_restarts=1)
    assert result.restarts == 1 and result.state == "Succeeded"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [3.0, 3.0] and {r["world"] for r in ranks} == {2}
    assert [r["PET_NODE_RANK"] for r in ranks] == ["0", "1"] and [r["GROUP_RANK"] for r in ranks] == ["0", "1"]
    assert {r["PET_NNODES"] for r in ranks} == {"2"} and {r["PET_NPROC_PER_NODE"] for r in ranks} == {"1"}
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"}
    assert any("exited 143 (retryable); restart 1/1" in line for line in lines)


def test_permanent_exit_code_fails_without_restart(tmp_path):
    m = two_replica_job(tmp_path, "permanent", torchrun=False)
    with pytest.raises(JobFailed, match="exited with code 3 .1-127: permanent"):
        LocalBackend(log=lambda _: None).run(m, timeout_s=120, max_restarts=3)


def test_retryable_failures_stop_at_the_restart_cap(tmp_path):
    m = two_replica_job(tmp_path, "flaky", torchrun=False)
    with pytest.raises(JobFailed, match="RestartCapExceeded.*cap 0"):
        LocalBackend(log=lambda _: None).run(m, timeout_s=120, max_restarts=0)


def test_deadline_kills_the_replicas(tmp_path):
    m = two_replica_job(tmp_path, "sleep", torchrun=False)
    with pytest.raises(JobTimeout):
        LocalBackend(log=lambda _: None, grace_s=5).run(m, timeout_s=3, max_restarts=0)
