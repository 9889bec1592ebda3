"""Networks: the PCRLv2 3D pretraining U-Net and the 2D one (ResNet-18 encoder), both without skip connections."""

from .classifier2d import Classifier2D
from .resnet import ResNet18Encoder
from .unet2d import NonSkipUNet2D
from .unet3d import LUConv, NonSkipUNet3D

__all__ = ["Classifier2D", "LUConv", "NonSkipUNet2D", "NonSkipUNet3D", "ResNet18Encoder"]
