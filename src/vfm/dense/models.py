"""Dense heads on a plain timm ViT: detection / instance segmentation and semantic segmentation.

The paper fine-tunes a ViT-H/14 pretrained on ImageNet-21K on COCO (detection) and ADE20K (segmentation).
The backbone stays a timm `VisionTransformer`, built for the dense resolution (`img_size`, or
`dynamic_img_size=True`), and its last block's patch tokens are the only feature map. Everything dense comes
from field libraries; vfm adds only the glue that has no library home:

- `ViTFeatures`: timm's `forward_intermediates` → the (B, C, H/p, W/p) patch-token map.
- `load_backbone`: an export's weights into the dense-resolution ViT, pos-embed resampled by timm's
  `checkpoint_filter_fn` (`resample_abs_pos_embed`), the classifier dropped, anything else refused.
- `SimpleFeaturePyramid` + `build_detector`: ViTDet (Li et al. 2022, arXiv:2203.16527) under torchvision's
  `MaskRCNN` / `FasterRCNN`; anchors, RoIAlign, RPN, box and mask heads are torchvision's.
- `LinearSegHead`, `FPNSegHead`, `SegmentationModel`, `slide_inference`: DINOv2's linear segmentation protocol,
  a semantic-FPN head for full fine-tuning, and mmseg's sliding-window inference.

Detection follows torchvision's conventions: `num_classes` counts the background, targets are
`{"boxes", "labels", "masks"}` per image, images are float RGB in [0, 1] (the detector normalises them).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# timm's default (ImageNet) normalisation; vfm exports record theirs in `ExportMeta.mean/std`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# classifier keys of a timm ViT export: not part of a dense backbone, so dropped or tolerated as missing
HEAD_KEYS = ("head.weight", "head.bias")

# ViTDet's anchor sizes, one per pyramid level (stride 4..64) at 1024 px
# (facebookresearch/detectron2 projects/ViTDet/configs/common/coco_loader_lsj.py + configs/common/models/
# mask_rcnn_fpn.py `DefaultAnchorGenerator(sizes=[[32], [64], [128], [256], [512]])`)
VITDET_ANCHOR_SIZES: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class ViTFeatures(nn.Module):
    """The last block's patch tokens of a timm ViT as a (B, C, H/p, W/p) map; prefix tokens (class, registers)
    are dropped.

    `vit` must run at `img_size`: build it with `img_size=<dense resolution>` (then load weights with
    `load_backbone`, which resamples the pos-embed) or with `dynamic_img_size=True` (timm then resamples the
    pos-embed on every forward). `norm=True` applies the ViT's final norm to the tokens, as DINOv2's
    segmentation evaluation does (`get_intermediate_layers(..., norm=True)`); ViTDet uses the raw block output
    (facebookresearch/detectron2 detectron2/modeling/backbone/vit.py `ViT` has no final norm). Build `vit` with
    `num_classes=0`: a classifier would be a parameter without gradient (DDP's unused-parameter error).
    """

    def __init__(self, vit: nn.Module, img_size: int | Sequence[int], *, norm: bool = False):
        super().__init__()
        if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "patch_embed"):
            raise TypeError(f"ViTFeatures wraps a timm VisionTransformer; got {type(vit).__name__}, which has no "
                            f"`forward_intermediates` / `patch_embed`")
        ph, pw = _pair(vit.patch_embed.patch_size)
        h, w = _pair(img_size)
        if h % ph or w % pw:
            raise ValueError(f"img_size {(h, w)} is not a multiple of the ViT's patch size {(ph, pw)}: "
                             f"pick a dense resolution divisible by {ph}")
        grid = _pair(vit.patch_embed.grid_size)
        if not getattr(vit, "dynamic_img_size", False) and grid != (h // ph, w // pw):
            raise ValueError(f"the ViT is built for a {grid} patch grid but img_size {(h, w)} needs "
                             f"{(h // ph, w // pw)}: build it with img_size={h} (and load weights with "
                             f"load_backbone) or with dynamic_img_size=True")
        self.vit = vit
        self.img_size = (h, w)
        self.patch_size = ph
        self.norm = norm
        self.out_channels: int = int(vit.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # huggingface/pytorch-image-models timm/models/vision_transformer.py `forward_intermediates`:
        # indices=1 takes the last block; NCHW output already drops the prefix tokens
        (tokens,) = self.vit.forward_intermediates(x, indices=1, norm=self.norm, stop_early=True,
                                                   output_fmt="NCHW", intermediates_only=True)
        return tokens


def load_backbone(vit: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a ViT export's `state_dict` into `vit` (built for the dense resolution), in place; returns `vit`.

    timm's `checkpoint_filter_fn` (timm/models/vision_transformer.py) resamples `pos_embed` with
    `resample_abs_pos_embed` when the grids differ (and a patch-embed kernel when patch sizes differ). The
    classifier (`head.weight`/`head.bias`) is dropped when `vit` has none and may be missing when it has one;
    any other missing or unexpected key is a ValueError, since it means `vit` was built with other kwargs.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(dict(state_dict), vit)
    own = vit.state_dict()
    # the classifier goes when `vit` has none or one of another size (then it keeps its fresh init)
    state = {k: v for k, v in state.items() if k not in HEAD_KEYS or (k in own and own[k].shape == v.shape)}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in HEAD_KEYS]
    if missing or unexpected:
        raise ValueError(f"backbone weights do not fit the ViT: missing keys {missing}, unexpected keys "
                         f"{unexpected}; build the dense ViT with the export's timm name and kwargs "
                         f"(model.json), changing only img_size / dynamic_img_size / num_classes")
    return vit


def _c2_msra_fill(module: nn.Module) -> None:
    # facebookresearch/fvcore fvcore/nn/weight_init.py `c2_msra_fill`, which detectron2's Conv2d layers use
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from the single patch-stride map (facebookresearch/detectron2
    detectron2/modeling/backbone/vit.py `SimpleFeaturePyramid`, `norm="LN"`).

    Scale 4: two stride-2 ConvTranspose (LayerNorm2d + GELU between), 2: one ConvTranspose, 1: identity,
    0.5: MaxPool; each then 1x1 + 3x3 conv (no bias) with LayerNorm2d. With patch size p the maps have strides
    p/4, p/2, p, 2p. Returns an OrderedDict keyed "0".."n-1", plus "pool" (stride 4p; torchvision
    torchvision/ops/feature_pyramid_network.py `LastLevelMaxPool`, a kernel-1 stride-2 max-pool of the last
    map) when `top_block` — the backbone output torchvision's `MaskRCNN` expects, with `out_channels`.
    """

    def __init__(self, in_channels: int, out_channels: int = 256,
                 scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5), *, top_block: bool = True):
        super().__init__()
        # timm's channels-first LayerNorm2d is detectron2's `LayerNorm` (detectron2/layers/batch_norm.py)
        from timm.layers import LayerNorm2d

        self.scales = tuple(float(s) for s in scales)
        self.out_channels = out_channels
        self.top_block = top_block
        self.stages = nn.ModuleList()
        for scale in self.scales:
            dim = in_channels
            if scale == 4.0:
                layers: list[nn.Module] = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                                           LayerNorm2d(dim // 2), nn.GELU(),
                                           nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2)]
                dim //= 4
            elif scale == 2.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)]
                dim //= 2
            elif scale == 1.0:
                layers = []
            elif scale == 0.5:
                layers = [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                raise ValueError(f"scales: {scale} is not one of ViTDet's 4.0, 2.0, 1.0, 0.5")
            lateral = nn.Conv2d(dim, out_channels, kernel_size=1, bias=False)
            output = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
            _c2_msra_fill(lateral)
            _c2_msra_fill(output)
            layers += [lateral, LayerNorm2d(out_channels), output, LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))
        if self.top_block:
            out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2, padding=0)
        return out


