"""`vfm plan` numbers checked by hand arithmetic, and its checks of each paper against itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from vfm.plan import GPU_SPECS, CurateRates, curation_estimate, plan
from vfm.recipes import list_recipes, load_recipe

A100, H100 = GPU_SPECS["A100-SXM-80GB"][0], GPU_SPECS["H100-SXM-80GB"][0]
DAY = 86400


def _check(p, name):
    (c,) = [c for c in p.checks if c.name == name]
    return c


def test_peaks_are_the_dense_bf16_datasheet_values():
    assert (A100, H100) == (312e12, 989e12)


def test_vit_huge_batch_steps_and_512px_pretraining():
    p = plan(load_recipe("vit-huge"))
    assert (p.gpus, p.nodes) == (64, 8)
    pre, ft = p.stages
    # "global batch size of 2048 … with gradient accumulation": 64 GPUs × 8 × 4
    assert (pre.micro_batch, pre.grad_accum, pre.world_size, pre.global_batch) == (8, 4, 64, 2048)
    assert _check(p, "stages.pretrain.batch").status == "ok"
    assert pre.steps_per_epoch == math.ceil(14_197_122 / 2048) == 6933
    assert pre.total_steps == 90 * 6933 and pre.warmup_steps == 10_000
    assert ft.warmup_steps == 2000 and (pre.resolution, ft.resolution) == (512, 512)
    # ViT-H/16 at 512 px: 1025 tokens; 32 × (12·T·1280² + 2·T²·1280) MAC + patch embed 1024 × 768 × 1280 MAC
    tokens, d = 1025, 1280
    gflop = 2 * (32 * (12 * tokens * d**2 + 2 * tokens**2 * d) + 1024 * 768 * d) / 1e9
    assert pre.forward_gflops_per_image == pytest.approx(gflop, rel=0.005) and gflop == pytest.approx(1463.9, abs=0.1)
    assert pre.gpu_hours == pytest.approx(3 * gflop * 1e9 * 90 * 6933 * 2048 / (H100 * 0.4) / 3600, rel=0.005)
    # no duration and no GPU count: the plan says so instead of inventing a comparison
    c = _check(p, "claims.duration_days")
    assert c.status == "info" and "neither a GPU count nor a duration" in c.detail


def test_gpus_option_changes_accumulation():
    p = plan(load_recipe("vit-huge", ["hardware.gpus=16"]))
    assert p.stages[0].grad_accum == 2048 // (8 * 16) == 16 and p.nodes == 2


def test_vit_huge_pretrain_duration_implies_a_gpu_count():
    p = plan(load_recipe("vit-huge-pretrain"), mfu=0.5)
    (pre,) = p.stages
    # ViT-H/14 @224: 32 × (12·257·1280² + 2·257²·1280) MAC + patch embed ≈ 167.3 GMAC = 334.6 GFLOP
    assert pre.forward_gflops_per_image == pytest.approx(334.6, rel=0.01)
    assert pre.params / 1e6 == pytest.approx(630.76 + 1280 * 21_841 / 1e6 + 21_841 / 1e6, rel=1e-3)
    flops = 3 * pre.forward_gflops_per_image * 1e9 * pre.total_steps * 2048
    assert pre.train_flops == pytest.approx(flops, rel=1e-9)
    gpus = flops / (H100 * 0.5 * 21 * DAY)
    c = _check(p, "claims.duration_days")
    assert c.status == "info" and f"need {gpus:,.1f} H100-SXM-80GB at 50% MFU" in c.detail


def test_convnext_batch_is_128_gpus_x_8_x_4():
    p = plan(load_recipe("convnext-xl"))
    pre, ft = p.stages
    assert (pre.world_size, pre.micro_batch, pre.grad_accum, pre.global_batch) == (128, 8, 4, 4096)
    assert pre.steps_per_epoch == math.ceil(14_197_122 / 4096) == 3467 and pre.warmup_steps == 20 * 3467
    assert _check(p, "stages.pretrain.batch").detail.startswith("128 GPUs × micro-batch 8 × accumulation 4 = 4,096")
    assert (ft.global_batch, ft.micro_batch, ft.grad_accum) == (2048, 16, 1)
    assert _check(p, "claims.duration_days").status == "info"  # the paper states no duration
    assert any(n.startswith("ablation: convnext_tiny") and "15 cells" in n and "convnext-xl-ablation" in n
               for n in p.notes)


def test_meta_dinov2_is_implausible_and_does_not_fit():
    p = plan(load_recipe("meta-dinov2-giant"))
    (pre,) = p.stages
    assert pre.peak_lr == pytest.approx(1e-4 * 32768 / 256)  # linear rule, reference batch 256
    assert (pre.total_steps, pre.warmup_steps, pre.global_batch) == (1_500_000, 10 * 1250, 32_768)
    assert round(pre.total_steps * pre.global_batch / 1.2e9) == 41  # ≈ 49 B samples ≈ 41 passes over 1.2 B
    implied = pre.train_flops / (256 * A100 * 30 * DAY)
    c = _check(p, "claims.duration_days")
    assert implied > 0.6 and c.status == "flag" and f"{implied:.1%} utilisation" in c.detail
    # 128 images × 12 crops of ViT-g under DDP cannot fit 80 GB: an executed plan keeps 32,768
    mem = _check(p, "stages.pretrain.memory")
    assert mem.status == "flag" and pre.fits is False
    assert pre.executed_micro_batch < 128 and 128 % pre.executed_micro_batch == 0
    assert pre.executed_micro_batch * pre.executed_grad_accum * 256 == 32_768
    assert f"--set stages.pretrain.batch.micro_batch={pre.executed_micro_batch}" in mem.detail
    # and the executed plan's own micro-batch fits
    m = pre.executed_micro_batch
    again = plan(load_recipe("meta-dinov2-giant", [f"stages.pretrain.batch.micro_batch={m}",
                                                   f"stages.pretrain.batch.grad_accum={128 // m}"]))
    assert again.stages[0].fits is True and _check(again, "stages.pretrain.memory").status == "ok"


def test_dinov2_giant_lr_warmup_and_implied_utilisation():
    p = plan(load_recipe("dinov2-giant"))
    (pre,) = p.stages
    assert pre.peak_lr == 1e-4 and pre.warmup_steps == 12_500 and pre.total_steps == 500 * 1250
    assert (pre.world_size, pre.micro_batch, pre.global_batch) == (128, 16, 2048)
    # student fwd+bwd on 2×224 + 8×98 crops, teacher fwd on 2×224 ≈ 7,523 GFLOP per sample
    assert pre.train_gflops_per_sample == pytest.approx(7523, rel=0.01)
    implied = pre.train_flops / (128 * H100 * 42 * DAY)
    c = _check(p, "claims.duration_days")
    assert implied < 0.05 and c.status == "flag" and "a vfm default" in c.detail and f"{implied:.1%}" in c.detail


def test_params_claims():
    p = plan(load_recipe("meta-dinov2-giant"))
    assert p.params_claim_millions == 450
    assert p.params_counted_millions == pytest.approx(1134.8, rel=0.01)
    assert any(w.startswith("claims.params_millions: the paper says 450 M") for w in p.warnings)
    assert not any(w.startswith("claims.params_millions") for w in plan(load_recipe("dinov2-giant")).warnings)


def _vfm(*args: str) -> subprocess.CompletedProcess:
    """`vfm` in its own process with stdout a pipe, as `vfm … | cat` or `> file` sees it."""
    return subprocess.run([sys.executable, "-m", "vfm", *args], capture_output=True, text=True, timeout=120)


def _cli(*args: str) -> str:
    """`vfm` in this process (a few seconds cheaper than a new interpreter); stdout is not a terminal."""
    from typer.testing import CliRunner

    from vfm.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("rid", list_recipes())
def test_plan_cli_json_for_every_recipe(rid):
    data = json.loads(_cli("plan", rid, "--json"))
    assert data["recipe"] == rid and data["stages"][0]["total_steps"] > 0
    names = {c["name"] for c in data["checks"]}
    assert {"stages.pretrain.batch", "stages.pretrain.memory", "claims.duration_days"} <= names


def test_plan_cli_prints_the_checks():
    out = _cli("plan", "meta-dinov2-giant")
    assert "the paper against itself" in out and "executed plan pretrain: 256 × micro-batch" in out
    assert "curation total:" in out and "Ray workers for 24 h:" in out and "curation assumes:" in out
    assert "\x1b[" not in out  # no colour codes into a pipe


def test_cli_bad_input_exits_2_with_one_message():
    out = _vfm("plan", "vit-huge", "--set", "stages.pretrain.batch.micro_batch=48")
    assert out.returncode == 2
    assert "stages.pretrain.batch.global_batch=2048 is not a multiple" in out.stderr
    assert "Traceback" not in out.stderr
    out = _vfm("recipes", "show", "nope")
    assert out.returncode == 2 and "unknown recipe `nope`" in out.stderr


def test_recipes_list_piped_keeps_whole_ids():
    out = _vfm("recipes", "list")
    assert out.returncode == 0
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert rows[0][0] == "id" and [r[0] for r in rows[1:]] == list_recipes()
    assert {r[0]: r[3] for r in rows[1:]}["meta-dinov2-giant"] == "003"


def test_recipes_show_piped_is_parseable_yaml():
    out = _vfm("recipes", "show", "meta-dinov2-giant", "--resolved")  # long provenance lines: no wrapping
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == load_recipe("meta-dinov2-giant").model_dump(mode="json")


@pytest.mark.parametrize("rid", list_recipes())
def test_recipes_show_resolved_json_and_seed_parse(rid):
    recipe = load_recipe(rid).model_dump(mode="json")
    assert yaml.safe_load(_cli("recipes", "show", rid, "--resolved")) == recipe
    assert json.loads(_cli("recipes", "show", rid, "--json")) == recipe
    assert yaml.safe_load(_cli("recipes", "show", rid))["paper"]["seed"] == recipe["paper"]["seed"]


def test_recipes_show_smoke_profile():
    out = _cli("recipes", "show", "vit-huge", "--resolved", "--profile", "smoke")
    assert "profile: smoke" in out and "vit_tiny_patch16_224" in out


def test_data_plane_lines_shard_count_and_reader_slots():
    """1.2 TB of uncurated images at 1 GB shards, read by every rank's loader workers (paper 004: 142 M)."""
    r = load_recipe("dinov2-giant")
    (pre,) = [s for s in plan(r).stages if s.stage == "pretrain"]
    assert pre.shards == math.ceil(142_000_000 * 110_000 / 1e9) == 15_620
    workers = r.stages["pretrain"].data.workers or 10 - 2  # 10 CPUs per rank by default, 2 kept for the rank
    assert pre.reader_slots == r.hardware.gpus * workers
    r2 = load_recipe("dinov2-giant", ["stages.pretrain.data.workers=3"])
    assert [s for s in plan(r2).stages if s.stage == "pretrain"][0].reader_slots == r2.hardware.gpus * 3


