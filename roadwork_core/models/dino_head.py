"""DINO projection head: MLP -> bottleneck -> L2 normalize -> weight-normed layer to K prototypes.

Follows DINO (Caron et al., 2021) / DINOv2: the last layer is weight-normalized with its norm
(``weight_g``) fixed at 1, so the logits are cosine similarities to K learnable prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers={nlayers}: must be >= 1.")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # original0 is the per-prototype norm g: fixed at 1 (DINO's norm_last_layer=True).
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def last_layer_params(self) -> list[nn.Parameter]:
        """Parameters zeroed by ``cancel_last_layer_grads`` (DINO's freeze_last_layer)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def cancel_last_layer_grads(self) -> None:
        for p in self.last_layer_params():
            p.grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, in_dim)
        x = self.mlp(x)  # (B, bottleneck)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)  # (B, K)
