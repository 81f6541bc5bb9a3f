"""timm model construction from a recipe, and parameter / FLOP counting on the meta device.

timm's data config ignores size overrides (timm/data/config.py `resolve_data_config` reads the model's
unchanged `pretrained_cfg`), so the data side never asks the model for its input size: resolution comes
from the recipe stage and is passed to the model here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vfm.recipes.datasets import NUM_CLASSES
from vfm.recipes.schema import Recipe


def stage_num_classes(recipe: Recipe, stage: str) -> int:
    """Classes of a stage's dataset (0 for an unlabelled corpus)."""
    return NUM_CLASSES.get(recipe.stage(stage).data.dataset, 0)


def model_kwargs(recipe: Recipe, stage: str, num_classes: int | None = None, **overrides: Any) -> dict:
    """timm kwargs of the stage's model: the recipe's architecture, the stage's resolution, drop-path and
    classes, then `overrides` (what the task's objective fixes, `TaskSpec.model_overrides`)."""
    st = recipe.stage(stage)
    kwargs: dict = dict(recipe.model.kwargs)
    if recipe.model.family == "vit":
        kwargs["img_size"] = st.data.resolution
    kwargs["drop_path_rate"] = st.drop_path
    kwargs["num_classes"] = stage_num_classes(recipe, stage) if num_classes is None else num_classes
    if st.head_init_scale is not None and recipe.model.family == "convnext":
        kwargs["head_init_scale"] = st.head_init_scale
    return {**kwargs, **overrides}


def build_model(recipe: Recipe, stage: str = "pretrain", *, num_classes: int | None = None,
                device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """`timm.create_model` with the recipe's architecture overrides and the stage's resolution/classes.

    Always passes `num_classes`: `vit_huge_patch14_224` and `vit_giant_patch14_dinov2` default to headless.
    """
    with torch.device(device):
        return create_model(recipe.model.timm_name, **model_kwargs(recipe, stage, num_classes, **overrides))


def create_model(timm_name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(timm_name, pretrained=False, **kwargs)`, plus `mlp_ratio` for ConvNeXt.

    timm's ConvNeXt takes `kernel_sizes` but no `mlp_ratio`: `ConvNeXtStage` builds each `ConvNeXtBlock` with
    the block's default ratio 4 (huggingface/pytorch-image-models timm/models/convnext.py, 1.0.31). Paper 002's
    expansion-ratio ablation needs it, so each block's MLP is rebuilt at the ratio exactly as the block builds
    it (`int(mlp_ratio * channels)` hidden units, same MLP class and activation) and initialised as
    ConvNeXt initialises its weights. Every export and evaluation builds its model here."""
    import timm

    ratio = kwargs.pop("mlp_ratio", None) if timm.models.is_model_in_modules(timm_name, ["convnext"]) else None
    model = timm.create_model(timm_name, pretrained=False, **kwargs)
    if ratio is not None:
        _set_convnext_mlp_ratio(model, float(ratio))
    return model


def _set_convnext_mlp_ratio(model: nn.Module, ratio: float) -> None:
    from timm.layers import GlobalResponseNormMlp
    from timm.models.convnext import ConvNeXtBlock, _init_weights

    for block in model.modules():
        if not isinstance(block, ConvNeXtBlock):
            continue
        old = block.mlp
        channels = old.fc1.in_channels if block.use_conv_mlp else old.fc1.in_features
        mlp = type(old)(channels, int(ratio * channels), act_layer=type(old.act), use_conv=block.use_conv_mlp)
        if isinstance(old, GlobalResponseNormMlp) != isinstance(mlp, GlobalResponseNormMlp):
            raise AssertionError("rebuilt the ConvNeXt MLP as another class")
        for name, module in mlp.named_modules():
            _init_weights(module, name)
        block.mlp = mlp


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, resolution: int, batch: int = 1) -> int:
    """Real floating-point ops (2 × MACs) of one forward pass, counted by torch's FlopCounterMode.

    Works on meta-device models (nothing is allocated), so ViT-g/14 is counted on a laptop.
    Training cost is taken as 3 × forward (for ViTs the counter's forward+backward is 2.99 × forward; for
    ConvNeXt it reports ≈ 9 ×, over-counting the depthwise-conv backward, so backward is never counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.empty(batch, 3, resolution, resolution, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())
