"""Supervised classification as a `Task`: ViT-H / ConvNeXt-XL pretraining on IN-22K / IN-21K and
fine-tuning on IN-1K, with timm's transforms, Mixup/CutMix + label smoothing and soft-target loss.

Fine-tuning from an export (`init`): the backbone is copied, position embeddings / patch embedding are
resampled when the resolution or patch size changed (timm's ViT `checkpoint_filter_fn`), and the head is
new for the new classes — fresh (× `head_init_scale` where the recipe sets it) by default, or with the
rows of classes the pretraining head also had copied by wnid (`head_from_wnids`; classes missing there,
e.g. teddy bear n04399382, absent from fall11's timm/data/_info/imagenet22k_synsets.txt, keep their
fresh rows).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from vfm.data.transforms import device_normalize
from vfm.errors import UserError
from vfm.export import ExportMeta, load_export
from vfm.models import build_model, forward_flops, model_kwargs
from vfm.recipes.schema import Recipe
from vfm.tasks.common import ManifestData
from vfm.train.optim import param_groups
from vfm.train.parallel import unwrap, uses_channels_last
from vfm.train.task import StatefulLoader, TaskContext

log = logging.getLogger(__name__)


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier (timm's `pretrained_cfg['classifier']`: `head` / `head.fc`)."""
    prefix = model.pretrained_cfg.get("classifier", "head")
    return [k for k in model.state_dict() if k.startswith(prefix + ".")]


def map_head_rows(src_w: Tensor, src_b: Tensor, src_wnids: list[str], dst_w: Tensor, dst_b: Tensor,
                  dst_wnids: list[str]) -> int:
    """Copy classifier rows of classes present in both heads (by wnid) into dst in place; returns the count."""
    index = {w: i for i, w in enumerate(src_wnids)}
    mapped = 0
    for j, wnid in enumerate(dst_wnids):
        i = index.get(wnid)
        if i is not None:
            dst_w[j] = src_w[i]
            dst_b[j] = src_b[i]
            mapped += 1
    return mapped