def test_curation_section_adds_up_for_meta_dinov2():
    """1.2 B images through the recipe's stages: the section is there and its arithmetic is its own, whatever the
    measured rates (vfm.plan's constants, from benchmarks/curate_throughput.py) are."""
    r = load_recipe("meta-dinov2-giant")
    p = plan(r)
    cp = p.curation
    assert cp is not None and cp.images == 1_200_000_000 and cp.eval_images == 50_000 + 30_000
    assert (cp.workers, cp.cpus_per_worker, cp.gpus_per_worker) == (64, 16, 8)
    assert cp.parts == math.ceil((1_200_000_000 + 80_000) / 4096)
    stages = {s.stage: s for s in cp.stages}
    assert {"analyse", "pairs", "near", "embedding", "write"} <= set(stages)
    assert any(n.startswith("curation total:") for n in p.notes)
    assert p.to_dict()["curation"]["workers_for_24h"] == cp.workers_for_24h
    # near: N² · m · probes / 2^16 / 2 for pHash ≤ 3 and dHash ≤ 3 (4 chunks, radius 0: one probe each)
    n = 1_200_080_000
    assert "pHash ≤ 3: 4 chunks × 1 probes" in stages["near"].work
    assert stages["near"].cpu_core_hours == pytest.approx(n**2 * 4 * (1 + 1) / 2**16 / 2
                                                          / CurateRates().near_pairs_per_core_s / 3600, rel=1e-9)
    # at vfm's default radii (pHash ≤ 10: radius 2, 1 + 16 + 120 probes; dHash ≤ 6: 17) it costs 77 times as much
    wide = plan(load_recipe("meta-dinov2-giant", ["curate.near.phash_max_distance=10",
                                                  "curate.near.dhash_max_distance=6"])).curation
    assert next(s for s in wide.stages if s.stage == "near").cpu_core_hours == pytest.approx(
        stages["near"].cpu_core_hours * (137 + 17) / 2)
    # embedding: ViT-H/14 at 224 px (334.6 GFLOP) at 40 % of the H100's bf16 peak
    assert stages["embedding"].gpu_hours == pytest.approx(n * 334.6e9 / (H100 * 0.4) / 3600, rel=0.01)
    # totals and wall time are the stages' own
    assert cp.cpu_core_hours == pytest.approx(sum(s.cpu_core_hours for s in cp.stages))
    assert cp.gpu_hours == pytest.approx(sum(s.gpu_hours for s in cp.stages))
    for s in cp.stages:
        if not s.serial:
            assert s.worker_hours == pytest.approx(max(s.cpu_core_hours / 16, s.gpu_hours / 8))
    assert cp.wall_hours == pytest.approx(cp.parallel_worker_hours / 64 + cp.serial_hours)
    # the faiss index is trained and filled in one process; its searches are split over the workers
    assert stages["faiss index"].serial and not stages["faiss search"].serial and not stages["decontaminate"].serial
    assert cp.serial_hours == pytest.approx(stages["faiss index"].worker_hours)
    for hours, w in ((24, cp.workers_for_24h), (24 * 7, cp.workers_for_7d)):
        assert (w is None) == (cp.serial_hours >= hours)
    assert any("curation total:" in n and "Ray workers for 24 h: impossible" in n for n in p.notes)
    # without the embedding stage every stage is parallel: the workers for 24 h (7 days) finish in time, one fewer not
    off = plan(load_recipe("meta-dinov2-giant", ["curate.embedding.enabled=false"])).curation
    assert off is not None and off.serial_hours == 0 and "embedding" not in {s.stage for s in off.stages}
    for hours, w in ((24, off.workers_for_24h), (24 * 7, off.workers_for_7d)):
        assert w is not None and w * hours >= off.parallel_worker_hours
        assert off.wall_hours_at(w) <= hours + 1e-9 and (w == 1 or off.wall_hours_at(w - 1) > hours)


def test_curation_of_dinov2_giant_is_decode_only_and_scales_linearly():
    p = plan(load_recipe("dinov2-giant"))
    cp = p.curation
    assert cp is not None and cp.images == 142_000_000 and cp.eval_images == 0 and cp.gpu_hours == 0
    assert [s.stage for s in cp.stages] == ["analyse", "write"]  # every stage off: decode (and hash) and write
    rates = CurateRates(analyse_core_s=0.01, write_core_s=0.002)
    cfg = load_recipe("dinov2-giant").curate
    one, two = curation_estimate(cfg, 1_000_000, rates), curation_estimate(cfg, 2_000_000, rates)
    assert one.cpu_core_hours == pytest.approx(1_000_000 * 0.012 / 3600)
    assert two.wall_hours == pytest.approx(2 * one.wall_hours) and one.serial_hours == 0
    assert one.wall_hours == pytest.approx(1_000_000 * 0.012 / 3600 / 16 / 16)  # 16 workers × 16 CPUs
