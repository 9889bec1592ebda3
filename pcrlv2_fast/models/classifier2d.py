"""The 2D fine-tuning classifier: the PCRLv2 ResNet-18 encoder with the official classification head (global
average pool, dropout, one linear layer to the findings' logits). Keys: ``encoder.*`` (torchvision ResNet-18
names, as in the pretraining checkpoints) and ``head.*``."""

from __future__ import annotations

import torch
import torch.nn as nn

from .resnet import ResNet18Encoder

__all__ = ["Classifier2D"]


class Classifier2D(nn.Module):
    """(B, 3, H, W) -> (B, num_classes) logits (a sigmoid per finding: multi-label)."""

    def __init__(self, num_classes: int, dropout: float = 0.2, in_channels: int = 3):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.encoder = ResNet18Encoder(in_channels)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.out_channels[-1], num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def freeze_encoder(self) -> None:
        """Linear probing: the encoder's weights fixed and its BatchNorm statistics frozen (eval mode kept by
        :meth:`train`)."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self._frozen = True

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_frozen", False):
            self.encoder.eval()
        return self
