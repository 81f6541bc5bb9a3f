"""k-NN classification on frozen features (the DINOv2 protocol, facebookresearch/dinov2 dinov2/eval/knn.py).

Features are L2-normalised, so cosine similarity is a matmul. The T-weighted vote follows
`dinov2/eval/knn.py`: weights = softmax(top-k similarities / T) over the `max(ks)` neighbours, and the
class score for a given k sums the weights of its first k neighbours. (The softmax denominator is
shared by all classes of a row, so it never changes a ranking; it only keeps exp() finite.)

Memory: similarities are computed for a block of test rows against a block of train rows at a time,
keeping a running top-`max(ks)` per test row, so at most `block_size × block_size` similarities
exist at once — never an N×N matrix.

Distributed (torch.distributed initialised): each rank passes its *own* disjoint shard of train and
test features. Test features are gathered to every rank (they are small: N_test × D), every rank
finds the top-k among its train shard, the per-rank candidates are gathered and merged into the
global top-k. Every rank ends with the same predictions for the whole test set, in rank order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from vfm.dist import all_gather_uneven, is_distributed, rank_and_world
from vfm.evaluate.batches import Batch, iter_progress, model_input, split_batch

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    block_size: int = 4096,
    top: int = 5,
) -> dict[int, torch.Tensor]:
    """For each k, the `top` highest-voted classes of every test row: {k: LongTensor[n_test, top]}.

    Inputs must already be L2-normalised (see `l2_normalise`). `num_classes` defaults to
    `max(train label) + 1` over all ranks, as in DINOv2. Distributed: see the module docstring; the
    result then covers the gathered test set of all ranks.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"knn: ks must be positive integers, got {ks}")
    if temperature <= 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}")
    if test_feats.shape[0] == 0 and train_feats.ndim == 2:  # a rank with no test samples still joins in
        test_feats = test_feats.new_empty((0, train_feats.shape[1]))
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"knn: features must be [N, D] with the same D; got train {tuple(train_feats.shape)}, "
                         f"test {tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"knn: {train_feats.shape[0]} train features but labels of shape {tuple(train_labels.shape)}")
    train_labels = train_labels.to(train_feats.device, torch.int64)
    test_feats = all_gather_uneven(test_feats.to(train_feats.device, train_feats.dtype))
    max_k = ks[-1]
    n_train_total = _global_count(train_feats.shape[0], train_feats.device)
    if n_train_total < max_k:
        raise ValueError(f"knn: k={max_k} needs at least {max_k} train samples, have {n_train_total}")
    label_max = _global_max_label(train_labels)
    if num_classes is None:
        num_classes = label_max + 1
    elif label_max >= num_classes:
        raise ValueError(f"knn: train label {label_max} is out of range for num_classes={num_classes}")
    top = min(top, num_classes)

    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, test_feats.shape[0], block_size):
        block = test_feats[start : start + block_size]
        sims, labels = _local_topk(block, train_feats, train_labels, max_k, block_size)
        if is_distributed():
            sims, labels = _merge_ranks(sims, labels, max_k)
        weights = torch.softmax(sims / temperature, dim=1)
        for k in ks:
            # scatter the first k weights onto their classes: [b, C], never [b, k, C] one-hots
            scores = torch.zeros((block.shape[0], num_classes), dtype=weights.dtype, device=weights.device)
            scores.scatter_add_(1, labels[:, :k], weights[:, :k])
            preds[k].append(scores.topk(top, dim=1).indices)
    empty = torch.empty((0, top), dtype=torch.int64, device=train_feats.device)
    return {k: torch.cat(v) if v else empty for k, v in preds.items()}


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    block_size: int = 4096,
    topk: Iterable[int] = (1, 5),
) -> dict[str, float]:
    """k-NN accuracy in percent: {"k20.top1": 78.1, "k20.top5": 92.3, ...} over all ranks' test samples.

    Each rank passes its own disjoint train/test shards (or the full sets when not distributed); counts
    are exact — every test sample counts once.
    """
    topk = tuple(topk)
    preds = knn_predict(train_feats, train_labels, test_feats, ks=ks, temperature=temperature,
                        num_classes=num_classes, block_size=block_size, top=max(topk))
    labels = all_gather_uneven(test_labels.to(train_feats.device, torch.int64))
    out: dict[str, float] = {}
    for k, p in preds.items():
        if p.shape[0] != labels.shape[0]:
            raise ValueError(f"knn: {p.shape[0]} test features but {labels.shape[0]} test labels")
        if labels.numel() == 0:
            raise ValueError("knn: no test samples")
        hits = p == labels.unsqueeze(1)
        for t in topk:
            out[f"k{k}.top{t}"] = 100.0 * hits[:, :t].any(dim=1).sum().item() / labels.shape[0]
    return out


