"""Unit tests of the trainer's parts: param groups, schedules, checkpoints (local and S3), head mapping,
launcher exit codes."""

from __future__ import annotations

import json

import pytest
import torch

from vfm.models import build_model
from vfm.recipes import load_recipe
from vfm.recipes.derive import resolve_stage
from vfm.tasks.supervised import map_head_rows
from vfm.train.checkpoint import MARKER, Checkpointer, step_dir
from vfm.train.optim import Schedules, build_optimizer, param_groups
from vfm.train.torchrun import exit_code


def _recipe(*sets: str, rid: str = "vit-huge"):
    return load_recipe(rid, ["hardware.gpus=1", *sets], profile="smoke")


def test_no_weight_decay_on_norms_biases_and_tokens():
    r = _recipe()
    model = build_model(r, "pretrain", num_classes=4)
    groups = param_groups(model, r.stages["pretrain"].optim)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim <= 1 or n in ("pos_embed", "cls_token")
            assert (g["weight_decay"] == 0.0) == no_decay, n
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_layer_decay_scales_lr_by_depth_for_finetuning():
    r = _recipe()
    st = r.stages["finetune"]
    assert st.optim.layer_decay == 0.75
    model = build_model(r, "finetune", num_classes=4)
    groups = param_groups(model, st.optim)
    opt = build_optimizer(groups, st.optim, peak_lr=1.0, device=torch.device("cpu"))
    scale_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            scale_of[names[id(p)]] = g["lr_scale"]
    depth = len(model.blocks)  # smoke ViT: 2 blocks → layers embed(0), block0(1), block1(2), head(3)
    assert scale_of["head.weight"] == 1.0
    assert scale_of["blocks.1.attn.qkv.weight"] == pytest.approx(0.75)
    assert scale_of["blocks.0.attn.qkv.weight"] == pytest.approx(0.75 ** 2)
    assert scale_of["patch_embed.proj.weight"] == pytest.approx(0.75 ** (depth + 1))


def test_warmup_is_exact_in_updates_then_cosine_to_min():
    r = _recipe("stages.pretrain.optim.warmup_steps=10", "stages.pretrain.optim.min_lr=1e-5",
                "stages.pretrain.steps=110")
    o = r.stages["pretrain"].optim
    model = build_model(r, "pretrain", num_classes=4)
    opt = build_optimizer(param_groups(model, o), o, peak_lr=1e-3, device=torch.device("cpu"))
    stage = resolve_stage(r, "pretrain", 1, num_samples=8 * r.stages["pretrain"].batch.global_batch)
    assert (stage.total_steps, stage.warmup_steps) == (110, 10)
    s = Schedules(opt, o, peak_lr=1e-3, total_steps=stage.total_steps, warmup_steps=stage.warmup_steps)
    lrs = []
    for step in range(110):
        s.apply(step)
        lrs.append(s.current_lr())
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)
    # no-decay groups stay at zero, decayed groups at the recipe's value
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, o.weight_decay}


def test_warmup_epochs_use_updates_per_epoch_and_frozen_groups_get_zero_lr():
    r = _recipe("stages.pretrain.optim.warmup_steps=null", "stages.pretrain.optim.warmup_epochs=1.5",
                "stages.pretrain.optim.weight_decay_end=0.2", "stages.pretrain.steps=40")
    o = r.stages["pretrain"].optim
    model = build_model(r, "pretrain", num_classes=4)
    groups = param_groups(model, o)
    groups[0]["frozen_until_step"] = 5
    opt = build_optimizer(groups, o, peak_lr=1e-3, device=torch.device("cpu"))
    # 10 updates per epoch: a warmup of 1.5 epochs is 15 updates
    stage = resolve_stage(r, "pretrain", 1, num_samples=10 * r.stages["pretrain"].batch.global_batch)
    assert stage.steps_per_epoch == 10 and stage.warmup_steps == 15
    s = Schedules(opt, o, peak_lr=1e-3, total_steps=stage.total_steps, warmup_steps=stage.warmup_steps)
    assert s.warmup == 15
    s.apply(4)
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[1]["lr"] > 0
    s.apply(39)
    decayed = [g["weight_decay"] for g in opt.param_groups if g["wd_scale"] > 0]
    assert decayed and all(w == pytest.approx(0.2, rel=0.01) for w in decayed)


def test_warmup_longer_than_run_is_a_recipe_error():
    from vfm.recipes import RecipeError

    r = _recipe("stages.pretrain.optim.warmup_steps=50", "stages.pretrain.steps=20")
    o = r.stages["pretrain"].optim
    opt = build_optimizer(param_groups(build_model(r, "pretrain", num_classes=4), o), o, 1e-3, torch.device("cpu"))
    with pytest.raises(RecipeError, match="warmup of 50 updates"):
        Schedules(opt, o, peak_lr=1e-3, total_steps=20, warmup_steps=resolve_stage(r, "pretrain", 1).warmup_steps)


