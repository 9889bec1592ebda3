"""pcrlv2_fast: fast, checkpoint-compatible PCRLv2 self-supervised pretraining for 3D CT/MR volumes."""

from ._version import __version__
from .checkpoint import CheckpointError, load_pretrained, save_checkpoint
from .models import NonSkipUNet3D

__all__ = ["CheckpointError", "NonSkipUNet3D", "__version__", "load_pretrained", "save_checkpoint"]
