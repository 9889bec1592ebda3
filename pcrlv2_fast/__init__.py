"""pcrlv2_fast: fast, checkpoint-compatible PCRLv2 self-supervised pretraining for 3D CT/MR volumes."""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, load_pretrained, save_checkpoint  # noqa: E402
from .models import NonSkipUNet3D  # noqa: E402

__all__ = ["CheckpointError", "NonSkipUNet3D", "__version__", "load_pretrained", "save_checkpoint"]