# ---- checkpoints --------------------------------------------------------------------------------
def _roundtrip(root: str):
    ck = Checkpointer(root, keep=2, rank=0, world_size=1)
    assert ck.latest() is None
    for step in (4, 8, 12):
        ck.save(step, {"model": {"w": torch.full((3,), float(step))}}, {"step": step}, {"rng": [step, "x"]})
    assert ck.latest() == 12
    complete, all_steps = ck._steps()
    assert complete == [8, 12] and all_steps == [8, 12]  # keep-last-K purged step 4
    tensors = {"model": {"w": torch.zeros(3)}}
    objects, mine = ck.load(8, tensors)
    assert torch.equal(tensors["model"]["w"], torch.full((3,), 8.0))
    assert objects == {"step": 8} and mine == {"rng": [8, "x"]}
    return ck


def test_local_checkpoints_marker_keep_last_k_and_half_written_ignored(tmp_path):
    ck = _roundtrip(str(tmp_path / "ckpt"))
    # a newer step whose save was interrupted: files but no marker → never loaded
    partial = tmp_path / "ckpt" / step_dir(16)
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert ck.latest() == 12
    info = json.loads((tmp_path / "ckpt" / step_dir(12) / MARKER).read_text())
    assert info["step"] == 12 and info["world_size"] == 1
    # saving that step again replaces the half-written directory
    ck.save(16, {"model": {"w": torch.ones(3)}}, {"step": 16}, {})
    assert ck.latest() == 16 and (partial / "__0_0.distcp").read_bytes() != b"half"


def test_s3_checkpoints_marker_uploaded_last(bucket, s3_endpoint, monkeypatch):
    from vfm.storage import s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    ck = _roundtrip(f"s3://{bucket}/run/checkpoints")
    client = s3_client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/")["Contents"]]
    assert f"run/checkpoints/{step_dir(12)}/{MARKER}" in keys
    assert not [k for k in keys if step_dir(4) in k]
    # an upload that died before its marker is not a checkpoint
    client.put_object(Bucket=bucket, Key=f"run/checkpoints/{step_dir(20)}/.metadata", Body=b"partial")
    assert ck.latest() == 12


# ---- fine-tuning head, launcher -------------------------------------------------------------------
def test_head_rows_mapped_by_wnid_missing_class_keeps_fresh_row():
    src_w, src_b = torch.arange(12.0).reshape(4, 3), torch.arange(4.0)
    dst_w, dst_b = torch.full((3, 3), -1.0), torch.full((3,), -1.0)
    n = map_head_rows(src_w, src_b, ["a", "b", "c", "d"], dst_w, dst_b, ["c", "teddy", "a"])
    assert n == 2
    assert torch.equal(dst_w[0], src_w[2]) and torch.equal(dst_w[2], src_w[0]) and dst_b[0] == 2 and dst_b[2] == 0
    assert torch.equal(dst_w[1], torch.full((3,), -1.0)) and dst_b[1] == -1.0


@pytest.mark.parametrize(("code", "expected"), [(-15, 143), (-9, 137), (143, 143), (1, 1), (2, 2)])
def test_launcher_maps_worker_signal_deaths_to_retryable_codes(code, expected):
    assert exit_code(code) == expected


# ---- the command line -----------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["vit-huge", "--stage", "distill"], "has no stage `distill`"),
    (["convnext-xl", "--stage", "pretrain", "--set", "stages.pretrain.batch.micro_batch=3", "--set",
      "stages.pretrain.batch.global_batch=12"], "must be even with Mixup"),
    (["vit-huge", "--stage", "pretrain"], "no manifest at"),
])
def test_cli_bad_input_exits_2_with_a_message(args, message, monkeypatch, capsys, tmp_path):
    from vfm.trainer import main

    monkeypatch.setattr("sys.argv", ["vfm.trainer", *args, "--data", str(tmp_path / "nowhere"), "--out",
                                     str(tmp_path / "out"), "--profile", "smoke"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_launcher_gives_workers_time_to_save_after_sigterm(monkeypatch):
    from vfm.train.torchrun import SHUTDOWN_TIMEOUT_S, parse_args

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    tail = ["--nproc-per-node", "2", "-m", "vfm.trainer", "vit-huge"]
    assert parse_args(tail).shutdown_timeout == SHUTDOWN_TIMEOUT_S > 30
    assert parse_args(["--shutdown-timeout", "45", *tail]).shutdown_timeout == 45
