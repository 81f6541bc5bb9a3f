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

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vfm.data.shard import DEFAULT_SHARD_SIZE
from vfm.launch.job import JobOptions, loader_workers
from vfm.models import build_model, count_params, forward_flops
from vfm.recipes import Recipe
from vfm.recipes.derive import resolve_stage
from vfm.recipes.gpus import GPU_SPECS

__all__ = ["GPU_SPECS", "Check", "Plan", "StagePlan", "plan"]
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
    return Plan(
        recipe=recipe.id, profile=recipe.profile, gpu=hw.gpu, gpus=hw.gpus, gpus_per_node=hw.gpus_per_node,
        nodes=hw.nodes, mfu=mfu, stages=stages, params_claim_millions=claim,
        params_counted_millions=counted_params / 1e6, total_gpu_hours=total_hours,
        total_wall_clock_days=total_days, claimed_days=recipe.claims.duration_days, warnings=warnings,
        checks=checks, notes=notes,
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
