"""Plain-PyTorch references for :mod:`pcrlv2_fast.kernels.norm_act`: the normalisation then the activation,
as the unfused conv blocks compute them. Same signatures as the fused functions."""

import torch
import torch.nn.functional as F
from torch import Tensor


def activation(z: Tensor, act: str, prelu_weight: Tensor | None = None) -> Tensor:
    """ReLU, ELU(alpha=1), PReLU (one or C weights), sigmoid or identity ("none")."""
    if act == "none":
        return z
    if act == "relu":
        return F.relu(z)
    if act == "elu":
        return F.elu(z, alpha=1.0)
    if act == "prelu":
        return F.prelu(z, prelu_weight.to(z.dtype))
    if act == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {act!r}")


def bn_act3d(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
             running_var: Tensor | None, training: bool, momentum: float, eps: float, act: str,
             prelu_weight: Tensor | None = None) -> Tensor:
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return activation(z, act, prelu_weight)


def gn_act3d(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, act: str,
             prelu_weight: Tensor | None = None) -> Tensor:
    z = F.group_norm(x, num_groups, weight, bias, eps)
    return activation(z, act, prelu_weight)
