"""The DINO projection head (facebookresearch/dinov2 `dinov2/layers/dino_head.py`).

MLP in → hidden → … → bottleneck (GELU, no BN, trunc-normal 0.02 init), L2 normalisation, then a
weight-normalised linear layer to the prototypes. The weight-norm gain starts at 1, so the logits start
as cosine similarities between the bottleneck feature and each prototype, and stays trainable as
upstream leaves it (`self.last_layer.weight_g.data.fill_(1)`, no `requires_grad_(False)`; DINO v1's
`norm_last_layer` freeze is not in DINOv2). It is frozen with the rest of the prototype layer for the
first `freeze_last_layer_epochs` (the name holds `last_layer`), and decayed like upstream's `weight_g`.

torch's parametrizations `weight_norm` replaces the deprecated `torch.nn.utils.weight_norm` upstream
uses (torch 2.14 warns FutureWarning on it); its `original0` is the gain g, `original1` the direction v.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

LAST_LAYER = "last_layer"
"""Parameter-name component of the prototype layer, frozen during the first epoch(s)."""


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs at least one layer, got nlayers={nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
