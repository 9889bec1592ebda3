"""Pretraining: configuration presets and the training loop."""

from .config import PretrainConfig
from .loop import Pretrainer
from .loop2d import Pretrainer2D, pretrain

__all__ = ["PretrainConfig", "Pretrainer", "Pretrainer2D", "pretrain"]
