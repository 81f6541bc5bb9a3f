"""Top-k classification accuracy over an iterable of batches, sharded across ranks with exact counts.

Each rank evaluates its own disjoint samples and keeps integer (correct@k, total) counts per group;
the counts are summed over ranks at the end. Nothing is padded or duplicated, so an accuracy is
always (correct samples) / (samples in the dataset). Logits never accumulate in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vfm.dist import all_reduce_sum, is_distributed
from vfm.evaluate.batches import Batch, iter_progress, model_input, split_batch

ALL = "all"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample hit flags for each k: {k: BoolTensor[n]} (a label among the k highest logits)."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"top-k: logits must be [n, C] and labels [n]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"top-k: labels must lie in [0, {logits.shape[1]}); got range "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.to(top.device).unsqueeze(1)
    return {k: hits[:, :k].any(dim=1) for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent of one set of logits (single process)."""
    if labels.numel() == 0:
        raise ValueError("top-k: no samples")
    return {k: 100.0 * v.sum().item() / labels.numel() for k, v in topk_correct(logits, labels, ks).items()}


@dataclass
class TopkCounts:
    """Exact integer counts; `accuracy()` turns them into percent."""

    ks: tuple[int, ...] = (1, 5)
    correct: dict[int, int] = field(default_factory=dict)
    total: int = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for k, hit in topk_correct(logits, labels, self.ks).items():
            self.correct[k] = self.correct.get(k, 0) + int(hit.sum().item())
        self.total += int(labels.numel())

    def accuracy(self) -> dict[str, float]:
        if self.total == 0:
            raise ValueError("top-k: no samples were evaluated")
        return {f"top{k}": 100.0 * self.correct.get(k, 0) / self.total for k in self.ks}

    def error(self, k: int = 1) -> float:
        """Top-k error as a fraction (ImageNet-C's E)."""
        if self.total == 0:
            raise ValueError("top-k: no samples were evaluated")
        return 1.0 - self.correct.get(k, 0) / self.total


@torch.inference_mode()
def classify(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    ks: Sequence[int] = (1, 5),
    device: str | torch.device = "cpu",
    columns: torch.Tensor | None = None,
    label_map: torch.Tensor | None = None,
    group_by: Callable[[dict[str, Any]], Hashable] | None = None,
    autocast_dtype: torch.dtype | None = None,
    description: str = "classify",
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[Hashable, TopkCounts]:
    """Run `model` over this rank's batches and return top-k counts summed over all ranks, per group.

    `columns` selects logit columns before top-k (a bool mask such as the ImageNet-R mask, or an index
    tensor) and `label_map` maps dataset labels to positions among them (see `align_classes`); a sample
    whose class maps to -1 is an error, never silently scored as wrong. `group_by(meta_row)` splits the counts, e.g.
    by (corruption, severity) for ImageNet-C; without it there is one group, `ALL`. `normalize` turns the loader's
    uint8 images into the model's input on the device (vfm.data.transforms.DeviceNormalize).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    groups: dict[Hashable, TopkCounts] = {}
    try:
        for batch in iter_progress(batches, description):
            images, labels, meta = split_batch(batch)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(model_input(images, device, normalize))
            logits = logits.float()
            if columns is not None:
                logits = logits[:, columns.to(logits.device)]
            labels = labels.to(logits.device, torch.int64)
            if label_map is not None:
                labels = _map_labels(labels, label_map.to(logits.device), meta, description)
            if group_by is None:
                groups.setdefault(ALL, TopkCounts(tuple(ks))).update(logits, labels)
                continue
            if meta is None:
                raise ValueError(f"{description}: grouping needs per-sample metadata, but the batches carry none "
                                 "(build the loader with with_meta=True)")
            keys = [group_by(m) for m in meta]
            for key in dict.fromkeys(keys):
                idx = torch.tensor([i for i, k in enumerate(keys) if k == key], device=logits.device)
                groups.setdefault(key, TopkCounts(tuple(ks))).update(logits[idx], labels[idx])
    finally:
        model.train(was_training)
    return reduce_counts(groups, ks)


def _map_labels(labels: torch.Tensor, label_map: torch.Tensor, meta: list[dict] | None, where: str) -> torch.Tensor:
    if labels.numel() and (labels.min() < 0 or labels.max() >= label_map.numel()):
        raise ValueError(f"{where}: label {labels.max().item()} is outside the dataset's {label_map.numel()} classes")
    mapped = label_map[labels]
    bad = (mapped < 0).nonzero().flatten().tolist()
    if bad:
        keys = [meta[i].get("key") for i in bad[:3]] if meta else []
        raise ValueError(f"{where}: {len(bad)} sample(s) of this batch (labels {labels[bad][:3].tolist()}"
                         f"{', keys ' + str(keys) if keys else ''}) belong to classes the evaluated head cannot "
                         "predict; check that the dataset matches the suite")
    return mapped


def reduce_counts(groups: dict[Hashable, TopkCounts], ks: Sequence[int]) -> dict[Hashable, TopkCounts]:
    """Sum counts over ranks. Ranks may have seen different groups, so the group keys are agreed first."""
    if not is_distributed():
        return groups
    import torch.distributed as dist

    key_lists: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(key_lists, list(groups))
    keys = sorted({k for ks_ in key_lists for k in ks_}, key=repr)
    local = torch.tensor([[groups[k].correct.get(kk, 0) if k in groups else 0 for kk in ks]
                          + [groups[k].total if k in groups else 0] for k in keys], dtype=torch.int64)
    summed = all_reduce_sum(local.view(-1)).view(len(keys), len(ks) + 1) if keys else local
    return {key: TopkCounts(tuple(ks), {kk: int(row[i]) for i, kk in enumerate(ks)}, int(row[-1]))
            for key, row in zip(keys, summed.tolist(), strict=True)}


def align_classes(
    head_classes: Sequence[str], data_classes: Sequence[str], *, keep: torch.Tensor | None = None, where: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(columns, label_map) that score a head on a dataset whose class list differs from the head's.

    `keep` (bool mask over the head, e.g. the ImageNet-R mask) restricts the prediction to those
    columns, in head order. `label_map[dataset label]` is the target's position among the kept columns
    (-1: the class cannot be predicted; a sample of it is an error). Both None: lists are identical.
    """
    head, data = list(head_classes), list(data_classes)
    if keep is None and head == data:
        return None, None
    if not head:
        raise ValueError(f"{where}: the model's class list is unknown (export meta has no wnids) and the dataset "
                         f"has {len(data)} classes; re-export the model with `wnids` set")
    kept = [w for w, k in zip(head, keep.tolist(), strict=True) if k] if keep is not None else head
    position = {w: i for i, w in enumerate(kept)}
    label_map = torch.tensor([position.get(c, -1) for c in data], dtype=torch.int64)
    if keep is None and not (label_map >= 0).any():
        raise ValueError(f"{where}: none of the dataset's classes (e.g. {data[:3]}) are in the model's head "
                         f"(e.g. {head[:3]}); evaluate with a model trained on these classes")
    return (keep if keep is not None else None), label_map
