"""ResNet-18 with torchvision's module and parameter names, without torchvision: the encoder of PCRLv2's 2D network.

The names (``conv1.weight``, ``bn1.*``, ``layer{1-4}.{0,1}.{conv1,bn1,conv2,bn2}.*``,
``layer{2,3,4}.0.downsample.{0,1}.*``; no ``fc``) are those of torchvision's ``resnet18`` and of the encoder of a
segmentation_models_pytorch ``Unet('resnet18')``, so the official 2D checkpoints (encoder only) and torchvision
(e.g. ImageNet) state_dicts load with ``strict=True``. Initialisation follows torchvision: convolutions Kaiming
normal (fan out, ReLU), BatchNorm weight 1 and bias 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# Output channels of the feature pyramid of :meth:`ResNet18Encoder.forward` (input, /2, /4, /8, /16, /32).
RESNET18_CHANNELS = (3, 64, 64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (a 1x1 strided projection when the shape
    changes: ``downsample.0`` conv, ``downsample.1`` BatchNorm)."""

    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if stride != 1 or in_chan != out_chan:
            self.downsample = nn.Sequential(nn.Conv2d(in_chan, out_chan, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chan))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Encoder(nn.Module):
    """ResNet-18 without its classifier. ``forward(x)`` returns the feature pyramid ``[x, f/2, f/4, f/8, f/16,
    f/32]`` with :data:`RESNET18_CHANNELS` channels (the stem's output, then each of the four stages)."""

    out_channels = RESNET18_CHANNELS

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        previous = 64
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(previous, width, stride), BasicBlock(width, width)))
            previous = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x, self.relu(self.bn1(self.conv1(x)))]
        out = self.maxpool(features[-1])
        for stage in self.stages:
            out = stage(out)
            features.append(out)
        return features
