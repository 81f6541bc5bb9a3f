"""`vfm plan`: what a recipe costs before anyone books GPUs.

Every number is derived from the recipe and counted on the meta device (nothing is allocated). The
run numbers are the training loop's own, from `vfm.recipes.derive.resolve_stage`:

    world = gpus; nodes = gpus / gpus_per_node
    global batch = micro × accumulation × world            (2048 = 8 × 4 × 64 for vit-huge)
    steps/epoch = ceil(samples / global batch)              (DINOv2: its fixed 1250-iteration "epoch")
    train FLOPs = train FLOPs per sample × samples seen     (supervised: 3 × forward, as backward ≈ 2 × forward,
                                                             Kaplan et al. 2020; DINOv2: + teacher and heads)
    GPU-hours   = train FLOPs / (peak × MFU) / 3600
    memory/GPU  = 16 B/param (fp32 weights + grads + 2 AdamW moments) / (world if FSDP) + activations

Then it checks the paper against itself (`Plan.checks`), with the paper's own numbers and the stated GPU:
- batch arithmetic: GPUs × micro-batch × accumulation = global batch;
- implied utilisation: pretraining FLOPs / (GPUs × peak × stated duration), flagged outside 5–60 %;
- where the paper states a duration but no GPU count, how many GPUs that duration implies at `mfu`;
- memory: whether the stated per-GPU batch fits; if not, the micro-batch × accumulation that keeps the
  paper's global batch and fits is the executed plan (`StagePlan.executed_*`, with the `--set` to use it).

Claims from the paper (params, duration) are compared, never overwritten.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vfm.data.shard import DEFAULT_SHARD_SIZE
from vfm.launch.job import JobOptions, loader_workers
from vfm.models import build_model, count_params, forward_flops
from vfm.recipes import Recipe
from vfm.recipes.derive import resolve_stage
from vfm.recipes.gpus import GPU_SPECS

__all__ = ["GPU_SPECS", "Check", "CurateRates", "CurationPlan", "Plan", "StagePlan", "curation_estimate", "plan"]
PLAUSIBLE_MFU = (0.05, 0.60)  # outside this band a paper's GPUs × duration cannot have run its FLOPs
MEMORY_HEADROOM = 0.9  # allocator fragmentation, NCCL buffers, CUDA context: plan on 90 % of the card
BYTES_PER_PARAM_TRAIN = 16  # fp32 master weights 4 + grads 4 + AdamW exp_avg 4 + exp_avg_sq 4
BYTES_PER_PARAM_TEACHER = 4  # DINOv2's EMA teacher: an fp32 copy of the backbone
AVG_IMAGE_BYTES = 110_000  # an ImageNet JPEG on average: ILSVRC2012_img_train.tar is 138 GB for 1.28 M images
PARAM_CLAIM_TOLERANCE = 0.10
DURATION_TOLERANCE = 2.0  # flag an estimate more than 2× away from the paper's stated duration


@dataclass
class StagePlan:
    stage: str
    dataset: str
    resolution: int
    samples_per_epoch: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    params: int
    forward_gflops_per_image: float
    train_gflops_per_sample: float
    train_flops: float
    gpu_hours: float | None
    wall_clock_hours: float | None
    memory_gb: dict[str, float] = field(default_factory=dict)
    fits: bool | None = None
    """Whether the recipe's micro-batch fits 90 % of the GPU (None: the GPU's memory is unknown)."""
    reader_slots: int = 0
    """Loader streams of the stage: ranks × loader workers per rank (vfm.launch.job.loader_workers)."""
    shards: int = 0
    """Shards of the stage's data at `vfm shard`'s default size (AVG_IMAGE_BYTES an image). Any count works:
    every slot reads an equal share of each epoch by ranged reads (vfm.data.loader)."""
    executed_micro_batch: int = 0
    executed_grad_accum: int = 0
    """The largest micro-batch that fits and divides the per-GPU batch, and the accumulation that keeps
    the global batch (equal to the recipe's when it fits)."""


@dataclass
class Check:
    """One consistency check of a paper against itself: `flag` when the paper's numbers disagree."""

    name: str
    status: str  # ok | flag | info
    detail: str


@dataclass
class Plan:
    recipe: str
    profile: str
    gpu: str
    gpus: int
    gpus_per_node: int
    nodes: int
    mfu: float
    stages: list[StagePlan]
    params_claim_millions: float | None
    params_counted_millions: float
    total_gpu_hours: float | None
    total_wall_clock_days: float | None
    claimed_days: float | None
    warnings: list[str]
    checks: list[Check] = field(default_factory=list)
    """The paper checked against itself; the `flag`s are where its own numbers disagree."""
    notes: list[str] = field(default_factory=list)
    """Where the paper and its upstream code differ, and the readings chosen where the paper is ambiguous."""
    curation: CurationPlan | None = None
    """What the recipe's `curate:` block costs (`curation_estimate` at this module's measured rates)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _activation_bytes(model: nn.Module, resolution: int, checkpointing: bool, bytes_per_el: int) -> float:
    """Saved-activation estimate for one sample: the sum of every leaf module's output (what autograd
    keeps), or with activation checkpointing the block inputs plus one block recomputed at a time."""
    leaf_numel: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not list(mod.children()):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name: leaf_numel.__setitem__(n, o.numel() if torch.is_tensor(o) else 0)))
    x = torch.empty(1, 3, resolution, resolution, device=next(model.parameters()).device)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total = sum(leaf_numel.values())
    if not checkpointing:
        return total * bytes_per_el
    blocks = [n for n, m in model.named_modules() if n.endswith("blocks") and isinstance(m, nn.Sequential | nn.ModuleList)]
    per_block: dict[str, int] = {}
    for leaf, numel in leaf_numel.items():
        for b in blocks:
            if leaf.startswith(b + "."):
                key = ".".join(leaf.split(".")[: len(b.split(".")) + 1])
                per_block[key] = per_block.get(key, 0) + numel
    in_blocks = sum(per_block.values())
    block_inputs = len(per_block) * (total / max(1, len(leaf_numel)))  # ~one tensor kept per block
    return (total - in_blocks + block_inputs + max(per_block.values(), default=0)) * bytes_per_el


def _fit_micro_batch(per_gpu: int, micro: int, states: float, act_per_sample: float, gpu_mem: float) -> int:
    """The largest micro-batch ≤ `micro` that divides the per-GPU batch and fits; 0 if none does."""
    budget = MEMORY_HEADROOM * gpu_mem - states
    if budget <= 0:
        return 0
    most = int(budget // act_per_sample) if act_per_sample > 0 else micro
    return max((m for m in range(1, min(micro, most) + 1) if per_gpu % m == 0), default=0)


def plan(recipe: Recipe, mfu: float = 0.4) -> Plan:
    if not 0 < mfu <= 1:
        from vfm.recipes import RecipeError

        raise RecipeError(f"--mfu {mfu}: must be a fraction in (0, 1], e.g. 0.4 for 40 %")
    hw = recipe.hardware
    peak, gpu_mem = GPU_SPECS.get(hw.gpu, (None, None))
    warnings: list[str] = []
    checks: list[Check] = []
    if peak is None:
        warnings.append(f"hardware.gpu `{hw.gpu}` has no known peak: GPU-hours are not estimated "
                        f"(known: {', '.join(GPU_SPECS)})")
    stages: list[StagePlan] = []
    counted_params = 0
    for name in recipe.stages:
        stage = resolve_stage(recipe, name, hw.gpus)
        st, task = stage.config, stage.task
        model = build_model(recipe, name, device="meta", **task.model_overrides)
        params = count_params(model)
        if name == "pretrain" or not counted_params:
            counted_params = params
        res = st.data.resolution
        fwd = forward_flops(model, res)
        train_per_sample = stage.train_flops_per_sample  # the count the training loop's MFU uses
        b = st.batch
        accum, steps_per_epoch, total_steps, warmup = (stage.grad_accum, stage.steps_per_epoch, stage.total_steps,
                                                       stage.warmup_steps)
        if warmup >= total_steps:
            warnings.append(f"stages.{name}: warmup ({warmup} steps) is not shorter than training ({total_steps})")
        train_flops = train_per_sample * total_steps * b.global_batch
        gpu_hours = train_flops / (peak * mfu) / 3600 if peak else None
        wall = gpu_hours / hw.gpus if gpu_hours is not None else None

        bytes_per_param = BYTES_PER_PARAM_TRAIN + (BYTES_PER_PARAM_TEACHER if task.teacher else 0)
        shards = {"fsdp": hw.gpus, "hsdp": st.hsdp_shard_size or hw.procs_per_node}.get(st.parallelism, 1)
        weights_states = params * bytes_per_param / shards
        bytes_per_el = 4 if st.precision == "fp32" else 2
        act_res = st.data.multicrop.global_crops_size if st.data.multicrop else res
        act_sample = _activation_bytes(model, act_res, st.activation_checkpointing, bytes_per_el)
        if st.data.multicrop is not None:
            act_sample *= st.data.multicrop.global_crops_count + st.data.multicrop.local_crops_count * (
                st.data.multicrop.local_crops_size / act_res) ** 2
        act = act_sample * b.micro_batch
        mem = {"weights_grads_adamw_gb": weights_states / 1e9, "activations_gb": act / 1e9,
               "total_gb": (weights_states + act) / 1e9}
        slots = hw.gpus * loader_workers(recipe, name, JobOptions(name="plan", namespace="", image="", args=[]))
        nshards = max(1, math.ceil(stage.num_samples * AVG_IMAGE_BYTES / DEFAULT_SHARD_SIZE))
        sp = StagePlan(
            stage=name, dataset=st.data.dataset, resolution=res, samples_per_epoch=stage.num_samples,
            global_batch=b.global_batch, micro_batch=b.micro_batch, grad_accum=accum, world_size=hw.gpus,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup,
            peak_lr=stage.peak_lr, params=params, forward_gflops_per_image=fwd / 1e9,
            train_gflops_per_sample=train_per_sample / 1e9, train_flops=train_flops, gpu_hours=gpu_hours,
            wall_clock_hours=wall, memory_gb=mem, executed_micro_batch=b.micro_batch, executed_grad_accum=accum,
            reader_slots=slots, shards=nshards,
        )
        checks.append(_batch_check(recipe, sp))
        if gpu_mem:
            checks.append(_memory_check(recipe, sp, weights_states, act_sample, gpu_mem))
        if not task.exact_accumulation and sp.executed_grad_accum > 1:
            warnings.append(f"stages.{name}: gradient accumulation {sp.executed_grad_accum} with {task.name} losses is "
                            "not equivalent to a larger batch (KoLeo and centering are per step); DINOv2 uses none")
        # fine-tuning runs once per seed
        if name == "finetune" and len(st.seeds) > 1 and gpu_hours is not None:
            sp.gpu_hours = gpu_hours * len(st.seeds)
            sp.wall_clock_hours = (wall or 0) * len(st.seeds)
        stages.append(sp)

    claim = recipe.claims.params_millions
    if claim is not None and abs(counted_params / 1e6 - claim) / claim > PARAM_CLAIM_TOLERANCE:
        warnings.append(
            f"claims.params_millions: the paper says {claim:g} M, {recipe.model.timm_name} has "
            f"{counted_params / 1e6:,.1f} M ({(counted_params / 1e6 - claim) / claim:+.0%}); the claim is kept, "
            "vfm builds the architecture the recipe names")
    total_hours = sum(s.gpu_hours for s in stages) if all(s.gpu_hours is not None for s in stages) else None
    total_days = total_hours / hw.gpus / 24 if total_hours is not None else None
    pre = next((s for s in stages if s.stage == "pretrain"), None)
    if pre is not None and peak:
        checks.append(_duration_check(recipe, pre, peak, mfu))
    notes = [f"upstream: {n.field}: paper {n.paper}; upstream {n.upstream} ({n.source})" for n in recipe.upstream]
    notes += [f"reading: {a.field}: \"{a.quote}\" read as {a.chosen}; other reading: {a.other}"
              for a in recipe.ambiguous]
    notes += [_downstream_note(recipe, name) for name in recipe.downstream]
    if recipe.ablation is not None:
        ab = recipe.ablation
        notes.append(f"ablation: {ab.variant}, kernel sizes {ab.kernel_sizes} × expansion ratios "
                     f"{ab.mlp_ratios} = {len(ab.kernel_sizes) * len(ab.mlp_ratios)} cells × {len(ab.seeds)} seed(s), "
                     f"{ab.epochs:g} epochs on {ab.subset.num_classes} IN-1K classes: pipeline {recipe.id}-ablation, "
                     f"per cell `vfm plan {recipe.id} --ablation`")
    curation = None
    if recipe.curate is not None:
        from vfm.recipes.datasets import DATASET_SIZES

        images = DATASET_SIZES.get(recipe.curate.dataset)
        if images is None:
            notes.append(f"curation: curate.dataset `{recipe.curate.dataset}` has no known size: not estimated")
        else:
            curation = curation_estimate(recipe.curate, images, mfu=mfu)
            notes += curation_lines(curation)
    return Plan(
        recipe=recipe.id, profile=recipe.profile, gpu=hw.gpu, gpus=hw.gpus, gpus_per_node=hw.gpus_per_node,
        nodes=hw.nodes, mfu=mfu, stages=stages, params_claim_millions=claim,
        params_counted_millions=counted_params / 1e6, total_gpu_hours=total_hours,
        total_wall_clock_days=total_days, claimed_days=recipe.claims.duration_days, warnings=warnings,
        checks=checks, notes=notes, curation=curation,
    )


def _batch_check(recipe: Recipe, sp: StagePlan) -> Check:
    made = sp.world_size * sp.micro_batch * sp.grad_accum
    detail = (f"{sp.world_size} GPUs × micro-batch {sp.micro_batch} × accumulation {sp.grad_accum} = {made:,}"
              f"{' = ' if made == sp.global_batch else ' ≠ '}global batch {sp.global_batch:,}")
    return Check(f"stages.{sp.stage}.batch", "ok" if made == sp.global_batch else "flag", detail)


def _memory_check(recipe: Recipe, sp: StagePlan, states: float, act_sample: float, gpu_mem: float) -> Check:
    st = recipe.stages[sp.stage]  # type: ignore[index]
    per_gpu = sp.micro_batch * sp.grad_accum
    sp.fits = states + act_sample * sp.micro_batch <= MEMORY_HEADROOM * gpu_mem
    where = (f"{st.parallelism.upper()}, {st.precision}"
             + (", activation checkpointing" if st.activation_checkpointing else "")
             + (f", {st.data.multicrop.global_crops_count + st.data.multicrop.local_crops_count} crops"
                if st.data.multicrop else ""))
    need = f"micro-batch {sp.micro_batch} needs ≈{sp.memory_gb['total_gb']:,.0f} GB of {recipe.hardware.gpu}'s " \
           f"{gpu_mem / 1e9:.0f} GB ({where})"
    if sp.fits:
        return Check(f"stages.{sp.stage}.memory", "ok", need)
    micro = _fit_micro_batch(per_gpu, sp.micro_batch, states, act_sample, gpu_mem)
    if micro == 0:
        sp.executed_micro_batch = sp.executed_grad_accum = 0
        fix = "not even micro-batch 1 fits: use parallelism fsdp or activation_checkpointing"
        if st.parallelism in ("fsdp", "hsdp") or st.activation_checkpointing:
            fix = "not even micro-batch 1 fits: use more GPUs or a smaller model"
        return Check(f"stages.{sp.stage}.memory", "flag", f"{need}; {fix}")
    sp.executed_micro_batch, sp.executed_grad_accum = micro, per_gpu // micro
    sets = (f"--set stages.{sp.stage}.batch.micro_batch={micro} "
            f"--set stages.{sp.stage}.batch.grad_accum={per_gpu // micro}")
    return Check(f"stages.{sp.stage}.memory", "flag",
                 f"{need}: does not fit; executed plan: {sp.world_size} × micro-batch {micro} × accumulation "
                 f"{per_gpu // micro} = {sp.global_batch:,}, the paper's global batch ({sets})")


def _downstream_note(recipe: Recipe, name: str) -> str:
    """One line per downstream (transfer) stage: what it trains, how long, on how many GPUs, how many times."""
    d = recipe.downstream[name]
    r = resolve_stage(recipe, name, d.gpus)
    frozen = ", backbone frozen" if d.freeze_backbone else ""
    return (f"downstream {name}: {d.task} on {d.data.dataset} ({d.head} head{frozen}), {r.total_steps:,} updates of "
            f"{d.batch.global_batch} at {d.data.resolution} px on {d.gpus} GPUs, from the pretraining export, "
            f"once per seed {list(d.seeds)}")


def _duration_check(recipe: Recipe, pre: StagePlan, peak: float, mfu: float) -> Check:
    """The paper's GPUs × duration against the FLOPs of its pretraining, or the GPUs its duration implies."""
    hw, claims = recipe.hardware, recipe.claims
    name = "claims.duration_days"
    length = "stated" if recipe.stated(f"stages.pretrain.{'steps' if recipe.stages['pretrain'].steps else 'epochs'}") \
        else "a vfm default"
    gpu_note = "" if recipe.stated("hardware.gpu") else f" ({hw.gpu} is a vfm default: the type is not stated)"
    if not claims.duration_days:
        what = "neither a GPU count nor a duration" if not recipe.stated("hardware.gpus") else "no duration"
        return Check(name, "info", f"the paper states {what}: {pre.gpu_hours:,.0f} pretraining GPU-hours at "
                                   f"{mfu:.0%} MFU are {pre.gpu_hours / hw.gpus / 24:.1f} days on {hw.gpus} GPUs")
    seconds = claims.duration_days * 86400
    if not recipe.stated("hardware.gpus"):
        gpus = pre.train_flops / (peak * mfu * seconds)
        return Check(name, "info",
                     f"the paper states {claims.duration_days:g} days but no GPU count: {pre.train_flops:.3g} FLOPs "
                     f"(length {length}) in that time need {gpus:,.1f} {hw.gpu} at {mfu:.0%} MFU{gpu_note}")
    implied = pre.train_flops / (hw.gpus * peak * seconds)
    lo, hi = PLAUSIBLE_MFU
    ok = lo <= implied <= hi
    detail = (f"{pre.train_flops:.3g} FLOPs of pretraining ({pre.total_steps:,} steps × {pre.global_batch:,}, length "
              f"{length}) on {hw.gpus} × {hw.gpu} in {claims.duration_days:g} days imply {implied:.1%} utilisation"
              f"{gpu_note}")
    if not ok:
        detail += f": implausible (outside {lo:.0%}–{hi:.0%})"
    return Check(name, "ok" if ok else "flag", detail)


