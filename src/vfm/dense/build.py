"""A dense model (segmenter or detector on a timm ViT) from a small spec, and its export.

One home for what the trainer's dense task builds and what evaluation rebuilds from an export: a `DenseSpec`
(task, head, classes, resolution, pyramid width, normalisation) is stored in the export's `model.json`
(`ExportMeta.extra["dense"]`) beside the ViT's timm name and kwargs, so `load_dense_export` builds the very same
module and loads its weights strictly.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vfm import storage
from vfm.dense.models import (
    VITDET_ANCHOR_SIZES,
    FPNSegHead,
    LinearSegHead,
    SegmentationModel,
    ViTFeatures,
    build_detector,
)
from vfm.errors import UserError
from vfm.export import META, WEIGHTS, ExportMeta

# ViTDet's anchors suit 1024 px images; a stage at another resolution scales them (the smallest stays >= 4 px)
ANCHOR_REFERENCE_RES = 1024


@dataclass(frozen=True)
class DenseSpec:
    task: str
    """`semantic_segmentation` or `object_detection`."""
    head: str
    """`linear` / `fpn` (segmentation), `mask_rcnn` / `faster_rcnn` (detection)."""
    num_classes: int
    """Segmentation: classes scored (ADE20K: 150); detection: object classes, without the background."""
    resolution: int
    fpn_channels: int = 256
    freeze_backbone: bool = False
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    categories: list[dict] = field(default_factory=list)
    """Detection: the dataset's categories ({"id", "name"}) in label order (label k + 1 = categories[k])."""
    anchor_sizes: tuple[int, ...] | None = None
    """Detection: one anchor size per pyramid level; None scales ViTDet's to `resolution` (`anchor_sizes`)."""
    roi_batch_per_image: int = 512
    slide: tuple[int, int] | None = None
    """Segmentation evaluation: sliding windows (crop, stride) over the image rescaled to a short side of `crop`;
    None squashes the image to `resolution` (the stage's `slide`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        if self.slide is not None:
            object.__setattr__(self, "slide", tuple(self.slide))
        if self.anchor_sizes is not None:
            object.__setattr__(self, "anchor_sizes", tuple(self.anchor_sizes))


def anchor_sizes(resolution: int) -> tuple[tuple[int, ...], ...]:
    """ViTDet's per-level anchor sizes scaled from 1024 px to `resolution`."""
    f = resolution / ANCHOR_REFERENCE_RES
    return tuple(tuple(max(4, round(s * f)) for s in level) for level in VITDET_ANCHOR_SIZES)


def build_dense_model(vit: nn.Module, spec: DenseSpec) -> nn.Module:
    """The segmenter or detector of `spec` on `vit` (a headless timm ViT built at `spec.resolution`). Load the
    backbone's weights before: a decoder that reads the raw last block drops the ViT's final norm (an unused
    parameter under DDP), so the export's norm keys no longer fit afterwards."""
    if not (spec.task == "semantic_segmentation" and spec.head == "linear"):
        vit.norm = nn.Identity()  # ViTDet reads the last block as it is (detectron2 modeling/backbone/vit.py)
    if spec.task == "semantic_segmentation":
        # DINOv2's linear protocol reads the final-normed tokens; a fine-tuned decoder the raw last block (ViTDet)
        features = ViTFeatures(vit, spec.resolution, norm=spec.head == "linear")
        head: nn.Module = (LinearSegHead(features.out_channels, spec.num_classes) if spec.head == "linear" else
                           FPNSegHead(features.out_channels, spec.num_classes, channels=spec.fpn_channels))
        return SegmentationModel(features, head, freeze_backbone=spec.freeze_backbone)
    if spec.task == "object_detection":
        sizes = (tuple((s,) for s in spec.anchor_sizes) if spec.anchor_sizes is not None
                 else anchor_sizes(spec.resolution))
        return build_detector(vit, spec.num_classes + 1, img_size=spec.resolution, mask=spec.head == "mask_rcnn",
                              out_channels=spec.fpn_channels, anchor_sizes=sizes, image_mean=spec.mean,
                              image_std=spec.std, box_batch_size_per_image=spec.roi_batch_per_image)
    raise ValueError(f"unknown dense task {spec.task!r}")


def load_dense_export(src: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ExportMeta, DenseSpec]:
    """The dense model a downstream stage exported (eval mode), its meta and spec."""
    from vfm.models import create_model

    meta_url = storage.join(str(src), META)
    if not storage.exists(meta_url):
        raise UserError(f"{src}: not a vfm export (no {META}); pass the `export/` directory a training run wrote")
    meta = ExportMeta(**json.loads(storage.read_bytes(meta_url)))
    if "dense" not in meta.extra:
        raise UserError(f"{src}: an export of stage {meta.stage!r} without a dense head; the ade20k/coco suites "
                        "evaluate the export of a downstream stage (vfm train RECIPE --stage ade20k|coco)")
    spec = DenseSpec(**meta.extra["dense"])
    model = build_dense_model(create_model(meta.timm_name, num_classes=0, **meta.kwargs), spec)
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(str(src), WEIGHTS))), map_location="cpu",
                       weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{src}: weights do not fit the {spec.task} model ({spec.head} head on {meta.timm_name}): "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), meta, spec


def spec_dict(spec: DenseSpec) -> dict:
    """`spec` as JSON-able data for `ExportMeta.extra["dense"]`."""
    return json.loads(json.dumps(asdict(spec)))
