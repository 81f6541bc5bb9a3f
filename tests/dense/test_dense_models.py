"""vfm.dense.models on tiny timm ViTs (pretrained=False, 64 px) and synthetic shapes-on-texture scenes made here:
pyramid shapes, Mask R-CNN train/eval and learning, the linear segmentation protocol, sliding-window inference
and backbone loading with pos-embed resampling."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn
from torchvision.ops import box_iou

from vfm.dense.models import (
    FPNSegHead,
    LinearSegHead,
    SegmentationModel,
    SimpleFeaturePyramid,
    ViTFeatures,
    build_detector,
    load_backbone,
    slide_inference,
)

SIZE = 64
# object colours: class 1 a reddish square, class 2 a bluish disc, on a grey sinusoidal texture with noise
COLOURS = {1: (0.85, 0.25, 0.2), 2: (0.2, 0.35, 0.9)}
ANCHORS = ((8,), (16,), (24,), (32,), (48,))  # ViTDet's 32..512 scaled down for 64 px scenes


def _vit(patch: int = 16, img_size: int = SIZE, num_classes: int = 0, **kwargs) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=patch,
                             depth=2, num_classes=num_classes, **kwargs)


def _scene(g: torch.Generator) -> dict[str, torch.Tensor]:
    """One image (3, 64, 64) in [0, 1] with 1-2 non-overlapping objects: boxes, labels, masks, semantic map."""
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    f, ph = 0.15 + 0.3 * torch.rand(2, generator=g), 2 * math.pi * torch.rand(2, generator=g)
    texture = 0.45 + 0.12 * torch.sin(f[0] * xx + ph[0]) * torch.cos(f[1] * yy + ph[1])
    image = texture.expand(3, SIZE, SIZE) + 0.06 * torch.randn(3, SIZE, SIZE, generator=g)
    semantic = torch.zeros(SIZE, SIZE, dtype=torch.long)
    boxes, labels, masks = [], [], []
    for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
        for _attempt in range(20):
            label = int(torch.randint(1, 3, (1,), generator=g))
            side = int(torch.randint(16, 27, (1,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, SIZE - side + 1, (2,), generator=g))
            if label == 1:
                mask = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
            else:
                r = side / 2
                mask = (xx + 0.5 - x0 - r) ** 2 + (yy + 0.5 - y0 - r) ** 2 <= r * r
            if not (mask & (semantic > 0)).any():
                break
        else:
            continue
        colour = torch.tensor(COLOURS[label]).view(3, 1, 1) + 0.05 * torch.randn(3, 1, 1, generator=g)
        image = torch.where(mask, colour + 0.04 * torch.randn(3, SIZE, SIZE, generator=g), image)
        semantic[mask] = label
        ys, xs = mask.nonzero(as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(label)
        masks.append(mask)
    return dict(image=image.clamp(0, 1), boxes=torch.tensor(boxes, dtype=torch.float32),
                labels=torch.tensor(labels), masks=torch.stack(masks).to(torch.uint8), semantic=semantic)


def _scenes(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [_scene(g) for _ in range(n)]


def _detector(**kwargs) -> nn.Module:
    # small per-image sampling so a CPU step stays fast
    return build_detector(_vit(dynamic_img_size=True), num_classes=3, img_size=SIZE, out_channels=32,
                          anchor_sizes=ANCHORS, box_fc_dim=128, rpn_batch_size_per_image=64,
                          rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300,
                          rpn_post_nms_top_n_test=50, box_batch_size_per_image=64, **kwargs)


def _targets(batch: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: s[k] for k in ("boxes", "labels", "masks")} for s in batch]


def test_vit_features_drop_prefix_tokens_and_refuse_a_wrong_grid():
    vit = _vit(reg_tokens=2)
    out = ViTFeatures(vit, SIZE)(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 192, 4, 4)  # 1 class + 2 register tokens dropped: 16 patch tokens
    with pytest.raises(ValueError, match="img_size=128"):
        ViTFeatures(_vit(), 128)  # fixed 4x4 pos-embed grid, no dynamic_img_size
    with pytest.raises(ValueError, match="multiple of the ViT's patch size"):
        ViTFeatures(_vit(dynamic_img_size=True), 60)


def test_simple_feature_pyramid_strides_and_channels():
    feature = ViTFeatures(_vit(), SIZE)(torch.randn(2, 3, SIZE, SIZE))
    sfp = SimpleFeaturePyramid(192, out_channels=32)
    out = sfp(feature)
    assert sfp.out_channels == 32
    # patch 16 at 64 px: strides 4, 8, 16, 32 and the pool level 64
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0": (2, 32, 16, 16), "1": (2, 32, 8, 8), "2": (2, 32, 4, 4), "3": (2, 32, 2, 2), "pool": (2, 32, 1, 1)}
    assert list(out) == ["0", "1", "2", "3", "pool"]
    with pytest.raises(ValueError, match="scales"):
        SimpleFeaturePyramid(192, scales=(3.0,))


def test_mask_rcnn_trains_end_to_end_and_predicts():
    torch.manual_seed(0)
    model = _detector()
    assert model.backbone.strides == [4.0, 8.0, 16.0, 32.0, 64.0]
    scenes = _scenes(2, seed=1)
    model.train()
    losses = model([s["image"] for s in scenes], _targets(scenes))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    qkv = model.backbone.features.vit.blocks[0].attn.qkv.weight
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([s["image"] for s in scenes])
    assert len(out) == 2
    for det in out:
        n = len(det["boxes"])
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_detector(_vit(dynamic_img_size=True), 3, img_size=SIZE, anchor_sizes=ANCHORS[:4])
    with pytest.raises(ValueError, match="background"):
        build_detector(_vit(dynamic_img_size=True), 1, img_size=SIZE)


def test_faster_rcnn_without_masks():
    model = _detector(mask=False).eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, SIZE, SIZE)])
    assert "masks" not in det and det["boxes"].shape[-1] == 4


def test_mask_rcnn_learns_shapes_on_texture():
    torch.manual_seed(0)
    model = _detector()
    scenes = _scenes(32, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    history = []
    model.train()
    for _ in range(50):
        batch = [scenes[i] for i in torch.randperm(len(scenes), generator=g)[:4].tolist()]
        loss = sum(model([s["image"] for s in batch], _targets(batch)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.6 * first, history
    # boxes: at least half of the training objects are found (IoU > 0.5 with a prediction scoring over
    # torchvision's 0.05, class-agnostic; a 4x4 patch grid localises coarsely, 8-10 of 12 at this seed)
    model.eval()
    with torch.no_grad():
        preds = model([s["image"] for s in scenes[:8]])
    found = sum(int((box_iou(s["boxes"], p["boxes"]).amax(dim=1) > 0.5).sum()) if len(p["boxes"]) else 0
                for s, p in zip(scenes[:8], preds, strict=True))
    total = sum(len(s["boxes"]) for s in scenes[:8])
    assert found >= total / 2, (found, total)


def test_linear_head_on_a_frozen_backbone_learns_and_leaves_it_unchanged():
    torch.manual_seed(0)
    features = ViTFeatures(_vit(patch=8), SIZE, norm=True)
    model = SegmentationModel(features, LinearSegHead(192, 3), freeze_backbone=True)
    before = {k: v.clone() for k, v in features.state_dict().items()}
    train, held_out = _scenes(48, seed=4), _scenes(16, seed=5)
    x, y = torch.stack([s["image"] for s in train]), torch.stack([s["semantic"] for s in train])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(6)
    model.train()
    assert not features.training and all(not p.requires_grad for p in features.parameters())
    for _ in range(60):
        idx = torch.randperm(len(train), generator=g)[:8]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in features.parameters())
    after = features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    xt, yt = torch.stack([s["image"] for s in held_out]), torch.stack([s["semantic"] for s in held_out])
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    majority = (yt == 0).float().mean().item()  # background is the majority class
    # threshold: at least halfway from the majority-class rate to a perfect score
    assert accuracy > majority + 0.5 * (1 - majority), (accuracy, majority)


def test_fpn_seg_head_shape_and_gradient():
    torch.manual_seed(0)
    model = SegmentationModel(ViTFeatures(_vit(), SIZE), FPNSegHead(192, 5, channels=32), freeze_backbone=False)
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, 5, SIZE, SIZE)
    out.sum().backward()
    assert model.features.vit.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("hw", [(64, 64), (70, 45), (20, 30)])
def test_slide_inference_equals_whole_image_for_a_pointwise_model(hw):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=1)
    image = torch.randn(2, 3, *hw)
    out = slide_inference(conv, image, num_classes=4, crop=32, stride=24)
    assert out.shape == (2, 4, *hw)
    with torch.no_grad():
        assert torch.allclose(out, conv(image), atol=1e-5)


def test_slide_inference_runs_a_fixed_resolution_vit_and_checks_arguments():
    torch.manual_seed(0)
    model = SegmentationModel(ViTFeatures(_vit(img_size=32), 32), LinearSegHead(192, 3), freeze_backbone=True)
    model.eval()
    for hw in [(50, 70), (20, 20)]:  # not a multiple of the stride; smaller than the crop (padded)
        out = slide_inference(model, torch.rand(1, 3, *hw), num_classes=3, crop=32, stride=16)
        assert out.shape == (1, 3, *hw) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="stride"):
        slide_inference(model, torch.rand(1, 3, 40, 40), num_classes=3, crop=32, stride=40)
    with pytest.raises(ValueError, match="num_classes"):
        slide_inference(model, torch.rand(1, 3, 40, 40), num_classes=5, crop=32, stride=16)


def test_load_backbone_resamples_pos_embed_and_refuses_unknown_keys():
    torch.manual_seed(0)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10)
    state = small.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 2 * 2, 192)
    dense = _vit()  # 64 px, headless: the exported classifier is dropped
    load_backbone(dense, state)
    assert dense.pos_embed.shape == (1, 1 + 4 * 4, 192)
    assert torch.equal(dense.blocks[1].mlp.fc1.weight, small.blocks[1].mlp.fc1.weight)
    assert not torch.equal(dense.pos_embed[:, 1:5], torch.zeros(1, 4, 192))
    assert torch.equal(dense.cls_token, small.cls_token)
    out = ViTFeatures(dense, SIZE)(torch.randn(1, 3, SIZE, SIZE))
    assert out.shape == (1, 192, 4, 4) and torch.isfinite(out).all()
    # a dense ViT with its own classifier may keep it missing from a headless export
    load_backbone(_vit(num_classes=7), {k: v for k, v in state.items() if not k.startswith("head.")})
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        load_backbone(_vit(), {**state, "extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="missing keys.*blocks.1.norm1.weight"):
        load_backbone(_vit(), {k: v for k, v in state.items() if k != "blocks.1.norm1.weight"})
