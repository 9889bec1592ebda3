"""The network's building blocks: the norm and activation factories and the conv block (``LUConv``).

They sit below both the fused modules (:mod:`pcrlv2_fast.nn.modules`, which rebuild the same children) and the
models, so each layer imports them from here. The option names are the official ``--norm``/``--act`` values.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

NORMS = ("bn", "gn", "in")
ACTS = ("relu", "prelu", "elu", "sigmoid")
# The network's --act choices: the sigmoid is only the deep-supervision head's activation.
NETWORK_ACTS = ("relu", "prelu", "elu")


def make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm3d(channels, momentum=0.1, affine=True)
    if norm == "gn":
        # The official GroupNorm(8, C) cannot normalise the 1-channel deep-supervision head (or tiny widths):
        # use the largest group count dividing C that is at most 8 (8 for every official layer that works).
        return nn.GroupNorm(math.gcd(8, channels), channels, eps=1e-5, affine=True)
    if norm == "in":
        return nn.InstanceNorm3d(channels, momentum=0.1, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_act(act: str, channels: int) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "prelu":
        return nn.PReLU(channels)
    if act == "elu":
        return nn.ELU(inplace=True)
    if act == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


class LUConv(nn.Module):
    """Conv3d(k=3, pad=1, bias) -> norm -> activation."""

    def __init__(self, in_chan: int, out_chan: int, act: str = "relu", norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Conv3d(in_chan, out_chan, kernel_size=3, padding=1)
        self.bn1 = make_norm(norm, out_chan)
        self.activation = make_act(act, out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def double_conv(in_chan: int, mid_chan: int, out_chan: int, act: str, norm: str) -> nn.Sequential:
    return nn.Sequential(LUConv(in_chan, mid_chan, act, norm), LUConv(mid_chan, out_chan, act, norm))
