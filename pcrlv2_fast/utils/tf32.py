"""TF32 for fp32 matmuls and convolutions on CUDA: the one place that sets torch's two process-wide flags."""

from __future__ import annotations

import contextlib

import torch


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for fp32 matmuls (cuBLAS) and convolutions (cuDNN) alike; the CPU ignores both flags."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def tf32_policy(enabled: bool):
    """:func:`set_tf32` for a block, the previous flags restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
