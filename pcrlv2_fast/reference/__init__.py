"""Plain-PyTorch references: the official PCRLv2 3D semantics and, per fused op, the unfused computation."""

from .pcrlv2_3d import ReferencePCRLv23d, reference_cos_loss, reference_step_loss

__all__ = ["ReferencePCRLv23d", "reference_cos_loss", "reference_step_loss"]
