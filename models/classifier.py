"""The project's attribute classifier: the judge of edits, and the server's current-attribute estimate."""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import conv_trunk
from models.config import ClassifierConfig


class AttributeClassifier(nn.Module):
    """Conv trunk, global average pooling and a linear layer: attribute logits (B, n_attrs)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.trunk, channels = conv_trunk(3, cfg.base_channels, cfg.max_channels, cfg.n_layers, cfg.norm)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(channels[-1], cfg.n_attrs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.trunk:
            h = layer(h)
        return self.head(h)