@dataclass
class CellPlan:
    """One cell of paper 002's ablation grid (`vfm plan --ablation`)."""

    cell: str
    kernel_size: int
    mlp_ratio: float
    params: int
    forward_gflops_per_image: float
    samples_per_epoch: int
    total_steps: int
    gpus: int
    gpu_hours: float | None


def plan_ablation(recipe_id: str, overrides: list[str] | None = None, profile: str = "paper",
                  mfu: float = 0.4) -> list[CellPlan]:
    """Each cell's params, FLOPs and GPU-hours, on the subset's expected size (IN-1K's ~1,281 images per class;
    the pipeline trains on the sharded subset's real count). Seeds multiply the GPU-hours."""
    from vfm.evaluate.ablation import architecture
    from vfm.recipes import load_recipe
    from vfm.recipes.ablation import ABLATION_STAGE, ablation_cells, subset_size

    base = load_recipe(recipe_id, overrides, profile)
    ab = base.ablation
    assert ab is not None  # ablation_cells says so first
    out = []
    for cell in ablation_cells(base):
        recipe = load_recipe(recipe_id, [*(overrides or []), *cell.overrides], profile)
        stage = resolve_stage(recipe, ABLATION_STAGE, recipe.hardware.gpus, subset_size(base),
                              num_classes=ab.subset.num_classes)
        params, gflops = architecture(recipe, ab.subset.num_classes)
        peak, _ = GPU_SPECS.get(recipe.hardware.gpu, (None, None))
        flops = stage.train_flops_per_sample * stage.total_steps * stage.config.batch.global_batch * len(ab.seeds)
        out.append(CellPlan(cell=cell.name, kernel_size=cell.kernel_size, mlp_ratio=cell.mlp_ratio, params=params,
                            forward_gflops_per_image=gflops, samples_per_epoch=stage.num_samples,
                            total_steps=stage.total_steps, gpus=recipe.hardware.gpus,
                            gpu_hours=flops / (peak * mfu) / 3600 if peak else None))
    return out


