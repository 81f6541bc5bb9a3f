"""What evaluation accepts as a batch, so it does not depend on any particular loader.

A batch is `(images, labels)` or `(images, labels, meta)` (tuple/list), or a mapping with keys
`image`/`label`/`meta`. `meta` carries per-sample metadata such as ImageNet-C's corruption and
severity, either as a list of dicts (one per sample) or as a dict of per-sample sequences (what
torch's default collate makes of dicts); `split_batch` returns it as a list of dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

Batch = Sequence[Any] | Mapping[str, Any]
T = TypeVar("T")


def split_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]] | None]:
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"evaluation batch: a mapping needs keys 'image' and 'label', got {sorted(batch)}")
        images, labels, meta = batch["image"], batch["label"], batch.get("meta")
    elif isinstance(batch, Sequence) and len(batch) in (2, 3):
        images, labels = batch[0], batch[1]
        meta = batch[2] if len(batch) == 3 else None
    else:
        raise ValueError("evaluation batch: expected (images, labels[, meta]) or a mapping, "
                         f"got {type(batch).__name__}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"evaluation batch: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    return images, labels, _meta_rows(meta, labels.shape[0])


def model_input(images: torch.Tensor, device: torch.device,
                normalize: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """`images` on `device` as the model takes them: vfm's loaders give uint8 (timm's prefetcher convention),
    which `normalize` (vfm.data.transforms.DeviceNormalize) converts there; other batches go as they are."""
    images = images.to(device, non_blocking=True)
    if normalize is not None:
        return normalize(images)
    if images.dtype == torch.uint8:
        raise ValueError("evaluation batch: uint8 images and no normalize; pass "
                         "normalize=vfm.data.transforms.device_normalize(data_config, device, is_training=False)")
    return images


def _meta_rows(meta: Any, n: int) -> list[dict[str, Any]] | None:
    if meta is None:
        return None
    if isinstance(meta, Mapping):
        rows = [{k: _item(v[i]) for k, v in meta.items()} for i in range(n)]
    else:
        rows = [dict(m) for m in meta]
    if len(rows) != n:
        raise ValueError(f"evaluation batch: {n} samples but {len(rows)} metadata rows")
    return rows


def _item(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def iter_progress(items: Iterable[T], description: str) -> Iterator[T]:
    """Iterate with a rich progress line on rank 0 (the only rank that prints)."""
    from vfm.dist import rank_and_world

    rank, _ = rank_and_world()
    if rank != 0:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
