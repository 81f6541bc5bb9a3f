"""Dense transfer as a `Task`: a downstream stage (paper 001's ADE20K segmentation and COCO detection) trains a
segmentation head or a Mask R-CNN on the pretrained ViT, started from the pretraining export.

The model is the recipe's ViT built headless at the stage's resolution, its weights loaded from `--init` with the
position embeddings resampled to the dense grid (vfm.dense.models.load_backbone), under the stage's head
(vfm.dense.build.build_dense_model). The loop is the same as every stage's: DDP, accumulation, clipping, AdamW with
timm's layer decay over the ViT's blocks (the head and pyramid at the full lr), checkpoints, exact resume, MLflow.
The export is the whole dense model with its `DenseSpec`, which `vfm evaluate --suite ade20k|coco` rebuilds.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from vfm.data.transforms import device_normalize
from vfm.dense.build import DenseSpec, build_dense_model, spec_dict
from vfm.dense.models import load_backbone
from vfm.errors import UserError
from vfm.export import ExportMeta, load_export
from vfm.models import build_model, forward_flops, model_kwargs
from vfm.recipes.schema import DownstreamStage, Recipe
from vfm.tasks.common import ManifestData
from vfm.train.parallel import unwrap
from vfm.train.task import StatefulLoader, TaskContext

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


class DenseTask(ManifestData):
    """Semantic segmentation or detection on a dense `vfm shard` manifest (ade20k, coco2017)."""

    def __init__(self, data: str, *, num_workers: int = 0):
        self.data_url, self.num_workers = data, num_workers

    # ---- modules -------------------------------------------------------------------------------
    def build(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        st = ctx.config
        if not isinstance(st, DownstreamStage):
            raise UserError(f"stage {ctx.stage.name} is not a downstream stage; dense training takes one of "
                            f"{', '.join(ctx.recipe.downstream)}")
        m = self.manifest
        if m.task != st.task:
            raise UserError(f"{self.data_url} holds {m.task} samples but stage {ctx.stage.name} trains "
                            f"{st.task}; shard {st.data.dataset} with `vfm shard {st.data.dataset}`")
        if ctx.recipe.model.family != "vit":
            raise UserError(f"downstream stages put dense heads on a ViT; {ctx.recipe.model.timm_name} is a "
                            f"{ctx.recipe.model.family}")
        if st.task == "semantic_segmentation":
            num_classes = len(m.categories) or len(m.classes)
            categories: list[dict] = []
        else:
            categories = sorted(m.categories, key=lambda c: c["id"])
            num_classes = len(categories)
        if not num_classes:
            raise UserError(f"{self.data_url}: the manifest lists no classes; shard it again with vfm shard")
        self.label_of = {int(c["id"]): k + 1 for k, c in enumerate(categories)}  # detection: 0 is the background
        self.spec = DenseSpec(task=st.task, head=st.head, num_classes=num_classes, resolution=st.data.resolution,
                              fpn_channels=st.fpn_channels, freeze_backbone=st.freeze_backbone,
                              mean=tuple(st.data.mean), std=tuple(st.data.std), categories=categories,
                              slide=(st.slide.crop, st.slide.stride) if st.slide is not None else None,
                              anchor_sizes=tuple(st.anchor_sizes) if st.anchor_sizes is not None else None,
                              roi_batch_per_image=st.roi_batch_per_image)
        vit = build_model(ctx.recipe, ctx.stage.name, num_classes=0, device=ctx.init_device)
        if not ctx.init:
            raise UserError(f"stage {ctx.stage.name} transfers the pretrained backbone: pass --init with the "
                            "pretraining export")
        source, meta = load_export(ctx.init)
        try:
            load_backbone(vit, source.state_dict())
        except ValueError as exc:
            raise UserError(f"{ctx.init}: {exc}") from None
        log.info("%s: %s head on %s from %s (step %s), %d classes at %d px", ctx.stage.name, st.head,
                 meta.timm_name, ctx.init, meta.step, num_classes, st.data.resolution)
        with torch.device(ctx.init_device):
            self.model = build_dense_model(vit, self.spec)
        self.vit = vit
        self.normalize = device_normalize(st.data, ctx.device, is_training=False)

    def trainable(self) -> nn.Module:
        return self.model

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The ViT's parameters in timm's layer-decay groups (or weight-decay groups), everything else (pyramid,
        heads) at the full lr, no decay on norms and biases (as timm's groups)."""
        o = self.ctx.config.optim
        vit = self.vit
        no_decay = set(vit.no_weight_decay()) if hasattr(vit, "no_weight_decay") else set()
        groups: list[dict[str, Any]] = []
        if any(p.requires_grad for p in vit.parameters()):
            if o.layer_decay is not None:
                groups = param_groups_layer_decay(vit, weight_decay=o.weight_decay, no_weight_decay_list=no_decay,
                                                  layer_decay=o.layer_decay)
            else:
                from timm.optim import param_groups_weight_decay

                groups = param_groups_weight_decay(vit, weight_decay=o.weight_decay, no_weight_decay_list=no_decay)
        in_vit = {id(p) for p in vit.parameters()}
        rest = [p for p in unwrap(model).parameters() if p.requires_grad and id(p) not in in_vit]
        groups.append({"params": [p for p in rest if p.ndim > 1], "weight_decay": o.weight_decay})
        groups.append({"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    # ---- data ----------------------------------------------------------------------------------
    def make_loader(self, rank: int, world_size: int, seed: int) -> StatefulLoader:
        from vfm.data import dense_transforms as dt
        from vfm.data.loader import build_loader

        st = self.ctx.config
        aug = st.data.augment
        if st.task == "semantic_segmentation":
            sample_fn = functools.partial(dt.seg_train_sample, size=st.data.resolution, scale=tuple(aug.scale),
                                          hflip=aug.hflip)
            collate = dt.collate_seg
        else:
            sample_fn = functools.partial(dt.det_train_sample, size=st.data.resolution, scale=tuple(aug.scale),
                                          hflip=aug.hflip, label_of=self.label_of, masks=st.head == "mask_rcnn")
            collate = dt.collate_det
        return build_loader(self.manifest, transform=None, batch_size=st.batch.micro_batch, rank=rank,
                            world_size=world_size, seed=seed, shuffle=True, epoch_length=self.ctx.stage.num_samples,
                            num_workers=self.num_workers, drop_last=True, collate_fn=collate, sample_fn=sample_fn)

    # ---- step ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor | float]]:
        images, targets = batch
        if self.spec.task == "semantic_segmentation":
            logits = model(self.normalize(images))
            loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
            labelled = targets != IGNORE_INDEX
            hit = (logits.argmax(1) == targets) & labelled
            return loss, {"pixel_acc": hit.sum() / labelled.sum().clamp(min=1)}
        # torchvision's detector normalises itself (image_mean/std of the spec): float images in [0, 1]
        losses = model(list(images.float().div_(255)), targets)
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}

    def clip_groups(self, model: nn.Module) -> None:
        return None

    def after_update(self, model: nn.Module, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    @classmethod
    def train_flops_per_sample(cls, recipe: Recipe, stage: str, num_classes: int | None) -> float:
        """3 x the ViT's forward at the stage's resolution; the pyramid and heads are left out (on ViT-H at 1024 px
        the backbone is the bulk of a Mask R-CNN's FLOPs, and torchvision's RoI ops do not count on meta)."""
        vit = build_model(recipe, stage, num_classes=0, device="meta")
        return 3.0 * forward_flops(vit, recipe.stage(stage).data.resolution)

    def export(self) -> tuple[nn.Module, ExportMeta]:
        st, recipe = self.ctx.config, self.ctx.recipe
        kwargs = model_kwargs(recipe, self.ctx.stage.name, num_classes=0)
        kwargs.pop("num_classes")
        kwargs.pop("drop_path_rate", None)
        meta = ExportMeta(timm_name=recipe.model.timm_name, kwargs=kwargs, num_classes=self.spec.num_classes,
                          recipe_id=recipe.id, stage=self.ctx.stage.name, resolution=st.data.resolution,
                          mean=tuple(st.data.mean), std=tuple(st.data.std),
                          extra={"dense": spec_dict(self.spec), "data": self.data_url, "init": self.ctx.init})
        return self.model, meta