# --- curation: what `vfm curate` costs on the recipe's images ------------------------------------------------------
# Rates measured on 2026-12-06 on vfm's 2-core build machine (shared: load average 4-6 during the run; a rerun moved
# the analyse and bucket-check rates by up to 3× and 2×), per core of that machine (a cluster core is taken as equal
# to one), by
#     .venv/bin/python benchmarks/curate_throughput.py --originals 340
# (620 make_pool files, Ray workers 2, part size 50; faiss_figures(200_000, 256) of benchmarks/curate_faiss.py).
MEASURED_BY = ("benchmarks/curate_throughput.py --originals 340, 2026-12-06, a shared 2-core machine (load 4-6); "
               "per core of that machine")
CURATE_ANALYSE_CORE_S = 4.68e-3
"""Core-seconds per image of the Ray analyse step (read, decode, quality measures, pixel sha256, pHash + dHash,
the part's parquet commit): the per-image slope between two pool sizes, fixed costs removed."""
CURATE_PAIRS_CORE_S = 62.8e-3
"""Core-seconds per image of the Ray pairs step at a small pool: multi-index keys of every image, the groupby
shuffle, the bucket checks, the driver's decisions. The quadratic part (candidate pairs) is counted apart."""
CURATE_WRITE_CORE_S = 1.66e-3
"""Core-seconds per image written of the shard write (the driver's output index + the Ray shard tasks)."""
NEAR_PAIRS_PER_CORE_S = 2.51e6
"""Candidate pairs verified per second per core by the Ray pairs step's bucket check (vfm.curate.run._group_pairs,
which computes each candidate twice, once from either side; counted here per unique candidate)."""
EMBED_PREPROCESS_CORE_S = 14.5e-3
"""Core-seconds per image of the embedding's CPU side: its second decode and timm's eval transform at 224 px."""
CURATE_GPU = "H100-SXM-80GB"  # the curation cluster's GPU is not in the recipe: priced as an H100
CURATE_MFU = 0.4  # curation_estimate's share of the bf16 peak for the embedding forward; `vfm plan` passes its --mfu
FP32_PEAKS = {"H100-SXM-80GB": 67e12, "H100-PCIe-80GB": 51e12, "H200-141GB": 67e12, "A100-SXM-80GB": 19.5e12,
              "A100-40GB": 19.5e12}
