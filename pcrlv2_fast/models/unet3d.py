"""The PCRLv2 3D network: a U-Net without skip connections, with the official state-dict names.

Module and parameter names follow the official ``PCRLv23d`` exactly (``down_tr64.ops.0.conv1.weight``,
``up_tr256.predictor_head.0.weight``, ...), so official checkpoints load with ``strict=True``. The
channel widths are ``width * 2**k`` (``width=32`` is the official network, about 17.1 M parameters);
small widths keep tests and demos fast.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import fuse_model
from ..nn.blocks import LUConv, double_conv
from ..nn.dispatch import check_kernels


class DownTransition(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, out_chan: int, act: str, norm: str):
        super().__init__()
        self.ops = double_conv(in_chan, mid_chan, out_chan, act, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)


class UpTransition(nn.Module):
    """Transposed conv x2 -> two LUConvs, plus the projection, predictor and deep-supervision heads."""

    def __init__(self, in_chan: int, out_chan: int, act: str, norm: str):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_chan, in_chan, kernel_size=2, stride=2)
        self.ops = double_conv(in_chan, out_chan, out_chan, act, norm)
        self.bn = nn.BatchNorm1d(out_chan)
        self.predictor_head = nn.Sequential(
            nn.Linear(out_chan, 2 * out_chan),
            nn.BatchNorm1d(2 * out_chan),
            nn.ReLU(inplace=True),
            nn.Linear(2 * out_chan, out_chan),
        )
        self.deep_supervision_head = LUConv(out_chan, 1, "sigmoid", norm)

    def forward(self, x: torch.Tensor):
        x = self.ops(self.up_conv(x))
        proj = self.bn(x.mean(dim=(2, 3, 4)))
        pred = self.predictor_head(proj)
        mask = self.deep_supervision_head(x)
        return x, proj, pred, mask


class OutputTransition(nn.Module):
    def __init__(self, in_chan: int, n_class: int):
        super().__init__()
        self.final_conv = nn.Conv3d(in_chan, n_class, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.final_conv(x))


class NonSkipUNet3D(nn.Module):
    """PCRLv2's 3D pretraining network (official name ``PCRLv23d``).

    ``forward(x, local=False, upsample_masks=None)`` returns ``(restoration, features, masks)``:
    - ``restoration``: (B, n_class, X, Y, Z) sigmoid output of ``out_tr`` at full resolution;
    - ``features``: ``[[proj, pred]]`` for the decoder scales 256, 128, 64 (official widths), each (B, C);
    - ``masks``: the three deep-supervision outputs upsampled trilinearly to full size (x4, x2, x1), or at their
      own resolution (1/4, 1/2, 1/1) when ``upsample_masks`` is False (None: the constructor's choice), which is
      what ``PCRLv2Loss(kernels="triton")`` reads without materialising the upsampled volumes; empty for local
      views (``local=True``), whose restorations the objective does not use.
    Every spatial size must be divisible by 8 (three max-pools).

    ``kernels="triton"`` runs every conv block fused (:func:`pcrlv2_fast.nn.fuse_model`); parameter and buffer
    names, hence checkpoints, are the same for both values.
    """

    def __init__(self, n_class: int = 1, act: str = "relu", norm: str = "bn", in_channels: int = 1, width: int = 32,
                 kernels: str = "torch", upsample_masks: bool = True):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        check_kernels(kernels)
        w = width
        self.width, self.norm, self.act, self.in_channels, self.n_class = w, norm, act, in_channels, n_class
        self.maxpool = nn.MaxPool3d(2)
        self.down_tr64 = DownTransition(in_channels, w, 2 * w, act, norm)
        self.down_tr128 = DownTransition(2 * w, 2 * w, 4 * w, act, norm)
        self.down_tr256 = DownTransition(4 * w, 4 * w, 8 * w, act, norm)
        self.down_tr512 = DownTransition(8 * w, 8 * w, 16 * w, act, norm)
        self.up_tr256 = UpTransition(16 * w, 8 * w, act, norm)
        self.up_tr128 = UpTransition(8 * w, 4 * w, act, norm)
        self.up_tr64 = UpTransition(4 * w, 2 * w, act, norm)
        self.out_tr = OutputTransition(2 * w, n_class)
        self.kernels, self.upsample_masks = kernels, upsample_masks
        if kernels == "triton":
            fuse_model(self, kernels)

    @property
    def up_blocks(self) -> tuple[UpTransition, ...]:
        """The decoder's up blocks, in the order of the feature pyramid and the masks (256, 128, 64 x width/32)."""
        return self.up_tr256, self.up_tr128, self.up_tr64

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature pyramid (full, 1/2, 1/4, 1/8 resolution)."""
        f64 = self.down_tr64(x)
        f128 = self.down_tr128(self.maxpool(f64))
        f256 = self.down_tr256(self.maxpool(f128))
        f512 = self.down_tr512(self.maxpool(f256))
        return [f64, f128, f256, f512]

    def forward(self, x: torch.Tensor, local: bool = False, upsample_masks: bool | None = None):
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        if any(s % 8 for s in x.shape[2:]):
            raise ValueError(f"every spatial size must be divisible by 8, got {tuple(x.shape[2:])}")
        out = self.encode(x)[-1]
        features, low_masks = [], []
        for up in self.up_blocks:
            out, proj, pred, mask = up(out)
            features.append([proj, pred])
            low_masks.append(mask)
        restoration = self.out_tr(out)
        masks = []
        if upsample_masks is None:
            upsample_masks = self.upsample_masks
        if not local and not upsample_masks:
            masks = low_masks
        elif not local:
            masks = [
                F.interpolate(low_masks[0], scale_factor=4, mode="trilinear"),
                F.interpolate(low_masks[1], scale_factor=2, mode="trilinear"),
                low_masks[2],
            ]
        return restoration, features, masks
