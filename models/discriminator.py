"""The GAN discriminator: adversarial and attribute heads on one conv trunk."""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import conv_trunk
from models.config import DiscriminatorConfig


class Discriminator(nn.Module):
    """Conv trunk; ``forward`` returns (adversarial logit (B,), attribute logits (B, n_attrs))."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.trunk, channels = conv_trunk(3, cfg.base_channels, cfg.max_channels, cfg.n_layers, cfg.norm)
        side = cfg.image_size // 2**cfg.n_layers
        flat = channels[-1] * side * side
        self.adv_head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, cfg.fc_dim), nn.LeakyReLU(0.2), nn.Linear(cfg.fc_dim, 1)
        )
        self.cls_head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, cfg.fc_dim), nn.LeakyReLU(0.2), nn.Linear(cfg.fc_dim, cfg.n_attrs)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for layer in self.trunk:
            h = layer(h)
        return self.adv_head(h).squeeze(1), self.cls_head(h)