"""Non-tensor FP32 peaks (NVIDIA datasheets): vfm.curate.embed.Embedder runs fp32 (no autocast) today."""


@dataclass(frozen=True)
class FaissReference:
    """One measurement of faiss (benchmarks/curate_faiss.py `faiss_figures`): `n` vectors of `dim`, `threads`
    OpenMP threads; IVF-PQ as vfm.curate.embed.build_index makes it (nlist ≈ 4 √n), every vector searched for its
    `k` nearest; the exact flat search of `flat_queries` queries against the `n` vectors."""

    n: int
    dim: int
    threads: int
    k: int
    ivfpq_build_s: float
    """Training (k-means of the coarse quantizer and the PQ) + adding the n vectors."""
    ivfpq_search_s: float
    """Every vector searched for its k nearest, with the exact re-ranking (faiss_figures' `ivfpq_pairs_s`)."""
    flat_queries: int = 0
    flat_search_s: float = 0.0
    ivfpq_train_s: float = 0.0
    """The training part of `ivfpq_build_s` (0: unknown, all of it scaled as the add)."""


FAISS_REFERENCE = FaissReference(n=200_000, dim=256, threads=2, k=16, ivfpq_build_s=56.1, ivfpq_search_s=14.2,
                                 flat_queries=20_000, flat_search_s=53.2, ivfpq_train_s=52.0)


