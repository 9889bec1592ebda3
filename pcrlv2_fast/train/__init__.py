"""Pretraining: configuration presets and the training loop."""

from .config import PretrainConfig
from .loop import Pretrainer, pretrain

__all__ = ["PretrainConfig", "Pretrainer", "pretrain"]
