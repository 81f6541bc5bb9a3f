"""AdamW parameter groups (timm) and the per-update lr / weight-decay schedules.

Groups come from timm: `param_groups_weight_decay` (no decay on norms, biases, tokens, pos-embed) or
`param_groups_layer_decay` for fine-tuning (one group per depth with an `lr_scale`). The lr schedule is
timm's `CosineLRScheduler` with `warmup_prefix=True, t_in_epochs=False`, stepped once per optimiser
update so a warmup of exactly N updates is exact (with `warmup_prefix` the cosine starts after `warmup_t`:
huggingface/pytorch-image-models timm/scheduler/cosine_lr.py `_get_lr`); weight decay optionally follows
a cosine too (DINOv2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from vfm.recipes.errors import RecipeError
from vfm.recipes.schema import OptimConfig
from vfm.train.parallel import unwrap


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Groups of the (possibly wrapped) model per the recipe: decay exclusions, layer decay, patch-embed lr."""
    bare = unwrap(model)
    no_decay = set(bare.no_weight_decay()) if hasattr(bare, "no_weight_decay") else set()
    if optim.layer_decay is not None:
        groups = param_groups_layer_decay(bare, weight_decay=optim.weight_decay, no_weight_decay_list=no_decay,
                                          layer_decay=optim.layer_decay)
    else:
        groups = param_groups_weight_decay(bare, weight_decay=optim.weight_decay, no_weight_decay_list=no_decay)
    if optim.patch_embed_lr_mult != 1.0:
        groups = _split_patch_embed(bare, groups, optim.patch_embed_lr_mult)
    return [g for g in groups if g["params"]]


def _split_patch_embed(model: nn.Module, groups: list[dict], mult: float) -> list[dict]:
    embed = {id(p) for name, p in model.named_parameters() if name.startswith("patch_embed.")}
    out = []
    for g in groups:
        inside = [p for p in g["params"] if id(p) in embed]
        rest = [p for p in g["params"] if id(p) not in embed]
        out.append({**g, "params": rest})
        if inside:
            out.append({**g, "params": inside, "lr_scale": g.get("lr_scale", 1.0) * mult})
    return out


def build_optimizer(groups: list[dict[str, Any]], optim: OptimConfig, peak_lr: float,
                    device: torch.device) -> torch.optim.AdamW:
    for g in groups:
        g.setdefault("wd_scale", g.get("weight_decay", optim.weight_decay) / optim.weight_decay
                     if optim.weight_decay > 0 else 0.0)
    # fused AdamW is one kernel per step on CUDA; on CPU the foreach path is the fast one
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=peak_lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused, foreach=None if fused else True)


class Schedules:
    """lr (timm cosine with warmup prefix, or constant) and weight decay for optimiser update `step`."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, *, peak_lr: float,
                 total_steps: int, warmup_steps: int):
        """`peak_lr`, `total_steps` and `warmup_steps` as `vfm.recipes.derive.resolve_stage` resolved them."""
        self.optimizer, self.optim, self.total = optimizer, optim, total_steps
        self.warmup = warmup_steps
        if self.warmup >= total_steps:
            raise RecipeError(f"warmup of {self.warmup} updates is not shorter than the run's {total_steps} "
                              "updates; shorten optim.warmup_steps / warmup_epochs or train longer")
        lr_min = peak_lr if optim.schedule == "constant" else optim.min_lr
        self.lr = CosineLRScheduler(optimizer, t_initial=total_steps - self.warmup, lr_min=lr_min,
                                    warmup_t=self.warmup, warmup_lr_init=optim.warmup_lr_init,
                                    warmup_prefix=True, t_in_epochs=False)

    def weight_decay(self, step: int) -> float:
        start, end = self.optim.weight_decay, self.optim.weight_decay_end
        if end is None:
            return start
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / max(1, self.total)))

    def apply(self, step: int) -> None:
        """Set every group's lr / weight decay for update `step` (0-based)."""
        self.lr.step_update(step)
        wd = self.weight_decay(step)
        for g in self.optimizer.param_groups:
            g["weight_decay"] = wd * g["wd_scale"]
            if step < g.get("frozen_until_step", 0):
                g["lr"] = 0.0

    def current_lr(self) -> float:
        """The lr of an unscaled group (the recipe's lr at this update)."""
        return max(g["lr"] / g.get("lr_scale", 1.0) for g in self.optimizer.param_groups
                   if g.get("lr_scale", 1.0) > 0)

    def state_dict(self) -> dict[str, Any]:
        return self.lr.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr.load_state_dict(state)
