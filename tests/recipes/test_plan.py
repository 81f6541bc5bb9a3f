"""`vfm plan` numbers checked by hand arithmetic."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from vfm.plan import plan
from vfm.recipes import load_recipe


def test_vit_huge_batch_and_steps():
    p = plan(load_recipe("vit-huge"))
    assert (p.gpus, p.nodes) == (64, 8)
    pre, ft = p.stages
    assert (pre.micro_batch, pre.grad_accum, pre.world_size, pre.global_batch) == (32, 1, 64, 2048)
    assert pre.steps_per_epoch == math.ceil(14_197_122 / 2048) == 6933
    assert pre.total_steps == 90 * 6933
    assert pre.warmup_steps == 10_000
    assert ft.resolution == 512 and ft.warmup_steps == 2 * math.ceil(1_281_167 / 512)


def test_gpus_option_changes_accumulation():
    p = plan(load_recipe("vit-huge", ["hardware.gpus=16"]))
    assert p.stages[0].grad_accum == 2048 // (32 * 16) == 4 and p.nodes == 2


def test_flops_params_and_hours_by_hand():
    p = plan(load_recipe("vit-huge-pretrain"), mfu=0.5)
    pre = p.stages[0]
    # ViT-H/14 @224: 32 × (12·257·1280² + 2·257²·1280) MAC + patch embed ≈ 167.3 GMAC = 334.6 GFLOP (perf.md §2)
    assert pre.forward_gflops_per_image == pytest.approx(334.6, rel=0.01)
    assert pre.params / 1e6 == pytest.approx(630.76 + 1280 * 19_167 / 1e6 + 19_167 / 1e6, rel=1e-3)
    assert pre.peak_lr == pytest.approx(2.5e-4 * 4096 / 1024)
    assert pre.grad_accum == 4096 // (64 * 32) == 2
    flops = 3 * pre.forward_gflops_per_image * 1e9 * pre.total_steps * 4096
    assert pre.train_flops == pytest.approx(flops, rel=1e-9)
    assert pre.gpu_hours == pytest.approx(flops / (989e12 * 0.5) / 3600, rel=1e-9)


def test_dinov2_sqrt_scaling_and_multicrop_flops():
    p = plan(load_recipe("dinov2-giant"))
    pre = p.stages[0]
    assert pre.peak_lr == pytest.approx(2e-4 * math.sqrt(3072 / 1024))
    assert pre.steps_per_epoch == 1250 and pre.total_steps == 500 * 1250
    # student fwd+bwd on 2×224 + 8×98 crops, teacher fwd on 2×224: ≈ 7523 GFLOP nominal (perf.md §2b)
    assert pre.train_gflops_per_sample == pytest.approx(7523, rel=0.01)


def test_meta_dinov2_params_claim_is_flagged():
    p = plan(load_recipe("meta-dinov2-giant"))
    assert p.params_claim_millions == 450
    assert p.params_counted_millions == pytest.approx(1134.8, rel=0.01)
    assert any(w.startswith("claims.params_millions: the paper says 450 M") for w in p.warnings)
    assert not any(w.startswith("claims.params_millions") for w in plan(load_recipe("dinov2-giant")).warnings)


def _vfm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfm", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("rid", ["convnext-xl", "dinov2-giant", "meta-dinov2-giant", "vit-huge", "vit-huge-pretrain"])
def test_plan_cli_json_for_every_recipe(rid):
    out = _vfm("plan", rid, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["recipe"] == rid and data["stages"][0]["total_steps"] > 0


def test_cli_bad_input_exits_2_with_one_message():
    out = _vfm("plan", "vit-huge", "--set", "stages.pretrain.batch.micro_batch=48")
    assert out.returncode == 2
    assert "stages.pretrain.batch.global_batch=2048 is not a multiple" in out.stderr
    assert "Traceback" not in out.stderr
    out = _vfm("recipes", "show", "nope")
    assert out.returncode == 2 and "unknown recipe `nope`" in out.stderr


def test_cli_recipes_list_and_show():
    out = _vfm("recipes", "list")
    assert out.returncode == 0
    for rid in ["convnext-xl", "dinov2-giant", "meta-dinov2-giant", "vit-huge"]:
        assert rid[:10] in out.stdout
    out = _vfm("recipes", "show", "vit-huge", "--resolved", "--profile", "smoke")
    assert out.returncode == 0 and "profile: smoke" in out.stdout and "vit_tiny_patch16_224" in out.stdout


def test_duration_claim_is_compared_and_explained():
    p = plan(load_recipe("vit-huge"), mfu=0.4)
    (w,) = [w for w in p.warnings if w.startswith("claims.duration_days")]
    implied = p.total_gpu_hours / (21 * 24)  # the paper's 3 weeks
    assert f"about {implied:,.0f} such GPUs" in w
