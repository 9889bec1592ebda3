"""The PCRLv2 2D network (chest X-rays): a ResNet-18 U-Net whose decoder has no skip connections, with the official
state-dict names.

The official 2D model is a segmentation_models_pytorch ``Unet('resnet18', in_channels=3, classes=3)`` whose decoder
is replaced by five blocks (512 -> 256 -> 128 -> 64 -> 32 -> 16 channels), each a nearest 2x upsample and two
3x3 conv + BatchNorm + ReLU layers, with a deep-supervision head, a projection (global average pool ->
BatchNorm1d) and a predictor per block. Names follow it exactly: ``model.encoder.*`` (torchvision ResNet-18 names),
``model.decoder.blocks.{0-4}.{conv1.0, conv1.1, conv2.0, conv2.1, bn, deep_supervision_head.{0,1,3},
predictor_head.{0,1,3}}.*`` and ``model.segmentation_head.0.*``, so a whole official model loads with
``strict=True``; the official checkpoints themselves hold the encoder only (see ``load_pretrained_2d``).

Departures: no ImageNet weights are downloaded at build time (random initialisation; a torchvision ResNet-18
state_dict can be loaded into ``model.encoder``); the deep-supervision heads do not run for local views, whose
masks the objective never reads (the official forward computed them).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import ResNet18Encoder

DECODER_CHANNELS = (256, 128, 64, 32, 16)
# Every spatial size must be divisible by this: five 2x downsamplings in the encoder.
DIVISOR_2D = 32


def _conv_bn_relu(in_chan: int, out_chan: int) -> nn.Sequential:
    """smp's Conv2dReLU with BatchNorm: conv (0, no bias), BatchNorm (1), ReLU (2)."""
    return nn.Sequential(nn.Conv2d(in_chan, out_chan, 3, padding=1, bias=False), nn.BatchNorm2d(out_chan),
                         nn.ReLU(inplace=True))


class DecoderBlock2D(nn.Module):
    """Nearest 2x upsample -> two conv-BN-ReLU layers; projection, predictor and deep-supervision heads."""

    def __init__(self, in_chan: int, out_chan: int, n_class: int = 3):
        super().__init__()
        self.conv1 = _conv_bn_relu(in_chan, out_chan)
        self.conv2 = _conv_bn_relu(out_chan, out_chan)
        self.bn = nn.BatchNorm1d(out_chan)
        self.deep_supervision_head = nn.Sequential(nn.Conv2d(out_chan, out_chan, 3, padding=1),
                                                   nn.BatchNorm2d(out_chan), nn.ReLU(inplace=True),
                                                   nn.Conv2d(out_chan, n_class, 1))
        self.predictor_head = nn.Sequential(nn.Linear(out_chan, 2 * out_chan), nn.BatchNorm1d(2 * out_chan),
                                            nn.ReLU(inplace=True), nn.Linear(2 * out_chan, out_chan))

    def forward(self, x: torch.Tensor, local: bool = False):
        x = self.conv2(self.conv1(F.interpolate(x, scale_factor=2, mode="nearest")))
        proj = self.bn(x.mean(dim=(2, 3)))
        pred = self.predictor_head(proj)
        mask = None if local else self.deep_supervision_head(x)
        return x, proj, pred, mask


class Decoder2D(nn.Module):
    def __init__(self, encoder_channels: int = 512, channels=DECODER_CHANNELS, n_class: int = 3):
        super().__init__()
        ins = (encoder_channels, *channels[:-1])
        self.blocks = nn.ModuleList(DecoderBlock2D(i, o, n_class) for i, o in zip(ins, channels, strict=True))
        for m in self.blocks.modules():  # the official initialize_decoder
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


class _Model(nn.Module):
    """The ``model`` container of the official names: encoder, decoder, segmentation_head."""

    def __init__(self, in_channels: int, n_class: int):
        super().__init__()
        self.encoder = ResNet18Encoder(in_channels)
        self.decoder = Decoder2D(self.encoder.out_channels[-1], n_class=n_class)
        self.segmentation_head = nn.Sequential(nn.Conv2d(DECODER_CHANNELS[-1], n_class, 3, padding=1))
        head = self.segmentation_head[0]  # the official initialize_head
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)


class NonSkipUNet2D(nn.Module):
    """PCRLv2's 2D pretraining network (official name ``PCRLv2``).

    ``forward(x, local=False)`` returns ``(restoration, features, masks)``:
    - ``restoration``: (B, n_class, H, W), the segmentation head's output (no activation), None for local views;
    - ``features``: ``[[proj, pred]]`` of the five decoder blocks (256, 128, 64, 32, 16 channels), each (B, C);
    - ``masks``: the five deep-supervision outputs upsampled bilinearly to (H, W) (the official 2**(4-i) factors);
      empty for local views.
    Every spatial size must be divisible by 32.
    """

    def __init__(self, n_class: int = 3, in_channels: int = 3):
        super().__init__()
        self.n_class, self.in_channels = n_class, in_channels
        self.model = _Model(in_channels, n_class)

    @property
    def encoder(self) -> ResNet18Encoder:
        return self.model.encoder

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.decoder.blocks

    @property
    def up_blocks(self) -> nn.ModuleList:
        """The decoder blocks under the 3D network's name (the training step reads their heads)."""
        return self.model.decoder.blocks

    def forward(self, x: torch.Tensor, local: bool = False):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if any(s % DIVISOR_2D for s in x.shape[2:]):
            raise ValueError(f"every spatial size must be divisible by {DIVISOR_2D}, got {tuple(x.shape[2:])}")
        out = self.encoder(x)[-1]
        features, masks = [], []
        for i, block in enumerate(self.blocks):
            out, proj, pred, mask = block(out, local)
            features.append([proj, pred])
            if not local:
                masks.append(F.interpolate(mask, scale_factor=2 ** (len(self.blocks) - 1 - i), mode="bilinear")
                             if i < len(self.blocks) - 1 else mask)
        restoration = None if local else self.model.segmentation_head(out)
        return restoration, features, masks
