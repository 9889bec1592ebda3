"""Kernel tests run the Triton kernels under the interpreter on CPU when no GPU is present.

triton.jit reads TRITON_INTERPRET when a kernel is decorated, so this must be set before any
``pcrlv2_fast.kernels`` module is imported: pytest imports this conftest before the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
