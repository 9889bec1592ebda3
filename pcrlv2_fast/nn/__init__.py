"""Fused building blocks: conv + norm + activation on the Triton kernels, with the unfused blocks' state_dict names.

- :class:`FusedConvBlock3d`: the model's conv block (``conv1``, ``bn1``, ``activation``), fused;
- :class:`FusedNormAct3d`: norm + activation only (``norm``, ``activation``);
- :func:`fuse_model`: converts an existing network in place (its conv blocks and the Conv3d -> norm -> activation
  runs of its ``nn.Sequential`` containers) and reports what it fused.

Every module takes ``kernels="triton" | "torch"``; "torch" is the plain PyTorch reference path.
"""

from .dispatch import KERNELS
from .functional import conv_norm_act, norm_act
from .fuse import FusedBlock, FuseReport, fuse_model, fused_block_counts
from .modules import FusedConvBlock3d, FusedNormAct3d, FusedSequential

__all__ = ["KERNELS", "FuseReport", "FusedBlock", "FusedConvBlock3d", "FusedNormAct3d", "FusedSequential",
           "conv_norm_act", "fuse_model", "fused_block_counts", "norm_act"]