@dataclass(frozen=True)
class CurateRates:
    """The measured rates `curation_estimate` extrapolates from (defaults: this module's constants)."""

    analyse_core_s: float = CURATE_ANALYSE_CORE_S
    pairs_core_s: float = CURATE_PAIRS_CORE_S
    write_core_s: float = CURATE_WRITE_CORE_S
    near_pairs_per_core_s: float = NEAR_PAIRS_PER_CORE_S
    embed_preprocess_core_s: float = EMBED_PREPROCESS_CORE_S
    faiss: FaissReference = FAISS_REFERENCE
    measured_by: str = MEASURED_BY


@dataclass
class CurationStage:
    stage: str
    work: str
    """What is counted, with its numbers."""
    cpu_core_hours: float = 0.0
    gpu_hours: float = 0.0
    serial: bool = False
    """Runs in one place (the driver, or one Ray actor): more workers do not shorten it."""
    worker_hours: float = 0.0
    """Its time on one Ray worker (cpus_per_worker cores, gpus_per_worker GPUs); a serial stage's wall time."""


@dataclass
class CurationPlan:
    dataset: str
    images: int
    eval_images: int
    parts: int
    workers: int
    cpus_per_worker: int
    gpus_per_worker: int
    gpu: str
    mfu: float
    stages: list[CurationStage]
    cpu_core_hours: float
    gpu_hours: float
    parallel_worker_hours: float
    """The parallel stages' time on one worker: divided by the workers."""
    serial_hours: float
    wall_hours: float
    """At the recipe's workers: parallel_worker_hours / workers + serial_hours."""
    workers_for_24h: int | None
    workers_for_7d: int | None
    """None: the serial stages alone take longer than that."""
    assumptions: list[str] = field(default_factory=list)

    def wall_hours_at(self, workers: int) -> float:
        return self.parallel_worker_hours / workers + self.serial_hours

    def workers_for(self, hours: float) -> int | None:
        if hours <= self.serial_hours:
            return None
        return max(1, math.ceil(self.parallel_worker_hours / (hours - self.serial_hours) - 1e-9))


