"""Two CPU ranks under torchrun (gloo), on tiny shards made with vfm.data, through the real entry point
`python -m vfm.train.torchrun --nproc-per-node 2 -m vfm.trainer ...`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.training import EASY, losses, run, stage_sets, train_cmd
from vfm.export import load_export
from vfm.train.checkpoint import MARKER


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a / "export" / "weights.pt"), torch.load(b / "export" / "weights.pt")
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"parameters differ: {differ[:5]}"


def _complete(out: Path) -> list[int]:
    ck = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ck.iterdir() if (p / MARKER).is_file()) if ck.is_dir() else []


# ---- the three supervised seeds learn under DDP and FSDP2 ------------------------------------------
@pytest.fixture(scope="module")
def convnext_pretrained(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convnext-pre")
    log = _ok(run(train_cmd("convnext-xl", "pretrain", shards, out, "--set", "stages.pretrain.parallelism=fsdp",
                            *stage_sets("pretrain", (*EASY, "checkpoint_every_steps=4")))))
    (out / "log.txt").write_text(log)
    return out


def _learned(log: str) -> None:
    ls = losses(log)
    assert len(ls) == 12 and all(v == v for v in ls)
    assert sum(ls[-3:]) / 3 < 0.6 * sum(ls[:3]) / 3, ls


def test_convnext_xl_learns_under_fsdp2(convnext_pretrained):
    _learned((convnext_pretrained / "log.txt").read_text())
    model, meta = load_export(convnext_pretrained / "export")
    assert meta.timm_name == "convnext_atto" and meta.num_classes == 4 and meta.step == 12
    assert _complete(convnext_pretrained) == [8, 12]  # every 4 steps, keep_checkpoints=2 in the smoke profile


def test_vit_huge_pretrain_learns_under_ddp(shards, tmp_path):
    log = _ok(run(train_cmd("vit-huge-pretrain", "pretrain", shards, tmp_path, "--set",
                            "stages.pretrain.parallelism=ddp", *stage_sets("pretrain", EASY))))
    _learned(log)


def test_vit_huge_learns_under_fsdp2_and_logs_to_mlflow(shards, tmp_path, mlflow_uri, s3_endpoint):
    from mlflow.tracking import MlflowClient

    key = f"train-test-{time.time_ns()}"
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "AWS_ENDPOINT_URL_S3": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    log = _ok(run(train_cmd("vit-huge", "pretrain", shards, tmp_path, "--run-key", key, "--system-metrics",
                            *stage_sets("pretrain", EASY)), env=env))
    _learned(log)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vfm/vit-huge")
    (found,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`vfm.run_key` = '{key}'")
    assert found.info.status == "FINISHED"
    history = [m.value for m in client.get_metric_history(found.info.run_id, "train/loss")]
    assert history == pytest.approx(losses(log), abs=1e-4)
    for name in ("train/lr", "train/grad_norm", "train/images_per_s", "train/step_time_s",
                 "train/tflops_per_device", "train/peak_memory_gb"):
        assert name in found.data.metrics, name
    arts = {a.path for a in client.list_artifacts(found.info.run_id, "export")}
    assert arts == {"export/model.json", "export/weights.pt"}
    # system metrics from the first rank of each node (2 ranks on one node here: node0 only)
    system = {m.split("/")[1] for m in found.data.metrics if m.startswith("system/")}
    assert system == {"node0"} and "system/node0/cpu_utilization_percentage" in found.data.metrics
    model = client.get_logged_model(found.data.tags["vfm.model_id"])  # the export as a model, its loss linked
    assert [(m.key, m.value) for m in model.metrics] == [("train/final_loss", pytest.approx(losses(log)[-1], abs=1e-4))]
    [data] = client.get_run(found.info.run_id).inputs.dataset_inputs  # the UI's Dataset column
    assert data.tags[0].value == "training" and data.dataset.name.endswith("-train")
    assert json.loads(data.dataset.source)["uri"].startswith(str(shards))


def test_two_nodes_each_log_their_system_metrics_into_the_run(shards, tmp_path, mlflow_uri, s3_endpoint):
    """Two torchrun agents with one rank each, as the two pods of a PyTorchJob (a static rendezvous at the master's
    address, each agent its own node rank): rank 0 opens the run and the first rank of each node logs into it."""
    from mlflow.tracking import MlflowClient

    from vfm.services import free_port

    key = f"two-nodes-{time.time_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_uri, "AWS_ENDPOINT_URL_S3": s3_endpoint,
           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    cmd = train_cmd("vit-huge", "pretrain", shards, tmp_path, "--run-key", key, "--system-metrics",
                    *stage_sets("pretrain", (*EASY, "steps=4")))
    at = cmd.index("--nproc-per-node")
    assert cmd[at:at + 3] == ["--nproc-per-node", "2", "--standalone"]
    port = str(free_port())
    nodes = [subprocess.Popen([*cmd[:at], "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", port, *cmd[at + 3:]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for n in (0, 1)]
    try:
        outs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(err[-3000:] for _, err in outs)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vfm/vit-huge")
    (found,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`vfm.run_key` = '{key}'")
    assert found.info.status == "FINISHED" and found.data.params["train.world_size"] == "2"
    system = {m.split("/")[1] for m in found.data.metrics if m.startswith("system/")}
    assert system == {"node0", "node1"}, sorted(found.data.metrics)
    assert {f"system/{n}/system_memory_usage_megabytes" for n in system} <= set(found.data.metrics)


def test_convnext_finetune_from_pretraining_under_ddp(convnext_pretrained, shards5, tmp_path):
    """New head for 5 classes (one the pretraining lacked), EMA exported, layer decay, head_init_scale."""
    _ok(run(train_cmd("convnext-xl", "finetune", shards5, tmp_path, "--init", str(convnext_pretrained / "export"),
                      "--head-from-wnids")))
    model, meta = load_export(tmp_path / "export")
    assert meta.num_classes == 5 and len(meta.wnids) == 5 and meta.stage == "finetune" and meta.extra["ema"]


# ---- exact resume after kill -9 of a rank, and SIGTERM ----------------------------------------------
# the smoke augmentation (RandAugment, colour jitter, crops) plus stochastic depth: every RNG a resume must restore
RESUME = ("steps=16", "checkpoint_every_steps=4", "drop_path=0.1")


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    _ok(run(train_cmd("vit-huge-pretrain", "pretrain", shards, out, *stage_sets("pretrain", RESUME))))
    return out


def _worker_pids(launcher: int) -> dict[int, int]:
    """rank → pid of the workers the launcher started."""
    out = {}
    for tid in os.listdir(f"/proc/{launcher}/task"):
        for child in Path(f"/proc/{launcher}/task/{tid}/children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                out[rank] = int(child)
    return out


def _interrupt(cmd: list[str], ready, action) -> tuple[int, str]:
    """Start `cmd`, wait until `ready()` (a checkpoint is complete), apply `action(launcher_pid)`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        action(proc.pid)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _complete_s3(bucket: str, prefix: str) -> list[int]:
    from vfm.storage import s3_client

    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/checkpoints/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return sorted(int(k.split("/")[-2].split("-")[1]) for k in keys if k.endswith(f"/{MARKER}"))


