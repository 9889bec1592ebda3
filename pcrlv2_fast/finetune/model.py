"""Build the fine-tuning network for a task and mode, and rebuild it from a checkpoint's description.

Modes:
- ``full``: every weight trains (``freeze_stages`` can still freeze the first encoder stages);
- ``frozen``: the encoder is frozen (BatchNorm in eval mode); segmentation trains the U-Net decoder,
  classification a one-hidden-layer head;
- ``linear``: the linear probe; segmentation trains one 1x1x1 convolution over the encoder's hypercolumn
  (:class:`~pcrlv2_fast.encoders.LinearProbeSeg3D`), classification a linear layer on the pooled features.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..checkpoint import CheckpointError
from ..encoders import ENCODER_STAGES, Classifier3D, LinearProbeSeg3D, PCRLv2Encoder3D, UNet3D

__all__ = ["MODES", "build_model", "model_from_arch"]

MODES = ("full", "frozen", "linear")
DEFAULT_WIDTH = 32


def build_model(
    task: str,
    mode: str,
    num_classes: int,
    in_channels: int,
    init: str = "random",
    width: int | None = None,
    norm: str | None = None,
    act: str | None = None,
    freeze_stages: int = 0,
    pool: str = "avg",
    dropout: float = 0.0,
    trusted: bool = False,
) -> tuple[nn.Module, dict]:
    """The network and its architecture record (what :func:`model_from_arch` needs to rebuild it).

    ``init`` is "random" or a PCRLv2 checkpoint whose encoder is loaded (width from the checkpoint; a different
    ``width`` is an error). ``norm``/``act`` default to the checkpoint's (bn/relu for random init). ``trusted``:
    see :func:`~pcrlv2_fast.checkpoint.read_checkpoint`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if init == "random":
        encoder = PCRLv2Encoder3D(in_channels, width or DEFAULT_WIDTH, norm or "bn", act or "relu")
    else:
        if not Path(init).is_file():
            raise CheckpointError(f"{init}: no such checkpoint file (pass a PCRLv2 checkpoint or 'random')")
        encoder = PCRLv2Encoder3D.from_checkpoint(init, in_channels=in_channels, norm=norm, act=act, trusted=trusted)
        if width is not None and width != encoder.width:
            raise CheckpointError(f"{init}: encoder width {encoder.width} differs from the requested width {width}; "
                                  "leave the width out to use the checkpoint's")
    hidden = 0
    if task == "seg":
        kind = "linear_seg" if mode == "linear" else "unet"
    elif task == "cls":
        kind = "classifier"
        hidden = encoder.out_channels[-1] if mode == "frozen" else 0
    else:
        raise ValueError(f"task must be 'seg' or 'cls', got {task!r}")
    arch = {
        "model": kind, "num_classes": num_classes, "in_channels": in_channels, "width": encoder.width,
        "norm": encoder.norm, "act": encoder.act, "pool": pool, "dropout": dropout, "hidden": hidden,
        "frozen_stages": len(ENCODER_STAGES) if mode in ("frozen", "linear") else freeze_stages,
    }
    return _assemble(arch, encoder), arch


def _assemble(arch: dict, encoder: PCRLv2Encoder3D) -> nn.Module:
    if arch["model"] == "unet":
        model = UNet3D(arch["num_classes"], encoder=encoder)
    elif arch["model"] == "linear_seg":
        model = LinearProbeSeg3D(arch["num_classes"], encoder)
    elif arch["model"] == "classifier":
        model = Classifier3D(arch["num_classes"], encoder=encoder, pool=arch["pool"], dropout=arch["dropout"],
                             hidden=arch["hidden"])
    else:
        raise ValueError(f"unknown model kind {arch['model']!r}")
    encoder.freeze(arch["frozen_stages"])
    return model


def model_from_arch(arch: dict) -> nn.Module:
    """A freshly initialised network with the architecture recorded by :func:`build_model`."""
    encoder = PCRLv2Encoder3D(arch["in_channels"], arch["width"], arch["norm"], arch["act"])
    return _assemble(arch, encoder)
