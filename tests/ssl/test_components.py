"""Known-answer tests of the DINOv2 pieces: head, losses, Sinkhorn-Knopp, masking, multi-crop, schedules."""

from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from vfm.recipes import load_recipe
from vfm.ssl import schedules
from vfm.ssl.heads import DINOHead
from vfm.ssl.losses import DINOLoss, IBOTPatchLoss, koleo_loss, sinkhorn_knopp
from vfm.ssl.masking import BlockMasker, batch_masks
from vfm.ssl.multicrop import MultiCropTransform, make_collate


def test_dino_head_shapes_and_cosine_logits():
    torch.manual_seed(0)
    head = DINOHead(96, 256, hidden_dim=64, bottleneck_dim=32, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(96, 64), (64, 64), (64, 32)]
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.requires_grad and torch.all(gain == 1)  # trainable from 1, as upstream's weight_g
    out = head(torch.randn(5, 96) * 10)
    assert out.shape == (5, 256)
    # unit bottleneck · unit prototype = cosine: bounded by 1 whatever the input scale
    assert out.abs().max() <= 1 + 1e-5
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(256), atol=1e-5)


def test_sinkhorn_knopp_equipartition():
    torch.manual_seed(0)
    b, k = 64, 16
    logits = F.normalize(torch.randn(b, k), dim=1)
    q = sinkhorn_knopp(logits, 0.05, n_iterations=3)
    # every sample's target is a distribution, exactly (the last normalisation is over samples)
    assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)
    assert (q >= 0).all()
    # prototypes approach equal mass B/K; with many iterations, to numerical precision
    q_long = sinkhorn_knopp(logits, 0.05, n_iterations=200)
    assert torch.allclose(q_long.sum(0), torch.full((k,), b / k), rtol=1e-3)
    spread3 = (q.sum(0) - b / k).abs().max()
    softmax_spread = (F.softmax(logits / 0.05, dim=1).sum(0) - b / k).abs().max()
    assert spread3 < softmax_spread  # 3 iterations already move toward equipartition


def _dino_loss_upstream(student_g, student_l, teacher_probs, n_g, temp=0.1):
    """dinov2 ssl_meta_arch with 2 global crops, written as upstream does it (swap + loss_scales=2)."""
    t_chunks = teacher_probs.chunk(n_g)
    swapped = torch.cat((t_chunks[1], t_chunks[0]))
    n_l = student_l.shape[0] // t_chunks[0].shape[0]
    terms = n_l * n_g + (n_g - 1) * n_g

    def ce(students, teachers):
        total = 0
        for s in students:
            lsm = F.log_softmax(s / temp, dim=-1)
            for t in teachers:
                total -= (t * lsm).sum(-1).mean()
        return total

    local = ce(student_l.chunk(n_l), t_chunks) / terms
    glob = ce([student_g], [swapped]) * 2 / terms
    return local + glob


def test_dino_loss_matches_upstream_two_globals():
    torch.manual_seed(0)
    b, k = 6, 32
    sg, sl = torch.randn(2 * b, k), torch.randn(8 * b, k)
    t = F.softmax(torch.randn(2 * b, k) / 0.04, dim=-1)
    ours = DINOLoss(k)(sg, sl, t, n_global=2)
    assert torch.allclose(ours, _dino_loss_upstream(sg, sl, t, 2), rtol=1e-5)


def test_dino_loss_many_globals_counts_every_cross_view_pair():
    torch.manual_seed(1)
    b, k, g, nl = 3, 8, 4, 2
    sg, sl, t = torch.randn(g * b, k), torch.randn(nl * b, k), F.softmax(torch.randn(g * b, k), -1)
    lsg = F.log_softmax(sg / 0.1, -1).chunk(g)
    lsl = F.log_softmax(sl / 0.1, -1).chunk(nl)
    tc = t.chunk(g)
    brute = [-(tc[j] * lsg[i]).sum(-1).mean() for i in range(g) for j in range(g) if i != j]
    brute += [-(tc[j] * lsl[i]).sum(-1).mean() for i in range(nl) for j in range(g)]
    assert torch.allclose(DINOLoss(k)(sg, sl, t, n_global=g), torch.stack(brute).mean(), rtol=1e-5)


def test_centering_teacher_targets_and_center_update():
    loss = DINOLoss(4, centering="centering", center_momentum=0.9)
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    t = loss.teacher_targets(logits, 0.5)
    assert torch.allclose(t, F.softmax(logits / 0.5, -1))  # centre starts at 0
    assert torch.allclose(loss.centre.center, 0.1 * logits.mean(0, keepdim=True))


def test_ibot_loss_matches_upstream_weighting():
    torch.manual_seed(0)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3] = True
    masks[2, 4:9] = True
    m, k = int(masks.sum()), 16
    s, t = torch.randn(m, k), F.softmax(torch.randn(m, k), -1)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    # image 0: 3 patches, image 2: 5 patches; per-image means, averaged over all 4 images
    expected = (ce[:3].mean() + ce[3:].mean()) / 4
    assert torch.allclose(IBOTPatchLoss(k)(s, t, masks), expected, rtol=1e-5)


