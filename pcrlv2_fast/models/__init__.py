"""Networks: the PCRLv2 3D pretraining U-Net (no skip connections)."""

from .unet3d import LUConv, NonSkipUNet3D

__all__ = ["LUConv", "NonSkipUNet3D"]