def l2_normalise(feats: torch.Tensor) -> torch.Tensor:
    return F.normalize(feats.float(), dim=1, p=2)


def cls_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's image embedding before any classifier: for timm ViTs the final-norm CLS token
    (`forward_head(pre_logits=True)` with token pooling; DINOv2's `x_norm_clstoken`), for ConvNeXt
    the pooled, normed features. A module without timm's API is called directly."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    return model(images)


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    device: str | torch.device = "cpu",
    feature_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = cls_features,
    autocast_dtype: torch.dtype | None = None,
    description: str = "features",
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of this rank's batches: (float32 [n, D], int64 [n]). `normalize` as
    `classify` takes it.

    Features stay on `device` and on this rank; `knn_classify` does the cross-rank part.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for batch in iter_progress(batches, description):
            images, target, _ = split_batch(batch)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = feature_fn(model, model_input(images, device, normalize))
            feats.append(l2_normalise(out))
            labels.append(target.to(device, torch.int64))
    finally:
        model.train(was_training)
    if not feats:
        return torch.empty((0, 0), device=device), torch.empty((0,), dtype=torch.int64, device=device)
    return torch.cat(feats), torch.cat(labels)


def _local_topk(
    queries: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, k: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over train blocks: (similarities, labels), each [n_query, k] (-inf/0 when short)."""
    n = queries.shape[0]
    best_sims = torch.full((n, k), float("-inf"), dtype=queries.dtype, device=queries.device)
    best_labels = torch.zeros((n, k), dtype=torch.int64, device=queries.device)
    for start in range(0, train.shape[0], block_size):
        sims = queries @ train[start : start + block_size].T
        # top-k inside the block first, then merge 2k candidates: the running set never grows with the block
        block_sims, idx = sims.topk(min(k, sims.shape[1]), dim=1)
        block_labels = train_labels[start : start + block_size][idx]
        best_sims, pick = torch.cat([best_sims, block_sims], dim=1).topk(k, dim=1)
        best_labels = torch.cat([best_labels, block_labels], dim=1).gather(1, pick)
    return best_sims, best_labels


def _merge_ranks(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each rank's top-k candidates for the same test rows and keep the global top-k."""
    _, world = rank_and_world()
    n = sims.shape[0]
    # all ranks loop over the same gathered test blocks, so every rank contributes the same n rows
    all_sims = all_gather_uneven(sims).view(world, n, k).permute(1, 0, 2).reshape(n, world * k)
    all_labels = all_gather_uneven(labels).view(world, n, k).permute(1, 0, 2).reshape(n, world * k)
    best, idx = all_sims.topk(k, dim=1)
    return best, all_labels.gather(1, idx)


def _global_count(n: int, device: torch.device) -> int:
    from vfm.dist import all_reduce_sum

    return int(all_reduce_sum(torch.tensor([n], dtype=torch.int64, device=device)).item())


def _global_max_label(labels: torch.Tensor) -> int:
    local = labels.max() if labels.numel() else torch.tensor(-1, device=labels.device)
    return int(all_gather_uneven(local.view(1)).max().item())
