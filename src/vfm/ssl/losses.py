"""DINOv2 losses (facebookresearch/dinov2 `dinov2/loss/*`, `train/ssl_meta_arch.py`).

- `DINOLoss`: cross-entropy between the teacher's CLS distribution of one global crop and the
  student's of every *other* crop. Teacher targets come from centering (EMA centre, momentum 0.9)
  or from Sinkhorn-Knopp (3 iterations, sums all-reduced so the equipartition is over the global batch).
- `IBOTPatchLoss`: the same on masked patch tokens: teacher sees the unmasked global crop, the student
  the masked one, the loss is taken at the masked positions, averaged per image then over images.
- `koleo_loss`: Kozachenko-Leonenko entropy estimator on the L2-normalised student CLS features,
  `-mean(log(distance to nearest neighbour))`; spreads features within each rank's batch.

All teacher-side statistics (centre, Sinkhorn-Knopp sums, masked-token counts) are all-reduced when
torch.distributed is initialised, so 2 ranks × B equals 1 rank × 2B up to float rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from vfm.dist import is_distributed, rank_and_world


def _world() -> int:
    return rank_and_world()[1]


def _all_reduce_(t: Tensor) -> Tensor:
    """Sum over ranks in place, on the tensor's own device (the loss runs where the model does)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                   n_rows_total: int | Tensor | None = None) -> Tensor:
    """Teacher targets with equal prototype mass over the *global* batch (SwAV/DINOv2).

    `teacher_logits` is this rank's (B, K). Returns (B, K) whose rows each sum to exactly 1 and whose
    columns sum to ≈ B_global / K summed over ranks (exact in the limit of iterations).
    `n_rows_total` overrides the all-reduced row count (iBOT: the number of masked patches on all ranks).
    """
    q = torch.exp(teacher_logits.float() / teacher_temp).t()  # K × B
    k = q.shape[0]
    b = q.shape[1] * _world() if n_rows_total is None else n_rows_total
    q /= _all_reduce_(q.sum())
    for _ in range(n_iterations):
        # prototypes (rows of q) get mass 1/K each, summed over every rank's samples
        q /= _all_reduce_(q.sum(dim=1, keepdim=True))
        q /= k
        # samples (columns) get mass 1/B each; local, as every sample lives on one rank
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


class _Centering(nn.Module):
    """EMA of the mean teacher logits, subtracted before the teacher softmax (DINO's centering)."""

    def __init__(self, out_dim: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_centered(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """Fold in the mean over every rank's rows (sum and count reduced separately, so a rank with
        no rows, e.g. no masked patch, neither divides by zero nor skews the mean)."""
        stats = torch.cat([teacher_logits.float().sum(0), teacher_logits.new_tensor([teacher_logits.shape[0]])])
        stats = _all_reduce_(stats.float())
        if stats[-1] > 0:
            batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
            self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)


class _TeacherTargets(nn.Module):
    """Teacher logits → target distributions, by centering (EMA centre) or Sinkhorn-Knopp."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, centering: str = "sinkhorn_knopp",
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp = student_temp
        self.centering = centering
        self.centre = _Centering(out_dim, center_momentum)

    @torch.no_grad()
    def _targets(self, teacher_logits: Tensor, teacher_temp: float, n_rows_total: Tensor | None = None) -> Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, n_rows_total=n_rows_total)
        targets = self.centre.softmax_centered(teacher_logits, teacher_temp)
        self.centre.update(teacher_logits)
        return targets


class DINOLoss(_TeacherTargets):
    @torch.no_grad()
    def teacher_targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """(N, K) logits → (N, K) target distributions; updates the EMA centre when centering."""
        return self._targets(teacher_logits, teacher_temp)

    def forward(self, student_global: Tensor, student_local: Tensor | None, targets: Tensor,
                n_global: int) -> Tensor:
        """DINOv2's CLS loss for `n_global` global crops.

        `student_global` is (n_global·B, K) crop-major, `student_local` (n_local·B, K) or None,
        `targets` (n_global·B, K) from `teacher_targets` of the teacher's global crops.
        Every (student crop, teacher crop) pair of *different* views is one term: n_local·n_global local
        terms and n_global·(n_global-1) global ones; the total is divided by the number of terms. With 2
        global crops this equals upstream's swapped-teacher term × 2 / 18 plus local terms / 18.
        """
        t = targets.float().unflatten(0, (n_global, -1))  # G × B × K
        g_logp = F.log_softmax(student_global.float() / self.student_temp, dim=-1).unflatten(0, (n_global, -1))
        # ce[i, j] = mean over images of CE(teacher crop j, student crop i)
        ce_global = -torch.einsum("jbk,ibk->ij", t, g_logp) / t.shape[1]
        off_diag = ~torch.eye(n_global, dtype=torch.bool, device=ce_global.device)
        total = ce_global[off_diag].sum()
        n_terms = n_global * (n_global - 1)
        if student_local is not None and student_local.numel():
            l_logp = F.log_softmax(student_local.float() / self.student_temp, dim=-1).unflatten(
                0, (-1, t.shape[1]))
            total = total - torch.einsum("jbk,ibk->", t, l_logp) / t.shape[1]
            n_terms += l_logp.shape[0] * n_global
        if n_terms == 0:
            raise ValueError("the DINO loss needs ≥ 2 global crops or ≥ 1 local crop (no pair of views)")
        return total / n_terms


class IBOTPatchLoss(_TeacherTargets):
    @torch.no_grad()
    def teacher_targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """(M, K) logits of this rank's masked patches → targets (Sinkhorn over all ranks' patches)."""
        n_total = None
        if self.centering == "sinkhorn_knopp":
            n_total = _all_reduce_(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        return self._targets(teacher_logits, teacher_temp, n_rows_total=n_total)

    def forward(self, student_logits: Tensor, targets: Tensor, masks: Tensor) -> Tensor:
        """`student_logits`, `targets`: (M, K) at the masked positions, in `masks.flatten()` order;
        `masks`: (N_images, N_patches) bool. Per-image mean over its masked patches, then the mean
        over *all* images (unmasked images count as 0, as upstream's `/ masks.shape[0]`)."""
        ce = -(targets.float() * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(-1)
        per_image = masks.sum(-1).clamp(min=1).float()
        weight = (1.0 / per_image).unsqueeze(-1).expand_as(masks)[masks]
        return (ce * weight).sum() / masks.shape[0]


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko regulariser: -mean_i log ||x_i - x_nn(i)|| on L2-normalised rows.

    Computed in fp32 outside autocast as upstream: the log of a small distance is ill-conditioned.
    """
    if features.shape[0] < 2:
        raise ValueError(f"KoLeo needs ≥ 2 samples per rank and crop, got {features.shape[0]}")
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # below any cosine, so a sample is never its own neighbour
            nn_index = dots.argmax(dim=1)
        dist_nn = F.pairwise_distance(x, x[nn_index], p=2, eps=eps)
        return -torch.log(dist_nn + eps).mean()