def test_sigterm_then_kill9_of_a_rank_then_restart_is_bit_exact(shards, straight, tmp_path, bucket, s3_endpoint,
                                                                monkeypatch):
    """Checkpoints on S3 (the pods' path). A pod preempted (SIGTERM → save, 143), restarted, then a rank
    killed outright (kill -9 → 137) after a later checkpoint, restarted again: the final parameters
    equal those of the uninterrupted run, bit for bit."""
    from vfm.storage import s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    out = f"s3://{bucket}/run"
    cmd = train_cmd("vit-huge-pretrain", "pretrain", shards, out, *stage_sets("pretrain", RESUME))
    done = lambda: _complete_s3(bucket, "run")  # noqa: E731

    rc, err = _interrupt(cmd, lambda: 4 in done(), lambda pid: os.kill(pid, signal.SIGTERM))
    assert rc == 143, err[-3000:]  # 128 + SIGTERM: retryable for the PyTorchJob ExitCode policy
    assert "checkpoint saved, exiting 143" in err
    stopped = done()[-1]
    assert 4 < stopped < 16  # SIGTERM saved the update it stopped after (usually 5: off the every-4 schedule)

    after = (stopped // 4 + 1) * 4  # the next scheduled checkpoint of the restarted run
    rc, err = _interrupt(cmd, lambda: after in done(), lambda pid: os.kill(_worker_pids(pid)[1], signal.SIGKILL))
    assert rc == 137, err[-3000:]  # 128 + SIGKILL, also retryable
    assert f"step {stopped} of 16" in err  # the restart resumed from the SIGTERM checkpoint
    killed_at = done()[-1]
    assert after <= killed_at < 16

    log = _ok(run(cmd))
    assert f"step {killed_at} of 16" in log
    (tmp_path / "export").mkdir()
    s3_client().download_file(bucket, "run/export/weights.pt", str(tmp_path / "export" / "weights.pt"))
    _same_weights(straight, tmp_path)


def test_hsdp_meshes_train_like_ddp(shards, tmp_path):
    """HSDP on 2 ranks as (1 replicate × 2 shard) and (2 replicate × 1 shard): the loss curve of DDP."""
    curves = {}
    for name, sets in (("ddp", ["parallelism=ddp"]), ("hsdp-1x2", ["parallelism=hsdp", "hsdp_shard_size=2"]),
                       ("hsdp-2x1", ["parallelism=hsdp", "hsdp_shard_size=1"])):
        log = _ok(run(train_cmd("vit-huge-pretrain", "pretrain", shards, tmp_path / name, "--max-steps", "4",
                                *stage_sets("pretrain", [*sets, "drop_path=0"]))))
        curves[name] = losses(log)
    assert len(curves["ddp"]) == 4
    for name in ("hsdp-1x2", "hsdp-2x1"):
        assert curves[name] == pytest.approx(curves["ddp"], rel=1e-4, abs=1e-5), (name, curves)
