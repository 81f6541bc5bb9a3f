"""DINOv2 pretraining as a `Task` (vfm.train.task) run by the shared loop (`vfm train RECIPE --stage pretrain`).

Per update (after facebookresearch/dinov2 `dinov2/train/ssl_meta_arch.py::forward_backward`): the EMA
teacher (eval mode, no drop-path, no grad) embeds the clean global crops → DINO targets (centering or
Sinkhorn-Knopp at the scheduled teacher temperature) and iBOT targets at the masked patches; the
student embeds the masked global crops and the local crops; loss = DINO + w_ibot · iBOT + w_koleo ·
KoLeo(student global CLS, per crop). After the optimiser step the teacher follows the student with the
scheduled momentum, shard by shard under FSDP2.

The loop owns lr (base × batch scaling rule, warmup, cosine), the cosine weight-decay schedule,
clipping, precision, DDP/FSDP2, checkpoints and resume; this task adds the teacher, the loss centres
(both saved in the checkpoint), teacher temperature / momentum schedules, the last-layer freeze
(`frozen_until_step` param-group flag), the periodic teacher k-NN and the export of the teacher backbone.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from vfm.data.transforms import DeviceNormalize, device_normalize
from vfm.errors import UserError
from vfm.export import ExportMeta
from vfm.models import build_model, forward_flops, model_kwargs
from vfm.recipes.errors import RecipeError
from vfm.recipes.schema import Recipe
from vfm.ssl import schedules
from vfm.ssl.heads import LAST_LAYER
from vfm.ssl.losses import DINOLoss, IBOTPatchLoss, koleo_loss
from vfm.ssl.model import SSLModel, ema_update, reshard, uniform_drop_path
from vfm.ssl.multicrop import MultiCropTransform, make_collate
from vfm.tasks import DINOV2
from vfm.tasks.common import ManifestData, load_manifest
from vfm.train.parallel import unwrap
from vfm.train.task import StatefulLoader, TaskContext

log = logging.getLogger(__name__)

# parameters DINOv2 puts in "layer 0" for layer-wise decay (dinov2/utils/param_groups.py)
_EMBED_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")


class DinoTask(ManifestData):
    """Self-distillation with an EMA teacher on multi-crop views of a sharded dataset."""

    def __init__(self, data: str, *, num_workers: int = 0, knn_train: str | None = None,
                 knn_val: str | None = None) -> None:
        if (knn_train is None) != (knn_val is None):
            raise UserError("k-NN during pretraining needs both --knn-train and --knn-val (labelled manifests)")
        self.data_url, self.num_workers = data, num_workers
        self.knn_train, self.knn_val = knn_train, knn_val
        self.knn_history: list[dict[str, float]] = []

    # ---- modules -------------------------------------------------------------------------------
    def build(self, ctx: TaskContext) -> None:
        recipe = ctx.recipe
        if recipe.ssl is None or ctx.stage.name != "pretrain":
            raise RecipeError(f"{recipe.id}/{ctx.stage.name}: DINOv2 training needs a recipe with `ssl` and the "
                              "pretrain stage")
        if recipe.model.family != "vit":
            raise RecipeError(f"{recipe.id}: DINOv2 training needs a ViT backbone, got family {recipe.model.family}")
        self.ctx, self.ssl = ctx, recipe.ssl
        st = ctx.config
        self.crops = st.data.multicrop
        assert self.crops is not None  # the schema requires multicrop with ssl
        if st.batch.micro_batch < 2 and self.ssl.koleo:
            raise RecipeError(f"{recipe.id}: KoLeo needs ≥ 2 images per rank (stages.pretrain.batch.micro_batch="
                              f"{st.batch.micro_batch}); raise micro_batch or set ssl.koleo=false")
        if self.ssl.ibot and self.ssl.ibot_separate_head is False and self.ssl.ibot_prototypes != self.ssl.head_prototypes:
            log.info("iBOT shares the DINO head: using its %d prototypes", self.ssl.head_prototypes)
        backbone = build_model(recipe, ctx.stage.name, device=ctx.init_device, **DINOV2.model_overrides)
        uniform_drop_path(backbone, st.drop_path)
        with torch.device(ctx.init_device):
            self.student = SSLModel(backbone, self.ssl)
        # the teacher starts as the student (upstream `prepare_for_distributed_training`); never dropped-path
        teacher = copy.deepcopy(self.student)
        uniform_drop_path(teacher.backbone, 0.0)
        teacher.requires_grad_(False).eval()
        self.teacher = ctx.shard(teacher)
        ibot_k = self.ssl.ibot_prototypes if self.ssl.ibot_separate_head else self.ssl.head_prototypes
        self.dino_loss = DINOLoss(self.ssl.head_prototypes, self.ssl.student_temp, self.ssl.centering,
                                  self.ssl.center_momentum).to(ctx.init_device)
        self.ibot_loss = IBOTPatchLoss(ibot_k, self.ssl.student_temp, self.ssl.centering,
                                       self.ssl.center_momentum).to(ctx.init_device)
        self.epoch_len = ctx.stage.steps_per_epoch  # DINOv2's fixed 1,250-iteration epoch (resolve_stage)
        self.patch_size = self.student.patch_size
        self.normalize = DeviceNormalize(st.data.mean, st.data.std)  # the crops arrive as uint8

    def trainable(self) -> nn.Module:
        return self.student

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "dino_loss": self.dino_loss,
                "ibot_loss": self.ibot_loss}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """DINOv2's groups (facebookresearch/dinov2 dinov2/utils/param_groups.py): no weight decay on
        biases, norms and layer-scale gammas only (the position embedding and the CLS and mask tokens are
        decayed, as upstream), patch-embed lr × mult, layer-wise lr decay when set, and the prototype layer
        frozen for `freeze_last_layer_epochs`."""
        optim = self.ctx.config.optim
        bare = unwrap(model)
        depth = len(bare.blocks)
        frozen_until = schedules.last_layer_frozen_until(self.ssl, self.epoch_len)
        groups: dict[tuple[float, float, int], list[nn.Parameter]] = {}
        for name, p in bare.named_parameters():
            if not p.requires_grad:
                continue
            wd = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else optim.weight_decay
            scale = optim.patch_embed_lr_mult if "patch_embed" in name else 1.0
            if optim.layer_decay is not None:
                scale *= optim.layer_decay ** (depth + 1 - _layer_id(name, depth))
            frozen = frozen_until if LAST_LAYER in name else 0
            groups.setdefault((wd, scale, frozen), []).append(p)
        out = []
        for (wd, scale, frozen), params in groups.items():
            g: dict[str, Any] = {"params": params, "weight_decay": wd, "lr_scale": scale}
            if frozen:
                g["frozen_until_step"] = frozen
            out.append(g)
        return out

    # ---- data ----------------------------------------------------------------------------------
    def make_loader(self, rank: int, world_size: int, seed: int) -> StatefulLoader:
        from vfm.data.loader import build_loader

        st = self.ctx.config
        transform = MultiCropTransform(self.crops)
        collate = make_collate(self.ssl, self.crops, self.patch_size)
        return build_loader(self.manifest, transform=transform, batch_size=st.batch.micro_batch, rank=rank,
                            world_size=world_size, seed=seed, shuffle=True, epoch_length=st.num_samples,
                            num_workers=self.num_workers, drop_last=True, collate_fn=collate)

    # ---- step ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor | float]]:
        ssl, total = self.ssl, self.ctx.stage.total_steps
        n_global = self.crops.global_crops_count
        glob, masks = self.normalize(batch["global"]), batch["masks"]
        local = self.normalize(batch["local"]) if batch["local"] is not None else None
        temp = schedules.teacher_temperature(ssl, step, total, self.epoch_len)
        with torch.no_grad():
            t_out = self.teacher(glob, None, masks, mask_input=False)
            reshard(self.teacher)
            dino_targets = self.dino_loss.teacher_targets(t_out.global_logits, temp)
            ibot_targets = (self.ibot_loss.teacher_targets(t_out.patch_logits, temp)
                            if ssl.ibot and t_out.patch_logits is not None else None)
        s_out = model(glob, local, masks, mask_input=True)
        dino = self.dino_loss(s_out.global_logits, s_out.local_logits, dino_targets, n_global)
        loss = dino
        metrics: dict[str, Tensor | float] = {"dino_loss": dino.detach(), "teacher_temp": temp}
        if ibot_targets is not None and s_out.patch_logits is not None:
            ibot = self.ibot_loss(s_out.patch_logits, ibot_targets, masks)
            # upstream scales the patch loss by loss_scales (2) × ibot_loss_scale (1 / n_global_crops)
            # (dinov2/train/ssl_meta_arch.py forward_backward): 1 with its 2 global crops, 2/n with n
            loss = loss + ssl.ibot_loss_weight * (2 / n_global) * ibot
            metrics["ibot_loss"] = ibot.detach()
            metrics["masked_patches"] = masks.sum().float()
        if ssl.koleo:
            koleo = sum(koleo_loss(c) for c in s_out.global_cls.chunk(n_global))
            loss = loss + ssl.koleo_loss_weight * koleo
            metrics["koleo_loss"] = koleo.detach()
        metrics.update(collapse_stats(t_out.global_cls, dino_targets))
        return loss, metrics

    def after_update(self, model: nn.Module, step: int) -> dict[str, float]:
        momentum = schedules.teacher_momentum(self.ssl, step, self.ctx.stage.total_steps)
        ema_update(self.teacher, unwrap(model), momentum)
        metrics = {"train/teacher_momentum": momentum}
        every = self.ctx.recipe.eval.knn_every_steps
        if self.knn_train and every and (step + 1) % every == 0:
            metrics.update({f"knn/{k}": v for k, v in self.knn().items()})
        return metrics

    def clip_groups(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """Clipped one by one, as upstream clips each student module (dinov2/train/train.py
        `for v in model.student.values(): v.clip_grad_norm_(cfg.optim.clip_grad)`): the backbone, the DINO
        head and (when separate) the iBOT head."""
        bare = unwrap(model)
        mods = [bare.backbone, bare.dino_head] + ([bare.ibot_head] if bare.ibot_head is not None else [])
        extra = [p for n, p in bare.named_parameters() if not n.startswith(("backbone.", "dino_head.", "ibot_head."))]
        groups = [[p for p in m.parameters() if p.requires_grad] for m in mods]
        groups[0] += [p for p in extra if p.requires_grad]  # the mask token sits in upstream's backbone
        return groups

    # ---- k-NN of the teacher ---------------------------------------------------------------------
    def knn(self) -> dict[str, float]:
        """Weighted k-NN (vfm.evaluate.knn, DINOv2 protocol) of the teacher backbone's L2-normalised CLS
        token on the held-out labelled sets; every rank extracts its own shard, results are global."""
        from vfm.data.loader import build_loader
        from vfm.data.transforms import build_transform
        from vfm.evaluate.knn import extract_features, knn_classify

        if not (self.knn_train and self.knn_val):
            raise UserError("k-NN needs --knn-train and --knn-val manifests")
        ctx, st = self.ctx, self.ctx.config
        data = st.data.model_copy(update={"resolution": self.crops.global_crops_size})
        transform = build_transform(data, is_training=False)
        train_m, val_m = load_manifest(self.knn_train), load_manifest(self.knn_val)
        feats = []
        for m in (train_m, val_m):
            loader = build_loader(m, transform=transform, batch_size=st.batch.micro_batch, rank=ctx.rank,
                                  world_size=ctx.world_size, seed=0, shuffle=False, drop_last=False)
            feats.append(extract_features(self.teacher, loader, device=ctx.device, description="k-NN features",
                                          feature_fn=lambda t, x: t(x, cls_only=True),
                                          normalize=device_normalize(data, ctx.device, is_training=False)))
        reshard(self.teacher)
        (tr_f, tr_l), (va_f, va_l) = feats
        ks = [k for k in self.ctx.recipe.eval.knn_k if k <= train_m.num_samples]
        if not ks:
            raise UserError(f"{self.knn_train}: {train_m.num_samples} samples are fewer than every k in "
                            f"eval.knn_k={self.ctx.recipe.eval.knn_k}; use a larger k-NN train set")
        result = knn_classify(tr_f, tr_l, va_f, va_l, ks=ks, temperature=self.ctx.recipe.eval.knn_temperature,
                              num_classes=max(train_m.num_classes, val_m.num_classes) or None)
        self.knn_history.append(result)
        log.info("teacher k-NN: %s", ", ".join(f"{k}={v:.1f}" for k, v in result.items() if k.endswith("top1")))
        return result

    # ---- checkpoint state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "dino_loss": self.dino_loss.state_dict(),
                "ibot_loss": self.ibot_loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.ibot_loss.load_state_dict(state["ibot_loss"])

    # ---- accounting / export -----------------------------------------------------------------------
    @classmethod
    def train_flops_per_sample(cls, recipe: Recipe, stage: str, num_classes: int | None = None) -> float:
        """Per image: teacher forward on the globals (1×), student forward + backward on globals and
        locals (3×), plus the heads on every CLS token (3× student, 1× teacher) and masked patches."""
        ssl, c = recipe.ssl, recipe.stages[stage].data.multicrop  # type: ignore[index]
        assert ssl is not None and c is not None  # the schema requires multicrop with ssl
        meta = build_model(recipe, stage, device="meta", **DINOV2.model_overrides)
        f_global = forward_flops(meta, c.global_crops_size)
        f_local = forward_flops(meta, c.local_crops_size) if c.local_crops_count else 0
        dim = meta.embed_dim
        head = 2 * (dim * ssl.head_hidden + (ssl.head_layers - 2) * ssl.head_hidden ** 2
                    + ssl.head_hidden * ssl.head_bottleneck + ssl.head_bottleneck * ssl.head_prototypes)
        n_patches = (c.global_crops_size // int(meta.patch_embed.patch_size[0])) ** 2
        masked = ssl.mask_sample_probability * sum(ssl.mask_ratio) / 2 * n_patches if ssl.ibot else 0.0
        backbone = 4 * c.global_crops_count * f_global + 3 * c.local_crops_count * f_local
        heads = head * (4 * c.global_crops_count + 3 * c.local_crops_count + 4 * c.global_crops_count * masked)
        return float(backbone + heads)

    def export(self) -> tuple[nn.Module, ExportMeta]:
        st, recipe = self.ctx.config, self.ctx.recipe
        kwargs = model_kwargs(recipe, self.ctx.stage.name, **DINOV2.model_overrides)
        kwargs.pop("num_classes")
        kwargs.pop("drop_path_rate", None)
        meta = ExportMeta(timm_name=recipe.model.timm_name, kwargs=kwargs, num_classes=0, recipe_id=recipe.id,
                          stage=self.ctx.stage.name, resolution=self.crops.global_crops_size, crop_pct=st.data.crop_pct,
                          mean=tuple(st.data.mean), std=tuple(st.data.std),
                          extra={"ssl": "dinov2-teacher", "data": self.data_url,
                                 "knn": self.knn_history[-1] if self.knn_history else None})
        return self.teacher.backbone, meta


def _layer_id(name: str, depth: int) -> int:
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    if any(k in name for k in _EMBED_NAMES):
        return 0
    return depth + 1


@torch.no_grad()
def collapse_stats(teacher_cls: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Collapse diagnostics of the teacher on this micro-batch (DINO's two collapse modes), on the
    backbone CLS features and on the targets the student is trained towards (after centering or
    Sinkhorn-Knopp):

    - `teacher_spread` = sqrt(1 - ||mean of L2-normalised teacher CLS features||²): the root of the
      total variance of unit vectors; 0 when every image maps to the same feature (collapse), 1 for
      features spread evenly over the sphere;
    - `teacher_entropy` = mean per-crop entropy of the targets / log K: → 1 in the uniform collapse
      (every prototype equally likely for every image);
    - `teacher_marginal_entropy` = entropy of the batch-mean target / log K: → 0 when one prototype
      dominates every image;
    - `teacher_mi` = marginal − per-image entropy (in units of log K): the mutual information between the
      crop and its prototype. It is exactly 0 when the teacher maps every crop to the same distribution,
      whichever of the two collapse modes, and > 0 only if different images get different targets.
    """
    f = torch.nn.functional.normalize(teacher_cls.float(), dim=-1)
    spread = (1 - f.mean(0).pow(2).sum()).clamp(min=0).sqrt()
    p = targets.float()
    log_k = math.log(p.shape[-1])
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / log_k
    mean_p = p.mean(0)
    marginal = -(mean_p * mean_p.clamp_min(1e-12).log()).sum() / log_k
    # device tensors: read back only on logging steps
    return {"teacher_spread": spread, "teacher_entropy": ent, "teacher_marginal_entropy": marginal,
            "teacher_mi": marginal - ent}