def near_candidates(images: int, bits: int, max_distance: int, chunk_bits: int) -> tuple[float, int, int]:
    """(candidate pairs, chunks m, probe keys per chunk) of multi-index hashing over `images` codes of `bits` bits
    (vfm.curate.hashing): N² · m · probes / 2^chunk_bits / 2 for codes spread uniformly over each chunk's values."""
    from math import comb

    m = bits // chunk_bits
    r = min(max_distance // m, chunk_bits)
    probes = sum(comb(chunk_bits, k) for k in range(r + 1))
    return float(images) ** 2 * m * probes / 2 ** chunk_bits / 2, m, probes


def embedding_gflops(spec: str, image_size: int) -> tuple[float | None, int | None]:
    """(forward GFLOP per image, embedding dim) of a `timm:<name>` embedding model, counted on the meta device;
    (None, None) for a vfm export (its architecture is only known once loaded)."""
    if not spec.startswith("timm:"):
        return None, None
    return _timm_gflops(spec[len("timm:"):], image_size)


@functools.lru_cache(maxsize=8)
def _timm_gflops(name: str, image_size: int) -> tuple[float, int]:
    from vfm.models import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=0)
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=(image_size, image_size))
    return forward_flops(model, image_size) / 1e9, int(getattr(model, "head_hidden_size", None) or model.num_features)


