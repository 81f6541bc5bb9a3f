"""Paper 002's ablation grid: each cell is a different architecture (params, depthwise kernel, MLP width),
built through timm's ConvNeXt with vfm's `mlp_ratio`, and `vfm plan --ablation` prices every cell."""

from __future__ import annotations

import pytest
import torch

from vfm.models import build_model, count_params, create_model
from vfm.plan import plan_ablation
from vfm.recipes import RecipeError, load_recipe
from vfm.recipes.ablation import ablation_cells, cell_by_name, subset_size


def _cell_recipe(cell, profile="smoke"):
    return load_recipe("convnext-xl", list(cell.overrides), profile)


def test_the_paper_grid_is_fifteen_cells_of_convnext_tiny_on_one_node():
    recipe = load_recipe("convnext-xl")
    cells = ablation_cells(recipe)
    assert [c.name for c in cells][:4] == ["k3-r2", "k3-r3", "k3-r4", "k5-r2"] and len(cells) == 15
    r = _cell_recipe(cell_by_name(recipe, "k11-r3"), "paper")
    assert (r.model.timm_name, r.model.kwargs) == ("convnext_tiny", {"kernel_sizes": 11, "mlp_ratio": 3.0})
    pre = r.stages["pretrain"]
    assert (pre.data.dataset, pre.data.resolution, pre.epochs, pre.drop_path) == ("in1k", 224, 100, 0.1)
    assert (r.hardware.gpus, pre.batch.global_batch, pre.batch.micro_batch) == (8, 4096, 128)
    assert subset_size(recipe) == 128_117  # 100 of IN-1K's 1,000 classes, every image
    with pytest.raises(RecipeError, match="not in the grid.*k7-r4"):
        cell_by_name(recipe, "k4-r4")
    with pytest.raises(RecipeError, match="no `ablation:` block"):
        ablation_cells(load_recipe("vit-huge"))


def test_cells_differ_in_architecture_params_kernel_and_mlp_width():
    recipe = load_recipe("convnext-xl", profile="smoke")
    seen = {}
    for cell in ablation_cells(recipe):
        model = build_model(_cell_recipe(cell), "pretrain", num_classes=5, device="meta")
        blocks = [m for m in model.modules() if type(m).__name__ == "ConvNeXtBlock"]
        assert blocks
        for b in blocks:
            channels = b.conv_dw.weight.shape[0]
            assert tuple(b.conv_dw.weight.shape) == (channels, 1, cell.kernel_size, cell.kernel_size)
            fc1 = b.mlp.fc1.weight
            assert fc1.shape[0] == int(cell.mlp_ratio * channels), (cell.name, fc1.shape)
        seen[cell.name] = count_params(model)
    assert len(set(seen.values())) == len(seen), seen  # four cells, four parameter counts
    assert seen["k3-r2"] < seen["k7-r2"] < seen["k7-r4"] and seen["k3-r2"] < seen["k3-r4"]


def test_mlp_ratio_4_is_timms_own_convnext_and_the_rebuilt_mlp_trains():
    torch.manual_seed(0)
    own = create_model("convnext_atto", num_classes=3)
    torch.manual_seed(0)
    same = create_model("convnext_atto", num_classes=3, mlp_ratio=4)
    assert count_params(own) == count_params(same)
    assert own.state_dict().keys() == same.state_dict().keys()
    narrow = create_model("convnext_atto", num_classes=3, kernel_sizes=3, mlp_ratio=2)
    fc1 = narrow.stages[0].blocks[0].mlp.fc1
    assert fc1.weight.std() > 0 and torch.all(fc1.bias == 0)  # ConvNeXt's init: trunc-normal weights, zero bias
    loss = narrow(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0
    # a ViT keeps timm's own mlp_ratio argument
    vit = create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, depth=1, mlp_ratio=2)
    assert vit.blocks[0].mlp.fc1.out_features == 2 * 192


def test_plan_prices_every_cell_and_more_channels_cost_more():
    cells = {c.cell: c for c in plan_ablation("convnext-xl")}
    assert len(cells) == 15
    k7r4, k3r2 = cells["k7-r4"], cells["k3-r2"]
    assert 27e6 < k7r4.params < 29e6  # ConvNeXt-T at a 100-class head (28.6 M at 1,000 classes)
    assert k7r4.forward_gflops_per_image == pytest.approx(8.9, rel=0.05)  # 4.5 GMACs, as timm reports
    assert k3r2.params < k7r4.params and k3r2.gpu_hours < k7r4.gpu_hours
    assert k7r4.total_steps == 100 * -(-128_117 // 4096) and k7r4.gpus == 8


def test_bad_grids_are_refused_by_the_recipe():
    with pytest.raises(RecipeError, match="kernels must be odd"):
        load_recipe("convnext-xl", ["ablation.kernel_sizes=[3, 4]"])
    with pytest.raises(RecipeError, match="repeats a cell"):
        ablation_cells(load_recipe("convnext-xl", ["ablation.kernel_sizes=[3, 3]"]))
