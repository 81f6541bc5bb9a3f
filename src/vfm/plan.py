"""`vfm plan`: what a recipe costs before anyone books GPUs.

Every number is derived from the recipe and counted on the meta device (nothing is allocated):

    world = gpus; nodes = gpus / gpus_per_node
    global batch = micro × accumulation × world            (2048 = 32 × 1 × 64 for vit-huge)
    steps/epoch = ceil(samples / global batch)              (DINOv2: its fixed 1250-iteration "epoch")
    train FLOPs = 3 × forward FLOPs × samples seen          (supervised; perf.md §2)
    GPU-hours   = train FLOPs / (peak × MFU) / 3600
    memory/GPU  = 16 B/param (fp32 weights + grads + 2 AdamW moments) / (world if FSDP) + activations

Claims from the paper (params, duration) are compared, never overwritten.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vfm.models import build_model, count_params, forward_flops
from vfm.recipes import Recipe
from vfm.recipes.datasets import DATASET_SIZES

# dense bf16/fp16 tensor-core peak per GPU (FLOP/s) and memory (bytes); perf.md §2b
GPU_SPECS: dict[str, tuple[float, float]] = {
    "H100-SXM-80GB": (989e12, 80e9),
    "H100-PCIe-80GB": (756e12, 80e9),
    "H200-141GB": (989e12, 141e9),
    "A100-SXM-80GB": (312e12, 80e9),
    "A100-40GB": (312e12, 40e9),
}
BYTES_PER_PARAM_TRAIN = 16  # fp32 master weights 4 + grads 4 + AdamW exp_avg 4 + exp_avg_sq 4
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

    def to_dict(self) -> dict:
        return asdict(self)


def _samples(recipe: Recipe, stage: str) -> int:
    st = recipe.stages[stage]  # type: ignore[index]
    if st.num_samples is not None:
        return st.num_samples
    return DATASET_SIZES.get(st.data.dataset, 0)


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


def plan(recipe: Recipe, mfu: float = 0.4) -> Plan:
    if not 0 < mfu <= 1:
        from vfm.recipes import RecipeError

        raise RecipeError(f"--mfu {mfu}: must be a fraction in (0, 1], e.g. 0.4 for 40 %")
    hw = recipe.hardware
    peak, gpu_mem = GPU_SPECS.get(hw.gpu, (None, None))
    warnings: list[str] = []
    if peak is None:
        warnings.append(f"hardware.gpu `{hw.gpu}` has no known peak: GPU-hours are not estimated "
                        f"(known: {', '.join(GPU_SPECS)})")
    stages: list[StagePlan] = []
    counted_params = 0
    for name, st in recipe.stages.items():
        model = build_model(recipe, name, device="meta")
        params = count_params(model)
        if name == "pretrain" or not counted_params:
            counted_params = params
        res = st.data.resolution
        fwd = forward_flops(model, res)
        train_per_sample = 3 * fwd
        if recipe.ssl is not None and st.data.multicrop is not None:
            mc = st.data.multicrop
            fwd_g = fwd if mc.global_crops_size == res else forward_flops(model, mc.global_crops_size)
            fwd_l = forward_flops(model, mc.local_crops_size) if mc.local_crops_count else 0
            # student fwd+bwd on every crop, EMA teacher forward on the global crops only
            train_per_sample = 3 * (mc.global_crops_count * fwd_g + mc.local_crops_count * fwd_l)
            train_per_sample += mc.global_crops_count * fwd_g
        samples = _samples(recipe, name)
        b = st.batch
        accum = recipe.grad_accum(name)
        if recipe.ssl is not None and recipe.ssl.epoch_length_steps and name == "pretrain":
            steps_per_epoch = recipe.ssl.epoch_length_steps
        else:
            steps_per_epoch = max(1, math.ceil(samples / b.global_batch))
        total_steps = st.steps if st.steps is not None else math.ceil((st.epochs or 0) * steps_per_epoch)
        o = st.optim
        warmup = o.warmup_steps if o.warmup_steps is not None else round((o.warmup_epochs or 0) * steps_per_epoch)
        if warmup >= total_steps:
            warnings.append(f"stages.{name}: warmup ({warmup} steps) is not shorter than training ({total_steps})")
        train_flops = train_per_sample * total_steps * b.global_batch
        gpu_hours = train_flops / (peak * mfu) / 3600 if peak else None
        wall = gpu_hours / hw.gpus if gpu_hours is not None else None

        weights_states = params * BYTES_PER_PARAM_TRAIN / (hw.gpus if st.parallelism == "fsdp" else 1)
        bytes_per_el = 4 if st.precision == "fp32" else 2
        act_res = st.data.multicrop.global_crops_size if st.data.multicrop else res
        act = _activation_bytes(model, act_res, st.activation_checkpointing, bytes_per_el) * b.micro_batch
        if st.data.multicrop is not None:
            act *= st.data.multicrop.global_crops_count + st.data.multicrop.local_crops_count * (
                st.data.multicrop.local_crops_size / act_res) ** 2
        mem = {"weights_grads_adamw_gb": weights_states / 1e9, "activations_gb": act / 1e9,
               "total_gb": (weights_states + act) / 1e9}
        if gpu_mem and weights_states + act > 0.9 * gpu_mem:
            warnings.append(
                f"stages.{name}: estimated {mem['total_gb']:.0f} GB per GPU exceeds 90 % of {hw.gpu}'s "
                f"{gpu_mem / 1e9:.0f} GB; lower micro_batch, enable activation_checkpointing or use fsdp")
        if recipe.ssl is not None and accum > 1:
            warnings.append(f"stages.{name}: gradient accumulation {accum} with DINOv2 losses is not equivalent "
                            "to a larger batch (KoLeo and centering are per step); DINOv2 uses none")
        stages.append(StagePlan(
            stage=name, dataset=st.data.dataset, resolution=res, samples_per_epoch=samples,
            global_batch=b.global_batch, micro_batch=b.micro_batch, grad_accum=accum, world_size=hw.gpus,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup,
            peak_lr=o.peak_lr(b.global_batch), params=params, forward_gflops_per_image=fwd / 1e9,
            train_gflops_per_sample=train_per_sample / 1e9, train_flops=train_flops, gpu_hours=gpu_hours,
            wall_clock_hours=wall, memory_gb=mem,
        ))
        # fine-tuning runs once per seed
        if name == "finetune" and len(st.seeds) > 1 and gpu_hours is not None:
            stages[-1].gpu_hours = gpu_hours * len(st.seeds)
            stages[-1].wall_clock_hours = (wall or 0) * len(st.seeds)

    claim = recipe.claims.params_millions
    if claim is not None and abs(counted_params / 1e6 - claim) / claim > PARAM_CLAIM_TOLERANCE:
        warnings.append(
            f"claims.params_millions: the paper says {claim:g} M, {recipe.model.timm_name} has "
            f"{counted_params / 1e6:,.1f} M ({(counted_params / 1e6 - claim) / claim:+.0%}); the claim is kept, "
            "vfm builds the architecture the recipe names")
    total_hours = sum(s.gpu_hours for s in stages) if all(s.gpu_hours is not None for s in stages) else None
    total_days = total_hours / hw.gpus / 24 if total_hours is not None else None
    claimed = recipe.claims.duration_days
    if claimed and total_days is not None:
        ratio = total_days / claimed
        if ratio > DURATION_TOLERANCE or ratio < 1 / DURATION_TOLERANCE:
            implied_gpus = total_hours / (claimed * 24)
            warnings.append(
                f"claims.duration_days: the paper says {claimed:g} days; at {mfu:.0%} MFU on {hw.gpus}× {hw.gpu} "
                f"the recipe needs {total_days:.1f} days ({ratio:.2g}× the claim) — the claim fits about "
                f"{implied_gpus:,.0f} such GPUs at this MFU (or a lower MFU / slower GPU); set hardware.gpus")
    for note in recipe.upstream:
        warnings.append(f"{note.field}: paper {note.paper}; upstream {note.upstream} ({note.source})")
    return Plan(
        recipe=recipe.id, profile=recipe.profile, gpu=hw.gpu, gpus=hw.gpus, gpus_per_node=hw.gpus_per_node,
        nodes=hw.nodes, mfu=mfu, stages=stages, params_claim_millions=claim,
        params_counted_millions=counted_params / 1e6, total_gpu_hours=total_hours,
        total_wall_clock_days=total_days, claimed_days=claimed, warnings=warnings,
    )
