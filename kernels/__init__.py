"""Triton kernels, one module per fused op, installed as ``pcrlv2_fast.kernels``.

Each op's plain-PyTorch reference lives in ``pcrlv2_fast.reference`` under the same name.
"""
