"""Plain reference of the official PCRLv2 3D network and training objective, in the official code's structure.

This is the semantics ``pcrlv2_fast`` must keep: the official ``PCRLv23d`` (depth-indexed channel
arithmetic, ``adaptive_avg_pool3d`` projection, deep-supervision masks upsampled with ``F.interpolate``)
and the official per-step objective of ``train_3d`` (``reference_step_loss``). Tests compare the
engine's model, losses and training step against it. ``base`` generalises the official 32 channels so
tests can use tiny networks; everything else is fixed as in the official code.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F


class RefLUConv(nn.Module):
    def __init__(self, in_chan, out_chan, act="relu"):
        super().__init__()
        self.conv1 = nn.Conv3d(in_chan, out_chan, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_chan, momentum=0.1, affine=True)
        self.activation = nn.Sigmoid() if act == "sigmoid" else nn.ReLU()

    def forward(self, x):
        return self.activation(self.bn1(self.conv1(x)))


def _n_conv(in_channel, depth, base, double_channel=False):
    if double_channel:
        c = base * 2 ** (depth + 1)
        return nn.Sequential(RefLUConv(in_channel, c), RefLUConv(c, c))
    c = base * 2**depth
    return nn.Sequential(RefLUConv(in_channel, c), RefLUConv(c, 2 * c))


class RefDown(nn.Module):
    def __init__(self, in_channel, depth, base):
        super().__init__()
        self.ops = _n_conv(in_channel, depth, base)

    def forward(self, x):
        return self.ops(x)


class RefUp(nn.Module):
    def __init__(self, chans, depth, base):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(chans, chans, kernel_size=2, stride=2)
        self.ops = _n_conv(chans, depth, base, double_channel=True)
        c = base * 2**depth * 2
        self.bn = nn.BatchNorm1d(c)
        self.predictor_head = nn.Sequential(nn.Linear(c, 2 * c), nn.BatchNorm1d(2 * c), nn.ReLU(), nn.Linear(2 * c, c))
        self.deep_supervision_head = RefLUConv(c, 1, "sigmoid")

    def forward(self, x):
        b = x.shape[0]
        x = self.ops(self.up_conv(x))
        pro = self.bn(F.adaptive_avg_pool3d(x, (1, 1, 1)).view(b, -1))
        return x, pro, self.predictor_head(pro), self.deep_supervision_head(x)


class RefOut(nn.Module):
    def __init__(self, chans, n_class):
        super().__init__()
        self.final_conv = nn.Conv3d(chans, n_class, kernel_size=1)

    def forward(self, x):
        return torch.sigmoid(self.final_conv(x))


class ReferencePCRLv23d(nn.Module):
    """The official ``PCRLv23d`` (relu, bn), with the base channel count as a parameter."""

    def __init__(self, n_class=1, in_channels=1, base=32):
        super().__init__()
        self.maxpool = nn.MaxPool3d(2)
        self.down_tr64 = RefDown(in_channels, 0, base)
        self.down_tr128 = RefDown(2 * base, 1, base)
        self.down_tr256 = RefDown(4 * base, 2, base)
        self.down_tr512 = RefDown(8 * base, 3, base)
        self.up_tr256 = RefUp(16 * base, 2, base)
        self.up_tr128 = RefUp(8 * base, 1, base)
        self.up_tr64 = RefUp(4 * base, 0, base)
        self.out_tr = RefOut(2 * base, n_class)

    def forward(self, x, local=False):
        s64 = self.down_tr64(x)
        s128 = self.down_tr128(self.maxpool(s64))
        s256 = self.down_tr256(self.maxpool(s128))
        o512 = self.down_tr512(self.maxpool(s256))
        u256, pro256, pre256, m256 = self.up_tr256(o512)
        u128, pro128, pre128, m128 = self.up_tr128(u256)
        u64, pro64, pre64, m64 = self.up_tr64(u128)
        masks = []
        if not local:
            masks = [F.interpolate(m256, scale_factor=4, mode="trilinear"),
                     F.interpolate(m128, scale_factor=2, mode="trilinear"), m64]
        feats = [[pro256, pre256], [pro128, pre128], [pro64, pre64]]
        return self.out_tr(u64), feats, masks


def reference_cos_loss(output1, output2, index):
    """Official ``cos_loss`` with the scale index given instead of drawn inside."""
    cosine = nn.CosineSimilarity()
    s1, s2 = output1[index], output2[index]
    return -(cosine(s1[1], s2[0].detach()).mean() + cosine(s2[1], s1[0].detach()).mean()) * 0.5


def reference_step_loss(model, x1, x2, gt, local_views, epoch, total_epochs, rng: random.Random):
    """The official ``train_pcrlv2_inner`` objective for one batch, scale draws taken from ``rng``.

    ``local_views`` is the list of the six (B, 1, 16, 16, 16) local views. Draw order as official: the global
    pair's scale first, then for each local view one draw for (x1, local) and one for (x2, local).
    Returns (total, global, local, restoration, deep-supervision) losses.
    """
    mse = nn.MSELoss()
    bsz = x1.shape[0]
    mask1, dec1, middle_masks1 = model(x1)
    _, dec2, _ = model(x2)
    index2 = rng.randint(0, len(dec1) - 1)
    loss2 = reference_cos_loss(dec1, dec2, index2)
    _, local_out, _ = model(torch.cat(local_views, dim=0), local=True)
    local_out = [torch.stack(t) for t in local_out]
    local_loss = 0.0
    for i in range(len(local_views)):
        tmp = [t[:, bsz * i: bsz * (i + 1)] for t in local_out]
        local_loss = local_loss + reference_cos_loss(dec1, tmp, rng.randint(0, len(dec1) - 1))
        local_loss = local_loss + reference_cos_loss(dec2, tmp, rng.randint(0, len(dec1) - 1))
    local_loss = local_loss / (2 * len(local_views))
    loss1 = mse(mask1, gt)
    beta = 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))
    loss4 = beta * mse(middle_masks1[index2], gt)
    return loss1 + loss2 + loss4 + local_loss, loss2, local_loss, loss1, loss4
