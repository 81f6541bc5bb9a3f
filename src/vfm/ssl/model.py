"""Student / teacher network of DINOv2: a timm ViT backbone with an iBOT mask token, and the heads.

The backbone is timm's (`vit_giant_patch14_dinov2` per recipe; its final-norm CLS token with
`num_classes=0` is DINOv2's `x_norm_clstoken`). timm's ViT has no mask token, so `backbone_tokens`
runs timm's own `forward_features` steps with masked patch embeddings replaced by a learned token
before the position embedding, as DINOv2's `prepare_tokens_with_masks` does.

`SSLModel.blocks` is a *property* pointing at the backbone's blocks (not a second registration, so
parameter names stay `backbone.blocks.N…`): the shared loop's FSDP2 wrapping and activation
checkpointing find the per-block units on it as on a plain timm ViT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import DropPath
from timm.models._manipulate import checkpoint_seq
from torch import Tensor, nn

from vfm.recipes.schema import SSLConfig
from vfm.ssl.heads import DINOHead


@dataclass
class SSLOutput:
    global_cls: Tensor
    """Backbone CLS tokens of the global crops (n_global·B, D): KoLeo's input."""
    global_logits: Tensor
    local_logits: Tensor | None
    patch_logits: Tensor | None
    """Head outputs at the masked patch positions (M, K), in `masks.flatten()` order."""


def uniform_drop_path(vit: nn.Module, rate: float) -> None:
    """DINOv2 uses the same stochastic-depth rate in every block (`drop_path_uniform: true`); timm
    ramps it linearly from 0. Set every block's rate to `rate`."""
    for block in vit.blocks:
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


class SSLModel(nn.Module):
    def __init__(self, backbone: nn.Module, ssl: SSLConfig) -> None:
        super().__init__()
        if not hasattr(backbone, "patch_embed") or not hasattr(backbone, "_pos_embed"):
            raise ValueError(f"{type(backbone).__name__}: DINOv2 training needs a timm VisionTransformer backbone")
        self.backbone = backbone
        dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.dino_head = DINOHead(dim, ssl.head_prototypes, ssl.head_hidden, ssl.head_bottleneck, ssl.head_layers)
        self.ibot_head = (DINOHead(dim, ssl.ibot_prototypes, ssl.head_hidden, ssl.ibot_bottleneck, ssl.head_layers)
                          if ssl.ibot and ssl.ibot_separate_head else None)
        self.ibot = ssl.ibot

    @property
    def blocks(self) -> nn.Module:
        return self.backbone.blocks

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in inner} | {"mask_token"}

    def backbone_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """timm `forward_features` with masked patches replaced by the mask token: (B, 1+N, D) normed."""
        vit = self.backbone
        x = vit.patch_embed(x)  # (B, H, W, D) with dynamic_img_size, else (B, N, D)
        if masks is not None:
            m = masks.view(x.shape[:-1]).unsqueeze(-1)
            x = torch.where(m, self.mask_token.to(x.dtype).view(*([1] * (x.ndim - 1)), -1), x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        if vit.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def forward(self, global_crops: Tensor, local_crops: Tensor | None = None, masks: Tensor | None = None,
                mask_input: bool = False, cls_only: bool = False) -> SSLOutput | Tensor:
        """Student (`mask_input=True`): masked globals + locals. Teacher: clean globals only; `masks`
        then only selects which patch outputs go through the iBOT head. `cls_only`: the backbone's
        final-norm CLS token (k-NN features) — through this module's call, so FSDP2 gathers its params."""
        if cls_only:
            return self.backbone_tokens(global_crops)[:, 0]
        prefix = self.backbone.num_prefix_tokens
        g_tokens = self.backbone_tokens(global_crops, masks if mask_input and self.ibot else None)
        g_cls = g_tokens[:, 0]
        cls_inputs = [g_cls]
        if local_crops is not None and local_crops.numel():
            cls_inputs.append(self.backbone_tokens(local_crops)[:, 0])
        patch_in = g_tokens[:, prefix:][masks] if self.ibot and masks is not None else None
        if patch_in is not None and self.ibot_head is None:
            # shared head: one pass over CLS and masked patches together (as upstream)
            cls_inputs.append(patch_in)
        logits = self.dino_head(torch.cat(cls_inputs))
        n_g = g_cls.shape[0]
        n_l = cls_inputs[1].shape[0] if len(cls_inputs) > 1 and local_crops is not None and local_crops.numel() else 0
        patch_logits = None
        if patch_in is not None:
            patch_logits = self.ibot_head(patch_in) if self.ibot_head is not None else logits[n_g + n_l:]
        return SSLOutput(global_cls=g_cls, global_logits=logits[:n_g],
                         local_logits=logits[n_g : n_g + n_l] if n_l else None, patch_logits=patch_logits)


def _local(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor parameter (a view of its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def reshard(module: nn.Module) -> None:
    """Free the teacher's gathered parameters after its forward (upstream `reshard_fsdp_model`).

    FSDP2 keeps the *root* unit's parameters gathered after forward, expecting a backward that never
    comes for the no-grad teacher: without this they would stay unsharded (memory) and the EMA
    would pair whole teacher tensors with the student's shards. A no-op without FSDP2.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1-m)·student, shard by shard.

    Under FSDP2 both are sharded the same way, so each rank updates its local shards with two fused
    foreach kernels (as upstream does on FSDP1 flat shards); under DDP the tensors are whole.
    Parameters are matched by name, so a mismatch in structure fails loudly instead of silently.
    """
    reshard(teacher)
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        diff = sorted(t_params.keys() ^ s_params.keys())[:5]
        raise RuntimeError(f"teacher and student parameters differ: {diff}")
    for name, t in t_params.items():
        if _local(t).shape != _local(s_params[name]).shape:
            raise RuntimeError(f"teacher/student shard of {name} differ: {tuple(_local(t).shape)} vs "
                               f"{tuple(_local(s_params[name]).shape)}; they must be sharded the same way")
    t_list = [_local(t_params[n]) for n in t_params]
    s_list = [_local(s_params[n]).to(t_list[i].dtype) for i, n in enumerate(t_params)]
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1 - momentum)