def curation_estimate(cfg: Any, images: int, rates: CurateRates | None = None, *, eval_images: int | None = None,
                      gpu: str = CURATE_GPU, mfu: float = CURATE_MFU, embed_gflops: float | None = None,
                      embed_dim: int | None = None) -> CurationPlan:
    """CPU-core-hours, GPU-hours and wall time of `vfm curate` with `cfg` (a vfm.recipes.schema.CurateConfig) on
    `images` pool images, from measured rates (`CurateRates`; benchmarks/curate_throughput.py passes its own):

    analyse    images × analyse_core_s                    (every image is decoded and hashed, whatever is enabled)
    pairs      images × pairs_core_s                      (exact or near on: keys, shuffle, decisions)
    near       N² · m · probes / 2^chunk_bits / 2 candidate pairs per hash kind ÷ near_pairs_per_core_s
    embedding  images × forward GFLOP ÷ (GPU bf16 peak × mfu), and images × embed_preprocess_core_s on the CPUs
    faiss      IVF-PQ from FaissReference: k-means training × N/n, add and search (+ re-ranking) × (N/n)^1.5 (nlist
               ≈ 4 √N: each query scans ~√N codes), all × D/d, on one worker's cores; decontamination's exact search
               of the N pool vectors against the E evaluation vectors × (N·E·D)/(q·n·d)
    write      images × write_core_s

    Parallel stages take worker_hours = max(core-hours / cpus_per_worker, GPU-hours / gpus_per_worker) on one worker;
    the faiss stages run in the driver and one Ray actor (vfm.curate.run.embedding_pairs) and do not shrink with
    workers. Stages run one after another (no overlap of CPU and GPU work: conservative)."""
    from vfm.curate.hashing import MAX_PROBES_PER_CODE

    r = rates or CurateRates()
    n = int(images)
    workers, cpus, gpus = cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker
    peak = GPU_SPECS.get(gpu, (None, None))[0]
    e = eval_images if eval_images is not None else 0
    if cfg.decontaminate.enabled and eval_images is None:
        from vfm.recipes.datasets import DATASET_SIZES

        e = sum(DATASET_SIZES.get(s.name, 0) for s in cfg.decontaminate.sets)
    analysed = n + (e if cfg.decontaminate.enabled else 0)
    stages: list[CurationStage] = []
    notes: list[str] = [f"rates: {r.measured_by}"]
    if any(getattr(cfg, k).enabled for k in ("quality", "exact", "near", "embedding", "decontaminate")):
        notes.append(f"images: {n:,} is the size of `{cfg.dataset}`, what the curation keeps; the pool going in is "
                     "larger, so every figure here is a lower bound")

    def add(stage: str, work: str, core_s: float = 0.0, gpu_s: float = 0.0, serial_s: float = 0.0,
            threads: int = 1) -> None:
        if serial_s:
            stages.append(CurationStage(stage, work, serial_s * threads / 3600, 0.0, True, serial_s / 3600))
            return
        wh = max(core_s / 3600 / cpus, gpu_s / 3600 / gpus if gpus else 0.0)
        stages.append(CurationStage(stage, work, core_s / 3600, gpu_s / 3600, False, wh))

    add("analyse", f"{analysed:,} images × {r.analyse_core_s * 1e3:.1f} core-ms (decode, quality measures, sha256, "
        "pHash, dHash: all of them, whatever is enabled)",
        analysed * r.analyse_core_s)
    near_on = cfg.near.enabled or cfg.decontaminate.enabled
    if cfg.exact.enabled or near_on:
        add("pairs", f"{analysed:,} images × {r.pairs_core_s * 1e3:.1f} core-ms (hash keys, shuffle, decisions)",
            analysed * r.pairs_core_s)
        reach = [t for t in (cfg.near.phash_max_distance, cfg.near.dhash_max_distance) if near_on and t >= 0]
        keys = 1 + sum(m * p for m, p in (near_candidates(0, cfg.near.hash_size ** 2, t, cfg.near.chunk_bits)[1:]
                                          for t in reach))
        groups = len(reach) * cfg.near.hash_size ** 2 // cfg.near.chunk_bits * 2 ** cfg.near.chunk_bits
        notes.append(f"pairs: rate measured on pools of hundreds of images, where the multi-index groups (at most "
                     f"{groups:,}) still grow with the images; at this N they are all there, so the per-group part is "
                     f"over-counted, not the per-row part ({keys} keys emitted and shuffled an image)")
    if near_on:
        bits = cfg.near.hash_size ** 2
        total, parts = 0.0, []
        for kind, t in (("pHash", cfg.near.phash_max_distance), ("dHash", cfg.near.dhash_max_distance)):
            if t < 0:
                continue
            c, m, probes = near_candidates(analysed, bits, t, cfg.near.chunk_bits)
            if m * probes > MAX_PROBES_PER_CODE:
                notes.append(f"near: {kind} within {t} on {cfg.near.chunk_bits}-bit chunks needs {m * probes:,} probe "
                             "keys per image: vfm.curate.hashing refuses it")
            total += c
            parts.append(f"{kind} ≤ {t}: {m} chunks × {probes} probes → {c:.3g}")
        add("near", f"{total:.3g} candidate pairs ({'; '.join(parts)}) at {r.near_pairs_per_core_s:.3g}/core-s",
            total / r.near_pairs_per_core_s if r.near_pairs_per_core_s else 0.0)
        notes.append(f"near: candidates N² · m · probes / 2^{cfg.near.chunk_bits} / 2 assume hashes spread uniformly "
                     "over each chunk's values; real pHash/dHash values cluster (flat regions, borders, near-copies "
                     "themselves), so this is a lower bound, and the Ray step holds a bucket's index rows × its rows "
                     f"in memory (≈{analysed / 2 ** cfg.near.chunk_bits:,.0f} index rows a bucket at this N)")
    gflops, dim = embed_gflops, embed_dim
    emb_on = cfg.embedding.enabled
    if emb_on or cfg.decontaminate.enabled:
        if emb_on and (gflops is None or dim is None):
            g, d = embedding_gflops(cfg.embedding.model, cfg.embedding.image_size)
            gflops, dim = gflops or g, dim or d
    if emb_on:
        if gflops is None or peak is None:
            notes.append(f"embedding: {cfg.embedding.model} is not counted (an export) or {gpu} has no peak: "
                         "its GPU cost is not estimated")
            add("embedding", f"{analysed:,} images × {r.embed_preprocess_core_s * 1e3:.1f} core-ms preprocessing",
                analysed * r.embed_preprocess_core_s)
        else:
            flops = analysed * gflops * 1e9
            if not gpus:
                notes.append("embedding: curate.gpus_per_worker is 0, the model runs on the workers' CPUs; its time "
                             f"is priced here as {gpu} GPU-hours and left out of the wall time")
            add("embedding", f"{analysed:,} images × {gflops:,.1f} GFLOP ({cfg.embedding.model} at "
                f"{cfg.embedding.image_size} px) = {flops:.3g} FLOP at {mfu:.0%} of {gpu}'s {peak / 1e12:,.0f} "
                f"TFLOP/s bf16; + {r.embed_preprocess_core_s * 1e3:.1f} core-ms an image of decode and transform",
                analysed * r.embed_preprocess_core_s, flops / (peak * mfu))
            fp32 = FP32_PEAKS.get(gpu)
            if fp32:
                notes.append(f"embedding: priced at the bf16 peak (vfm.curate.embed.Embedder autocasts to bf16 on a "
                             f"GPU; measured on none yet); in fp32, whose peak on {gpu} is {fp32 / 1e12:g} TFLOP/s: "
                             f"{flops / (fp32 * mfu) / 3600:,.0f} GPU-hours at the same {mfu:.0%}")
        f = r.faiss
        if dim and f.n and f.ivfpq_build_s + f.ivfpq_search_s > 0:
            per = dim / f.dim * f.threads / cpus  # linear in the dimension, threads linear
            train = f.ivfpq_train_s * n / f.n * per
            add_s = (f.ivfpq_build_s - f.ivfpq_train_s) * (n / f.n) ** 1.5 * per
            search_s = f.ivfpq_search_s * (n / f.n) ** 1.5 * per
            kind = cfg.embedding.index if cfg.embedding.index != "auto" else ("flat" if n <= 1_000_000 else "ivfpq")
            add("faiss index", f"IVF-PQ over {n:,} × {dim} (nlist ≈ {4 * math.sqrt(n):,.0f}), from {f.n:,} × "
                f"{f.dim} on {f.threads} threads: train {f.ivfpq_train_s:.1f} s × N/n → {train / 3600:,.0f} h, add "
                f"{f.ivfpq_build_s - f.ivfpq_train_s:.1f} s × (N/n)^1.5 → {add_s / 3600:,.0f} h (× D/d, on {cpus} "
                "threads)", serial_s=train + add_s, threads=cpus)
            add("faiss search", f"search + re-rank {f.ivfpq_search_s:.1f} s × (N/n)^1.5 × D/d per thread, split over "
                "the workers (a replica of the index each)", core_s=search_s * cpus)
            notes.append("faiss: one index of every vector, trained and filled in the driver (serial), searched by "
                         "one Ray actor a worker (vfm.curate.run.embedding_pairs). IVF-PQ with nlist ≈ 4 √N: a query scans ~√N "
                         "codes, so the add and the search grow as N^1.5, k-means on its 64·nlist sample as N; "
                         f"linear in the dimension and the threads; measured at k = {f.k}, the recipe searches k = "
                         f"{cfg.embedding.k} (more re-ranking, not scaled). The float32 vectors alone are "
                         f"{n * dim * 4 / 1e12:,.2f} TB in one process (curate.memory_per_worker "
                         f"{cfg.memory_per_worker})"
                         + ("" if kind == "ivfpq" else f"; index `{kind}` is exact and far slower at this N"))
            notes.append(f"faiss: training and adding stay in one process ({(train + add_s) / 3600:,.0f} h): the "
                         "next step at this N is a sharded index (each worker adds its vectors to a copy of the "
                         "trained index, merged or searched shard by shard)")
        else:
            notes.append("faiss: no reference measurement: the embedding dedup search is not estimated")
    if cfg.decontaminate.enabled and emb_on and dim:
        f = r.faiss
        if f.flat_queries and f.flat_search_s and e:
            secs = f.flat_search_s * (n * e * dim) / (f.flat_queries * f.n * f.dim) * f.threads / cpus
            add("decontaminate", f"exact search of {n:,} pool vectors against {e:,} evaluation vectors × {dim} "
                f"(flat: {f.flat_search_s:.2f} s for {f.flat_queries:,} × {f.n:,} × {f.dim}, {f.threads} threads), "
                "split over the workers", core_s=secs * cpus)
    add("write", f"{n:,} images × {r.write_core_s * 1e3:.1f} core-ms (every image kept: an upper bound)",
        n * r.write_core_s)

    cpu_h = sum(s.cpu_core_hours for s in stages)
    gpu_h = sum(s.gpu_hours for s in stages)
    par = sum(s.worker_hours for s in stages if not s.serial)
    ser = sum(s.worker_hours for s in stages if s.serial)
    notes.append("a cluster core is taken as one core of the machine that measured the rates, on 256-400 px images "
                 "(tests/helpers/curate_data.py): decoding grows with the pixels and writing with the bytes, so "
                 "larger photos cost more; stages run one after another; Ray start-up and per-stage scheduling "
                 "(seconds) are left out")
    cp = CurationPlan(dataset=cfg.dataset, images=n, eval_images=e if cfg.decontaminate.enabled else 0,
                      parts=math.ceil(analysed / cfg.part_size), workers=workers, cpus_per_worker=cpus,
                      gpus_per_worker=gpus, gpu=gpu, mfu=mfu, stages=stages, cpu_core_hours=cpu_h, gpu_hours=gpu_h,
                      parallel_worker_hours=par, serial_hours=ser, wall_hours=par / workers + ser,
                      workers_for_24h=None, workers_for_7d=None, assumptions=notes)
    cp.workers_for_24h, cp.workers_for_7d = cp.workers_for(24.0), cp.workers_for(24.0 * 7)
    return cp