class SupervisedTask(ManifestData):
    """Image classification on a sharded dataset (`vfm.data` manifest)."""

    def __init__(self, data: str, *, num_workers: int = 0, head_from_wnids: bool = False):
        self.data_url, self.num_workers, self.head_from_wnids = data, num_workers, head_from_wnids
        self.ema: nn.Module | None = None

    # ---- modules -------------------------------------------------------------------------------
    def build(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        st = ctx.config
        self.wnids = list(self.manifest.classes)
        if not self.wnids:
            raise UserError(f"{self.data_url}: the manifest has no class map; supervised training needs labels")
        self.model = build_model(ctx.recipe, ctx.stage.name, num_classes=len(self.wnids), device=ctx.init_device)
        if ctx.init:
            self._init_from(ctx.init)
        elif st.head_init_scale is not None and ctx.recipe.model.family != "convnext":
            self._scale_head(st.head_init_scale)  # timm ConvNeXt takes head_init_scale as a model kwarg
        aug = st.data.augment
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=aug.label_smoothing,
                               num_classes=len(self.wnids))
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=aug.label_smoothing)
        if st.ema is not None:
            # sharded like the trained model, so the EMA update is shard-by-shard local work
            self.ema = ctx.shard(copy.deepcopy(self.model).requires_grad_(False))
        self.channels_last = uses_channels_last(ctx.config.channels_last, ctx.recipe.model.family, ctx.device)
        self.normalize = device_normalize(st.data, ctx.device, is_training=True)

    def _scale_head(self, scale: float) -> None:
        with torch.no_grad():
            state = self.model.state_dict()
            for k in head_keys(self.model):
                state[k].mul_(scale)

    def _init_from(self, src: str) -> None:
        """Backbone from an export, new head for this stage's classes (see module docstring)."""
        source, meta = load_export(src)
        state = source.state_dict()
        if self.ctx.recipe.model.family == "vit":
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, self.model)  # resamples pos_embed / patch_embed to this model
        src_head = {k: state.pop(k) for k in head_keys(source) if k in state}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        head = set(head_keys(self.model))
        if set(missing) - head or unexpected:
            raise UserError(f"{src}: export ({meta.timm_name} {meta.kwargs}) does not fit this stage's model "
                            f"({self.ctx.recipe.model.timm_name}): missing {sorted(set(missing) - head)[:5]}, "
                            f"unexpected {unexpected[:5]}")
        st = self.ctx.config
        if st.head_init_scale is not None and self.ctx.recipe.model.family != "convnext":
            self._scale_head(st.head_init_scale)
        if self.head_from_wnids:
            if not meta.wnids or len(src_head) != 2:
                raise UserError(f"{src}: --head-from-wnids needs an export with a classifier and its wnids")
            sd = self.model.state_dict()
            w_key, b_key = sorted(head, key=lambda k: not k.endswith("weight"))
            sw, sb = sorted(src_head.items(), key=lambda kv: not kv[0].endswith("weight"))
            with torch.no_grad():
                mapped = map_head_rows(sw[1], sb[1], meta.wnids, sd[w_key], sd[b_key], self.wnids)
            log.info("head: %d of %d classes copied by wnid from %s; %d fresh", mapped, len(self.wnids), src,
                     len(self.wnids) - mapped)
        log.info("initialised %s from %s (step %s); new head for %d classes", self.ctx.recipe.model.timm_name,
                 src, meta.step, len(self.wnids))

    def trainable(self) -> nn.Module:
        return self.model

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, **({"ema": self.ema} if self.ema is not None else {})}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return param_groups(model, self.ctx.config.optim)

    # ---- data ----------------------------------------------------------------------------------
    def make_loader(self, rank: int, world_size: int, seed: int) -> StatefulLoader:
        from vfm.data.loader import build_loader
        from vfm.data.transforms import build_transform

        st = self.ctx.config
        return build_loader(self.manifest, transform=build_transform(st.data, is_training=True),
                            batch_size=st.batch.micro_batch, rank=rank, world_size=world_size, seed=seed,
                            shuffle=True, epoch_length=st.num_samples, num_workers=self.num_workers,
                            drop_last=True)

    # ---- step ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor | float]]:
        images, labels = batch
        images = self.normalize(images)  # uint8 from the loader; normalised and random-erased here
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        metrics: dict[str, Tensor | float] = {}
        if self.mixup is not None:
            images, target = self.mixup(images, labels)  # soft targets, label smoothing included
        else:
            target = labels
        logits = model(images)
        loss = self.criterion(logits.float(), target)
        if self.mixup is None:
            metrics["top1"] = (logits.argmax(-1) == labels).float().mean()  # read on logging steps only
        return loss, metrics

    def clip_groups(self, model: nn.Module) -> None:
        return None  # one global norm, as timm's train.py clips

    def after_update(self, model: nn.Module, step: int) -> None:
        if self.ema is None:
            return
        decay = self.ctx.config.ema
        with torch.no_grad():
            ema = [_local(t) for t in self.ema.state_dict().values()]
            live = [_local(t) for t in unwrap(model).state_dict().values()]
            floats = [(e, p) for e, p in zip(ema, live, strict=True) if e.is_floating_point()]
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    @classmethod
    def train_flops_per_sample(cls, recipe: Recipe, stage: str, num_classes: int | None) -> float:
        """3 × forward (backward ≈ 2 × forward) of the classifier at the stage's resolution."""
        meta = build_model(recipe, stage, num_classes=num_classes, device="meta")
        return 3.0 * forward_flops(meta, recipe.stages[stage].data.resolution)  # type: ignore[index]

    def export(self) -> tuple[nn.Module, ExportMeta]:
        st, recipe = self.ctx.config, self.ctx.recipe
        kwargs = model_kwargs(recipe, self.ctx.stage.name, num_classes=len(self.wnids))
        kwargs.pop("num_classes")
        kwargs.pop("drop_path_rate", None)
        meta = ExportMeta(timm_name=recipe.model.timm_name, kwargs=kwargs, num_classes=len(self.wnids),
                          recipe_id=recipe.id, stage=self.ctx.stage.name, resolution=st.data.resolution,
                          crop_pct=st.data.crop_pct, mean=tuple(st.data.mean), std=tuple(st.data.std),
                          wnids=self.wnids, extra={"ema": self.ema is not None, "data": self.data_url})
        return (self.ema if self.ema is not None else self.model), meta


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
