"""Which implementation a fused module or loss runs: the Triton kernels or the plain PyTorch path.

``kernels="triton"`` is an explicit choice; it runs the kernels on CUDA tensors, and on CPU tensors only under
the Triton interpreter (``TRITON_INTERPRET=1``, used by the tests). Anywhere else the plain PyTorch path runs
instead and the fallback is logged once per reason, never silently.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

KERNELS = ("torch", "triton")

logger = logging.getLogger("pcrlv2_fast.nn")
_logged: set[str] = set()
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return kernels


def _interpreting() -> bool:
    # Imported here, not at the top: ``import pcrlv2_fast`` loads nothing of the kernels package.
    from ..kernels import interpreting

    return interpreting()


def log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning(message)


def kernels_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels run on tensors of ``device``: CUDA, or the CPU under the interpreter, with Triton
    installed."""
    device = torch.device(device)
    return _HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))


def triton_usable(x: torch.Tensor, what: str) -> bool:
    """Whether the Triton kernels can take ``x``; logs the fallback to the torch path once when they cannot."""
    if x.is_cuda or (x.device.type == "cpu" and _interpreting()):
        if _HAS_TRITON:
            return True
        log_once("no-triton", f"{what}: kernels='triton' but Triton is not installed; running the torch path")
        return False
    log_once(f"device-{x.device.type}", f"{what}: kernels='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), "
             f"got {x.device.type}; running the torch path")
    return False
