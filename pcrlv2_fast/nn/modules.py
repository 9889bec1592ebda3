"""Fused 3D conv blocks with the unfused blocks' parameter and buffer names.

Each fused module keeps the ordinary children (``nn.Conv3d``, the norm, the activation) under the names the
unfused network uses, so a state_dict moves between a fused and an unfused network with ``strict=True`` in
either direction; only ``forward`` differs (see :mod:`pcrlv2_fast.nn.functional`).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .blocks import make_act, make_norm
from .dispatch import check_kernels
from .functional import CONV_IMPLS, conv_bn_stats_fn, conv_norm_act, norm_act


def _check_conv_impl(conv_impl: str) -> str:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    return conv_impl


class FusedNormAct3d(nn.Module):
    """Normalisation + activation as one kernel each way: children ``norm`` and ``activation``.

    norm: "bn" (BatchNorm3d, momentum 0.1), "gn" (GroupNorm with gcd(8, C) groups), "in" (affine InstanceNorm3d);
    act: "relu", "elu", "prelu", "sigmoid" (the model's choices). ``kernels="torch"`` runs the two modules as
    they are. Training and eval behave as the modules do (batch or running statistics, running-stat updates).
    """

    def __init__(self, channels: int, norm: str = "bn", act: str = "relu", kernels: str = "triton"):
        super().__init__()
        self.norm = make_norm(norm, channels)
        self.activation = make_act(act, channels)
        self.kernels = check_kernels(kernels)

    @classmethod
    def from_modules(cls, norm: nn.Module, activation: nn.Module, kernels: str = "triton") -> FusedNormAct3d:
        """Wrap existing modules (shared, not copied)."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.norm, block.activation = norm, activation
        block.kernels = check_kernels(kernels)
        return block

    def forward(self, x: Tensor) -> Tensor:
        return norm_act(x, self.norm, self.activation, self.kernels)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels!r}"


class FusedConvBlock3d(nn.Module):
    """The model's conv block (official ``LUConv``): Conv3d(k=3, pad=1, bias) -> norm -> activation, fused.

    Children ``conv1``, ``bn1`` (BatchNorm3d / GroupNorm / InstanceNorm3d, named as in the official network
    whatever the norm) and ``activation``, built exactly as ``LUConv(in_chan, out_chan, act, norm)`` builds them
    (same initialisation for the same seed). ``kernels="triton"`` fuses the norm and the activation; while the
    BatchNorm uses batch statistics the conv also produces them when ``conv3d_bn_stats`` is available
    (``conv_impl`` is passed to it as ``impl``). ``kernels="torch"`` is ``LUConv``'s forward.
    """

    def __init__(self, in_chan: int, out_chan: int, act: str = "relu", norm: str = "bn", kernels: str = "triton",
                 conv_impl: str = "auto"):
        super().__init__()
        self.conv1 = nn.Conv3d(in_chan, out_chan, kernel_size=3, padding=1)
        self.bn1 = make_norm(norm, out_chan)
        self.activation = make_act(act, out_chan)
        self.set_kernels(kernels, conv_impl)

    @classmethod
    def from_modules(cls, conv1: nn.Module, bn1: nn.Module, activation: nn.Module, kernels: str = "triton",
                     conv_impl: str = "auto") -> FusedConvBlock3d:
        """A fused block around existing modules (shared, not copied)."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.conv1, block.bn1, block.activation = conv1, bn1, activation
        block.set_kernels(kernels, conv_impl)
        return block

    def set_kernels(self, kernels: str, conv_impl: str = "auto") -> None:
        self.kernels = check_kernels(kernels)
        self.conv_impl = _check_conv_impl(conv_impl)
        if kernels == "triton":
            conv_bn_stats_fn()  # resolved here, not on the first forward (which torch.compile may be tracing)

    def forward(self, x: Tensor) -> Tensor:
        return conv_norm_act(x, self.conv1, self.bn1, self.activation, self.kernels, self.conv_impl)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels!r}, conv_impl={self.conv_impl!r}"


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose Conv3d -> norm -> activation and norm -> activation runs are fused.

    The children stay as they are (same names, same state_dict); ``fused_groups`` maps the first child name of a
    run to the run's names, and ``forward`` calls the fused function for a run whose names still follow one
    another (a run broken by later edits of the container simply runs unfused). Made by :func:`fuse_model`.
    """

    def __init__(self, *args, groups: list[tuple[str, ...]] = (), kernels: str = "triton", conv_impl: str = "auto"):
        super().__init__(*args)
        self._set_groups(groups, kernels, conv_impl)

    def _set_groups(self, groups, kernels: str, conv_impl: str) -> None:
        self.fused_groups = {g[0]: tuple(g) for g in groups}
        self.kernels = check_kernels(kernels)
        self.conv_impl = _check_conv_impl(conv_impl)
        if kernels == "triton":
            conv_bn_stats_fn()

    @classmethod
    def convert(cls, seq: nn.Sequential, groups: list[tuple[str, ...]], kernels: str = "triton",
                conv_impl: str = "auto") -> FusedSequential:
        """Turn ``seq`` into a FusedSequential in place (its class changes; children, hooks and identity stay)."""
        check_kernels(kernels)
        _check_conv_impl(conv_impl)
        seq.__class__ = cls
        seq._set_groups(groups, kernels, conv_impl)
        return seq

    def forward(self, x: Tensor) -> Tensor:
        names = list(self._modules)
        i = 0
        while i < len(names):
            group = self.fused_groups.get(names[i])
            if group is not None and tuple(names[i:i + len(group)]) == group:
                mods = [self._modules[n] for n in group]
                if len(group) == 3:
                    x = conv_norm_act(x, *mods, kernels=self.kernels, conv_impl=self.conv_impl)
                else:
                    x = norm_act(x, *mods, kernels=self.kernels)
                i += len(group)
            else:
                x = self._modules[names[i]](x)
                i += 1
        return x

    def extra_repr(self) -> str:
        return f"kernels={self.kernels!r}, fused={[list(g) for g in self.fused_groups.values()]}"
