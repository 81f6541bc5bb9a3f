"""DINOv2's per-iteration schedules that the shared loop does not own (teacher momentum, teacher
temperature, last-layer freeze). The loop steps lr (warmup + cosine, `OptimConfig`) and the cosine
weight decay (`weight_decay` → `weight_decay_end`) itself.

Formulas follow `dinov2/utils/utils.py::CosineScheduler` (an array indexed by iteration; past the end
it returns the final value): a cosine from `base` at iteration 0 towards `final` over the
non-warmup iterations, after a linear warmup `linspace(start_warmup, base, warmup_iters)`.
"""

from __future__ import annotations

import math

from vfm.recipes.schema import SSLConfig


def cosine(step: int, base: float, final: float, total: int, warmup: int = 0, start_warmup: float = 0.0) -> float:
    if step >= total:
        return final
    if step < warmup:
        # np.linspace(start_warmup, base, warmup) includes both ends
        return start_warmup + (base - start_warmup) * (step / (warmup - 1) if warmup > 1 else 1.0)
    n = total - warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / n))


def linear(step: int, start: float, end: float, total: int) -> float:
    if step >= total - 1 or total <= 1:
        return end
    return start + (end - start) * step / (total - 1)


def teacher_momentum(ssl: SSLConfig, step: int, total: int) -> float:
    """EMA momentum of the teacher for the update after optimiser step `step` (seed 003: linear
    0.996 → 1.0; upstream, and seed 004's vfm default: cosine 0.994 → 1.0)."""
    if ssl.momentum_schedule == "linear":
        return linear(step, ssl.momentum_start, ssl.momentum_end, total)
    return cosine(step, ssl.momentum_start, ssl.momentum_end, total)


def teacher_temperature(ssl: SSLConfig, step: int, total: int, epoch_len: int) -> float:
    """Linear warmup teacher_temp_start → teacher_temp_end over `teacher_temp_warmup_epochs`, then constant."""
    warmup = min(total, round(ssl.teacher_temp_warmup_epochs * epoch_len))
    return cosine(step, ssl.teacher_temp_end, ssl.teacher_temp_end, total, warmup, ssl.teacher_temp_start)


def last_layer_frozen_until(ssl: SSLConfig, epoch_len: int) -> int:
    """First optimiser step at which the head's prototype layer gets a non-zero lr."""
    return round(ssl.freeze_last_layer_epochs * epoch_len)
