"""Triton kernels of the fused ops, installed as ``pcrlv2_fast.kernels``; each has a plain-PyTorch reference
in ``pcrlv2_fast.reference``, tests under ``tests/kernels`` (Triton interpreter on CPU) and a GPU benchmark.

- ``bn_act3d``, ``gn_act3d``: ``norm_act.py``; reference ``reference/norm_act.py``; ``test_norm_act.py``;
  ``benchmarks/benchmark_kernels.py``.
- ``conv3d_bn_stats``: ``conv3d_block.py``; reference ``reference/conv3d_block.py``; ``test_conv3d_block.py``;
  ``benchmarks/benchmark_conv3d_block.py``.
- ``restoration_loss``: ``restoration_loss.py``; reference ``reference/fused_losses.py``; ``test_losses.py``;
  ``benchmarks/benchmark_kernels.py``.
- ``cosine_pair_loss``: ``cosine_loss.py``; reference ``reference/fused_losses.py``; ``test_losses.py``;
  ``benchmarks/benchmark_kernels.py``.

The modules import Triton; nothing here is imported by ``import pcrlv2_fast``. The modules using them are
``pcrlv2_fast.nn`` (fused blocks, ``fuse_model``), ``NonSkipUNet3D(kernels="triton")`` and
``PCRLv2Loss(kernels="triton")``; ``pcrlv2-fast selftest`` checks them all.
"""

import os


def interpreting() -> bool:
    """Whether Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``), read on each
    call. ``triton.jit`` reads the variable when a kernel is decorated, i.e. when its module is imported, so it
    must be set before the first kernel import (``tests/kernels/conftest.py`` and ``selftest`` do)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