def curation_lines(cp: CurationPlan) -> list[str]:
    """`vfm plan`'s curation section, one line each (printed with the plan's notes)."""
    def hours(h: float) -> str:
        return f"{h:,.1f} h" if h < 48 else f"{h / 24:,.1f} days"

    out = [f"curation: {cp.images:,} images of `{cp.dataset}` (its size in vfm.recipes.datasets)"
           + (f" + {cp.eval_images:,} evaluation images" if cp.eval_images else "")
           + f", {cp.parts:,} parts; {cp.workers} Ray workers × {cp.cpus_per_worker} CPUs × {cp.gpus_per_worker} GPUs"]
    for s in cp.stages:
        cost = f"{s.cpu_core_hours:,.0f} CPU-core-h" + (f" + {s.gpu_hours:,.0f} GPU-h" if s.gpu_hours else "")
        when = (f"{hours(s.worker_hours)} serial" if s.serial
                else f"{hours(s.worker_hours / cp.workers)} on {cp.workers} workers")
        out.append(f"curation {s.stage}: {cost}, {when}: {s.work}")
    w24 = "impossible (the serial stages alone exceed it)" if cp.workers_for_24h is None else f"{cp.workers_for_24h:,}"
    w7 = "impossible" if cp.workers_for_7d is None else f"{cp.workers_for_7d:,}"
    gpu = f", {cp.gpu_hours:,.0f} GPU-hours ({cp.gpu} at {cp.mfu:.0%} MFU)" if cp.gpu_hours else ""
    out.append(f"curation total: {cp.cpu_core_hours:,.0f} CPU-core-hours{gpu}; wall ≈ {hours(cp.wall_hours)} on "
               f"{cp.workers} workers ({hours(cp.parallel_worker_hours)} of parallel stages on one worker / "
               f"{cp.workers} + {hours(cp.serial_hours)} serial); Ray workers for 24 h: {w24}, for 7 days: {w7}")
    out += [f"curation assumes: {a}" for a in cp.assumptions]
    return out
