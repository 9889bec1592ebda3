"""Plain-PyTorch reference for :mod:`pcrlv2_fast.kernels.conv3d_block`: F.conv3d, then the per-channel batch
mean and biased variance that the following BatchNorm needs, computed from y in fp32 by torch.var_mean. Same
signature as the fused function (without ``impl``); every output is differentiable through ordinary autograd."""

import torch
import torch.nn.functional as F
from torch import Tensor


def conv3d_bn_stats(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y = conv3d(x, weight, bias, padding=1) channels_last_3d in x's dtype; the mean and biased
    variance (divided by N*D*H*W) of y over (N, D, H, W), fp32, of y as rounded to x's dtype."""
    y = F.conv3d(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None, padding=1)
    y = y.contiguous(memory_format=torch.channels_last_3d)
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3, 4), correction=0)
    return y, mean, var