class ViTDetBackbone(nn.Module):
    """`ViTFeatures` → `SimpleFeaturePyramid` as one module: images → OrderedDict of maps, `out_channels`."""

    def __init__(self, features: ViTFeatures, pyramid: SimpleFeaturePyramid):
        super().__init__()
        self.features = features
        self.pyramid = pyramid
        self.out_channels = pyramid.out_channels
        p = features.patch_size
        self.strides = [p / s for s in pyramid.scales] + ([2 * p / pyramid.scales[-1]] if pyramid.top_block else [])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.features(x))


def build_detector(vit: nn.Module, num_classes: int, *, img_size: int, mask: bool = True, out_channels: int = 256,
                   scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                   anchor_sizes: Sequence[Sequence[int]] = VITDET_ANCHOR_SIZES,
                   aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), box_fc_dim: int = 1024,
                   image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                   **rcnn_kwargs) -> nn.Module:
    """ViTDet's Mask R-CNN (`mask=True`) or Faster R-CNN on `vit`, from torchvision's detection models.

    `num_classes` counts the background (torchvision's convention). Heads as ViTDet's
    (facebookresearch/detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py): a two-conv RPN head,
    a 4-conv + 1-fc box head and a 4-conv mask head, convs with LayerNorm. The transform keeps images at the
    ViT's resolution: the longer side is resized to `img_size` (`min_size=max_size=img_size`) and the batch is
    padded to `img_size` squares (`size_divisible=img_size`, ViTDet's square padding), normalised with
    `image_mean`/`image_std` (the backbone's). `anchor_sizes` has one entry per pyramid level, "pool" included
    (ViTDet's 32..512 suit 1024 px; scale them with `img_size`). Other torchvision `MaskRCNN` / `FasterRCNN`
    keywords (batch sizes per image, NMS, score thresholds, ...) pass through `rcnn_kwargs`.
    """
    from timm.layers import LayerNorm2d
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: torchvision counts the background, so pass the number of "
                         f"object classes + 1 (COCO: 91 with torchvision's ids, 81 contiguous)")
    for name in ("min_size", "max_size", "size_divisible", "image_mean", "image_std", "num_classes"):
        if name in rcnn_kwargs:
            raise ValueError(f"rcnn_kwargs: {name} is set by build_detector (img_size / image_mean / image_std / "
                             f"num_classes); remove it")
    features = ViTFeatures(vit, img_size)
    pyramid = SimpleFeaturePyramid(features.out_channels, out_channels, scales)
    backbone = ViTDetBackbone(features, pyramid)
    levels = [str(i) for i in range(len(pyramid.scales))]
    if len(anchor_sizes) != len(levels) + 1:
        raise ValueError(f"anchor_sizes has {len(anchor_sizes)} entries but the pyramid has {len(levels) + 1} "
                         f"levels ({', '.join(levels)}, pool): give one tuple of sizes per level")
    anchors = AnchorGenerator(tuple(tuple(s) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    norm = partial(LayerNorm2d, eps=1e-6)
    common = dict(
        min_size=img_size, max_size=img_size, size_divisible=img_size,
        image_mean=list(image_mean), image_std=list(image_std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=0),
        box_head=FastRCNNConvFCHead((out_channels, 7, 7), [out_channels] * 4, [box_fc_dim], norm_layer=norm),
        box_predictor=FastRCNNPredictor(box_fc_dim, num_classes),
    )
    if not mask:
        return FasterRCNN(backbone, None, **common, **rcnn_kwargs)
    return MaskRCNN(backbone, None, **common,
                    mask_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=14, sampling_ratio=0),
                    mask_head=MaskRCNNHeads(out_channels, [out_channels] * 4, 1, norm_layer=norm),
                    mask_predictor=MaskRCNNPredictor(out_channels, out_channels, num_classes), **rcnn_kwargs)


class LinearSegHead(nn.Module):
    """DINOv2's linear segmentation protocol: BatchNorm2d + 1x1 conv on the (frozen) patch-token map, logits
    upsampled bilinearly to the input size (facebookresearch/dinov2
    dinov2/eval/segmentation/models/decode_heads/linear_head.py `BNHead`, `dropout_ratio=0` in its configs)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv_seg = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        # open-mmlab/mmsegmentation mmseg/models/decode_heads/decode_head.py `init_weights`: normal(0, 0.01)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        logits = self.conv_seg(self.bn(feature))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class FPNSegHead(nn.Module):
    """A semantic-FPN head on ViTDet's pyramid, for full fine-tuning: `SimpleFeaturePyramid`, then each level
    3x3 conv-BN-ReLU + 2x bilinear upsampling until stride p/4, summed, 1x1 classifier, upsampled to the input
    (open-mmlab/mmsegmentation mmseg/models/decode_heads/fpn_head.py `FPNHead`).

    No top-down `torchvision.ops.FeaturePyramidNetwork` in between: ViTDet shows the simple pyramid alone
    matches a top-down FPN on a plain ViT (arXiv:2203.16527 Table 1).
    """

    def __init__(self, in_channels: int, num_classes: int, *, channels: int = 256,
                 scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5), dropout: float = 0.1):
        super().__init__()
        from torchvision.ops import Conv2dNormActivation

        self.pyramid = SimpleFeaturePyramid(in_channels, channels, scales, top_block=False)
        top = max(self.pyramid.scales)
        self.scale_heads = nn.ModuleList()
        for scale in self.pyramid.scales:
            steps = int(round(math.log2(top / scale)))  # upsamplings to the finest level
            layers: list[nn.Module] = []
            for _ in range(max(1, steps)):
                layers.append(Conv2dNormActivation(channels, channels, kernel_size=3))
                if steps:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        maps = list(self.pyramid(feature).values())
        order = sorted(range(len(maps)), key=lambda i: -self.pyramid.scales[i])  # finest first
        out = self.scale_heads[order[0]](maps[order[0]])
        for i in order[1:]:
            out = out + F.interpolate(self.scale_heads[i](maps[i]), size=out.shape[-2:], mode="bilinear",
                                      align_corners=False)
        logits = self.conv_seg(self.dropout(out))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """`features` (e.g. `ViTFeatures`) → `head(feature_map, image_size)` → (B, num_classes, H, W) logits.

    `freeze_backbone=True` is the linear protocol: the backbone's parameters get `requires_grad=False`, it runs
    without autograd and stays in eval mode (no dropout / drop-path) even when the model is put in train mode.
    """

    def __init__(self, features: nn.Module, head: nn.Module, freeze_backbone: bool):
        super().__init__()
        self.features = features
        self.head = head
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.features.requires_grad_(False)
            self.features.eval()

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.freeze_backbone:
            self.features.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            feature = self.features(x)
        return self.head(feature, x.shape[-2:])


@torch.no_grad()
def slide_inference(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """Sliding-window logits (B, num_classes, H, W) of `model` (images → same-size logits) over `image`.

    open-mmlab/mmsegmentation mmseg/models/segmentors/encoder_decoder.py `slide_inference`: `crop`-sized windows
    every `stride` pixels, the last one aligned to the border, logits summed and divided by the count of
    windows covering each pixel. An image smaller than `crop` is zero-padded (bottom/right) to `crop`, so a
    fixed-resolution ViT sees its resolution, and the logits are cropped back.
    """
    if crop <= 0 or not 0 < stride <= crop:
        raise ValueError(f"slide_inference: need crop > 0 and 0 < stride <= crop (windows must cover the image); "
                         f"got crop={crop}, stride={stride}")
    b, _, h0, w0 = image.shape
    image = F.pad(image, (0, max(crop - w0, 0), 0, max(crop - h0, 0)))
    h, w = image.shape[-2:]
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    preds = image.new_zeros((b, num_classes, h, w))
    count = image.new_zeros((b, 1, h, w))
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2, x2 = min(hi * stride + crop, h), min(wi * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits = model(image[:, :, y1:y2, x1:x2])
            if logits.shape != (b, num_classes, y2 - y1, x2 - x1):
                raise ValueError(f"slide_inference: the model returned {tuple(logits.shape)} for a "
                                 f"{(b, image.shape[1], y2 - y1, x2 - x1)} crop; it must return (B, num_classes, "
                                 f"crop, crop) logits (num_classes={num_classes})")
            preds[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return (preds / count)[:, :, :h0, :w0]
