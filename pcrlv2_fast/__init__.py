"""pcrlv2_fast: fast, checkpoint-compatible PCRLv2 self-supervised pretraining for 3D CT/MR volumes (and the 2D
chest X-ray network)."""

from ._version import __version__
from .checkpoint import CheckpointError, load_pretrained, load_pretrained_2d, save_checkpoint
from .models import NonSkipUNet2D, NonSkipUNet3D

__all__ = ["CheckpointError", "NonSkipUNet2D", "NonSkipUNet3D", "__version__", "load_pretrained", "load_pretrained_2d",
           "save_checkpoint"]