def test_koleo_against_brute_force():
    torch.manual_seed(0)
    x = torch.randn(20, 8)
    xn = F.normalize(x, dim=1)
    d = torch.cdist(xn, xn) + torch.diag(torch.full((20,), float("inf")))
    expected = -torch.log(d.min(dim=1).values + 1e-8).mean()
    assert torch.allclose(koleo_loss(x), expected, atol=1e-5)
    # collapsed features give a much larger loss than spread ones
    collapsed = torch.ones(20, 8) + 1e-4 * torch.randn(20, 8)
    assert koleo_loss(collapsed) > koleo_loss(x) + 5


def test_block_mask_counts_and_ratio_bounds():
    rng = random.Random(0)
    masker = BlockMasker((16, 16))  # 224 px / patch 14
    for target in (0, 10, 50, 128):
        m = masker(target, rng)
        assert m.shape == (16, 16) and int(m.sum()) <= target
        if target:
            assert int(m.sum()) >= min(target, 4) // 2  # at least one block lands on a 16×16 grid
    n_images, n = 40, 256
    masks = batch_masks(n_images, masker, (0.1, 0.5), 0.5, random.Random(1))
    counts = masks.sum(1)
    assert masks.shape == (n_images, n)
    assert int((counts > 0).sum()) == 20  # mask_sample_probability × images
    masked = counts[counts > 0].float() / n
    assert masked.max() <= 0.5 and masked.min() >= 0.05
    # linspace bins spread the ratios over the range
    assert masked.min() < 0.2 and masked.max() > 0.4


@pytest.mark.parametrize(("recipe_id", "profile", "n_global", "n_local", "g_px", "l_px", "patch"), [
    ("meta-dinov2-giant", "paper", 10, 2, 224, 98, 14),
    ("dinov2-giant", "paper", 2, 8, 224, 98, 14),
    ("meta-dinov2-giant", "smoke", 10, 2, 32, 16, 8),
])
def test_multicrop_shapes_and_counts_match_recipe(recipe_id, profile, n_global, n_local, g_px, l_px, patch):
    recipe = load_recipe(recipe_id, profile=profile)
    data = recipe.stages["pretrain"].data
    assert recipe.model.kwargs.get("patch_size", 14) == patch
    transform = MultiCropTransform(data.multicrop)
    collate = make_collate(recipe.ssl, data.multicrop, patch)
    torch.manual_seed(0)
    img = Image.new("RGB", (96, 80), (120, 30, 200))
    batch = collate([(transform(img), 3), (transform(img), 5)])
    assert batch["global"].shape == (n_global * 2, 3, g_px, g_px)
    assert batch["global"].dtype == batch["local"].dtype == torch.uint8  # normalised on the device (DinoTask.loss)
    assert batch["local"].shape == (n_local * 2, 3, l_px, l_px)
    assert batch["masks"].shape == (n_global * 2, (g_px // patch) ** 2)
    assert batch["labels"].tolist() == [3, 5]
    assert int((batch["masks"].sum(1) > 0).sum()) == int(n_global * 2 * recipe.ssl.mask_sample_probability)


def test_schedules_follow_recipe():
    ssl3 = load_recipe("meta-dinov2-giant").ssl
    ssl4 = load_recipe("dinov2-giant").ssl
    total = 1000
    # seed 003: linear 0.996 → 1.0
    assert schedules.teacher_momentum(ssl3, 0, total) == pytest.approx(0.996)
    assert schedules.teacher_momentum(ssl3, 499, total) == pytest.approx(0.996 + 0.004 * 499 / 999)
    assert schedules.teacher_momentum(ssl3, total - 1, total) == pytest.approx(1.0)
    # seed 004 / upstream: cosine 0.994 → 1.0
    assert schedules.teacher_momentum(ssl4, 0, total) == pytest.approx(0.994)
    assert schedules.teacher_momentum(ssl4, 500, total) == pytest.approx(0.997)
    assert schedules.teacher_momentum(ssl4, total, total) == 1.0
    # teacher temperature: linear 0.04 → 0.07 over 30 epochs of 1250 iterations, then constant
    total = 500 * 1250
    warm = 30 * 1250
    assert schedules.teacher_temperature(ssl4, 0, total, 1250) == pytest.approx(0.04)
    assert schedules.teacher_temperature(ssl4, warm // 2, total, 1250) == pytest.approx(0.055, abs=1e-5)
    assert schedules.teacher_temperature(ssl4, warm - 1, total, 1250) == pytest.approx(0.07)
    assert schedules.teacher_temperature(ssl4, 300_000, total, 1250) == pytest.approx(0.07)
    assert schedules.last_layer_frozen_until(ssl4, 1250) == 1250
    assert math.isclose(schedules.cosine(0, 1.0, 0.0, 10), 1.0)


def test_ema_update_known_answer():
    from vfm.ssl.model import ema_update

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * student.state_dict()[k])
    with pytest.raises(RuntimeError, match="differ"):
        ema_update(torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(3, 2)), 0.9)
