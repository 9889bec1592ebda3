"""Fused forward of conv -> norm -> activation blocks, computed from the blocks' own (unchanged) modules.

The fused modules keep the ordinary ``nn.Conv3d`` / ``nn.BatchNorm3d`` / ``nn.GroupNorm`` / ``nn.InstanceNorm3d``
/ activation children, so parameter and buffer names (and checkpoints) stay exactly those of the unfused
network; only the forward changes:

- norm + activation: one ``bn_act3d`` / ``gn_act3d`` call (pcrlv2_fast.kernels.norm_act) with the module's
  parameters, buffers and BatchNorm bookkeeping (``num_batches_tracked``, cumulative momentum) reproduced;
- conv + BatchNorm with batch statistics: when ``pcrlv2_fast.kernels.conv3d_block.conv3d_bn_stats`` is
  available, the conv also returns the per-channel mean and biased variance of its output, so the
  normalisation skips its statistics pass over the conv output; otherwise the conv runs as ``F.conv3d``
  followed by the fused norm + activation.

``kernels="torch"`` is the plain path: ``act(norm(conv(x)))`` through the modules' own forwards.
"""

from __future__ import annotations

import importlib
import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .dispatch import check_kernels, log_once, triton_usable

logger = logging.getLogger("pcrlv2_fast.nn")

CONV_IMPLS = ("auto", "triton", "torch")
_UNRESOLVED = object()
_conv_bn_stats = _UNRESOLVED


# ------------------------------------------------------------------------------------------- descriptions
def is_sync_bn(norm: nn.Module) -> bool:
    """A batch norm synchronised over processes: torch's SyncBatchNorm, or one whose class says so with
    ``SYNCHRONISED = True`` (the gloo implementation of the training layer)."""
    return type(norm) is nn.SyncBatchNorm or bool(getattr(type(norm), "SYNCHRONISED", False))


def sync_group(norm: nn.Module):
    """The process group a synchronised batch norm reduces over in this call (training, several processes), else
    None (then it is plain batch norm)."""
    if not (is_sync_bn(norm) and norm.training and dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(norm, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def norm_kind(norm: nn.Module) -> str | None:
    """'bn', 'gn' or 'in' for a norm the kernels implement exactly, None otherwise.

    Exact types only: a subclass may change the forward. InstanceNorm3d with running statistics is left to torch
    (the GroupNorm kernel keeps no running statistics). A synchronised batch norm is 'bn': after a 3x3x3 conv its
    statistics are merged over the processes (see _sync_conv_bn); elsewhere it runs torch's module.
    """
    if type(norm) is nn.BatchNorm3d or is_sync_bn(norm):
        return "bn"
    if type(norm) is nn.GroupNorm:
        return "gn"
    if type(norm) is nn.InstanceNorm3d and not norm.track_running_stats:
        return "in"
    return None


def act_kind(act: nn.Module | None) -> str | None:
    """The kernels' activation name for an activation module ('none' for None / Identity), None if unsupported."""
    if act is None or type(act) is nn.Identity:
        return "none"
    if type(act) is nn.ReLU:
        return "relu"
    if type(act) is nn.ELU and float(act.alpha) == 1.0:
        return "elu"
    if type(act) is nn.PReLU:
        return "prelu"
    if type(act) is nn.Sigmoid:
        return "sigmoid"
    return None


def unsupported_reason(norm: nn.Module, act: nn.Module | None) -> str | None:
    """Why the pair (norm, act) cannot be fused, or None when it can."""
    if norm_kind(norm) is None:
        if type(norm) is nn.InstanceNorm3d:
            return "InstanceNorm3d with track_running_stats=True"
        return f"norm {type(norm).__name__} is not BatchNorm3d / GroupNorm / InstanceNorm3d"
    if act_kind(act) is None:
        if type(act) is nn.ELU:
            return f"ELU with alpha={act.alpha} (the kernel implements alpha=1)"
        return f"activation {type(act).__name__} is not ReLU / ELU / PReLU / Sigmoid"
    return None


def is_conv3x3(conv: nn.Module) -> bool:
    """A Conv3d that conv3d_bn_stats computes: 3x3x3, stride 1, padding 1, no dilation or groups, zero padding."""
    return (type(conv) is nn.Conv3d and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
            and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def conv_bn_stats_fn():
    """``conv3d_bn_stats`` from pcrlv2_fast.kernels.conv3d_block, or None when that module is not installed.

    Resolved once per process (logged); later calls are a global read, which torch.compile traces freely.
    """
    global _conv_bn_stats
    if _conv_bn_stats is _UNRESOLVED:
        name = "pcrlv2_fast.kernels.conv3d_block"
        try:
            _conv_bn_stats = importlib.import_module(name).conv3d_bn_stats
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            logger.info("%s is not available: fused conv blocks run F.conv3d before the fused norm", name)
            _conv_bn_stats = None
    return _conv_bn_stats


def conv_gives_stats(conv: nn.Module, norm: nn.Module) -> bool:
    """Whether the conv computes the BatchNorm's batch statistics in its epilogue (conv3d_bn_stats installed, a
    3x3x3 conv, a batch norm); with batch statistics the norm then skips its own statistics pass."""
    return conv_bn_stats_fn() is not None and norm_kind(norm) == "bn" and is_conv3x3(conv)


# ------------------------------------------------------------------------------------------------- kernels
def _norm_act_kernels():
    from ..kernels import norm_act

    return norm_act


def _bn_state(bn: nn.BatchNorm3d) -> tuple[bool, float, Tensor | None, Tensor | None]:
    """(batch statistics?, update factor, running_mean, running_var) exactly as nn.BatchNorm3d.forward decides,
    including its ``num_batches_tracked`` increment."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return batch_stats, factor, bn.running_mean if keep else None, bn.running_var if keep else None


def _prelu_weight(act: nn.Module | None) -> Tensor | None:
    return act.weight if type(act) is nn.PReLU else None


def _fused_norm_act(x: Tensor, norm: nn.Module, act: nn.Module | None) -> Tensor:
    ops = _norm_act_kernels()
    kind, a = norm_kind(norm), act_kind(act)
    if kind == "bn":
        batch_stats, factor, rm, rv = _bn_state(norm)
        return ops.bn_act3d(x, norm.weight, norm.bias, rm, rv, batch_stats, factor, norm.eps, a, _prelu_weight(act))
    groups = norm.num_groups if kind == "gn" else x.shape[1]
    return ops.gn_act3d(x, groups, norm.weight, norm.bias, norm.eps, a, _prelu_weight(act))


def _fusable(x: Tensor, norm: nn.Module, act: nn.Module | None) -> bool:
    """Whether the kernels implement this norm/activation on this input; logs (once per reason) when not, e.g.
    after a BatchNorm was swapped for SyncBatchNorm inside an already fused block."""
    reason = unsupported_reason(norm, act)
    if reason is None and x.dim() != 5:
        reason = f"{x.dim()}-D input (the kernels take (N, C, D, H, W))"
    if reason is not None:
        log_once(f"unsupported-{reason}", f"kernels='triton': {reason}; running the torch path")
    return reason is None


def _torch_norm_act(x: Tensor, norm: nn.Module, act: nn.Module | None) -> Tensor:
    x = norm(x)
    return x if act is None else act(x)


def _local_stats_only(norm: nn.Module) -> bool:
    """A synchronised batch norm in a multi-process training call without a conv to take its statistics from:
    torch's module runs it (logged once)."""
    if sync_group(norm) is None:
        return False
    log_once("sync-norm-act", "kernels='triton': a synchronised batch norm without a 3x3x3 conv before it runs "
             "torch's module")
    return True


def norm_act(x: Tensor, norm: nn.Module, act: nn.Module | None, kernels: str = "triton") -> Tensor:
    """``act(norm(x))`` for a 5-D x, fused into one kernel per direction with ``kernels="triton"``."""
    check_kernels(kernels)
    if (kernels == "triton" and _fusable(x, norm, act) and not _local_stats_only(norm)
            and triton_usable(x, "fused norm+activation")):
        return _fused_norm_act(x, norm, act)
    return _torch_norm_act(x, norm, act)


class _BnActFromStats(torch.autograd.Function):
    """Training BatchNorm + activation on a conv output whose batch statistics are already known.

    Forward: the fused normalise+activate pass with the given mean / biased variance (the kernel's "running
    statistics" input). Backward: the fused batch-statistics backward, so the gradient includes the terms through
    the mean and variance exactly as ``bn_act3d(training=True)`` computes them.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, prelu_weight, mean, var, eps: float, act: str):
        out, mean32, rstd, _, _ = torch.ops.pcrlv2.bn_act3d_fwd(y, weight, bias, mean, var, prelu_weight, False, 0.0,
                                                                eps, act)
        ctx.save_for_backward(y, weight, bias, prelu_weight, mean32, rstd)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx, dy):
        y, weight, bias, prelu_weight, mean, rstd = ctx.saved_tensors
        param_grads = any(ctx.needs_input_grad[1:4])
        dx, dw, db, da = torch.ops.pcrlv2.bn_act3d_bwd(dy, y, weight, bias, prelu_weight, mean, rstd, True, ctx.act,
                                                      param_grads)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw if weight is not None and need[1] else None,
                db if bias is not None and need[2] else None,
                da if prelu_weight is not None and ctx.act == "prelu" and need[3] else None, None, None, None, None)


def _merge_over_ranks(mean: Tensor, var: Tensor, n: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """The batch statistics of every process's batch: each process's (count, mean, biased variance) per channel
    gathered in one collective and merged by Chan's formula in float64 (no E[y^2] - E[y]^2 cancellation).
    Returns fp32 mean and variance and the total count (a device tensor: no host read)."""
    packed = torch.stack([torch.full_like(mean, float(n)), mean, var])  # (3, C)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    counts, means, variances = torch.stack(gathered).double().unbind(1)  # (world, C) each
    total = counts.sum(0)
    merged = (counts * means).sum(0) / total
    merged_var = (counts * (variances + (means - merged).square())).sum(0) / total
    return merged.float(), merged_var.float(), total[0]


class _SyncBnActFromStats(torch.autograd.Function):
    """_BnActFromStats for statistics merged over processes: the backward's per-channel sums of g and g*xhat are
    all-reduced (one collective) and divided by the total count for the input gradient, as SyncBatchNorm does;
    the weight and bias gradients come from this process's sums (data parallelism averages them)."""

    @staticmethod
    def forward(ctx, y, weight, bias, prelu_weight, mean, var, eps: float, act: str, count: Tensor, group):
        out, mean32, rstd, _, _ = torch.ops.pcrlv2.bn_act3d_fwd(y, weight, bias, mean, var, prelu_weight, False, 0.0,
                                                                eps, act)
        ctx.save_for_backward(y, weight, bias, prelu_weight, mean32, rstd, count)
        ctx.act, ctx.group = act, group
        return out

    @staticmethod
    def backward(ctx, dy):
        y, weight, bias, prelu_weight, mean, rstd, count = ctx.saved_tensors

        def all_reduce(t: Tensor) -> Tensor:
            dist.all_reduce(t, group=ctx.group)
            return t

        dx, dw, db, da = _norm_act_kernels().bn_act3d_backward_reduced(dy, y, weight, bias, prelu_weight, mean, rstd,
                                                                       ctx.act, all_reduce, count.float())
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw if weight is not None and need[1] else None,
                db if bias is not None and need[2] else None,
                da if prelu_weight is not None and ctx.act == "prelu" and need[3] else None,
                None, None, None, None, None, None)


def _conv_bn_from_stats(x: Tensor, conv: nn.Conv3d, bn: nn.BatchNorm3d, act: nn.Module | None, conv_impl: str,
                        stats_fn) -> Tensor:
    _norm_act_kernels()  # registers the pcrlv2::bn_act3d_* ops used by _BnActFromStats
    _, factor, rm, rv = _bn_state(bn)
    # conv3d_bn_stats casts to the autocast dtype itself, as F.conv3d does under autocast. Its mean and biased
    # variance are fp32 (per-tile M2 merged by Chan's formula: no E[y^2] - E[y]^2 cancellation); detached because
    # _BnActFromStats' backward already includes the terms through the batch statistics.
    y, mean, var = stats_fn(x, conv.weight, conv.bias, impl=conv_impl)
    n = y.numel() // y.shape[1]
    group = sync_group(bn)
    if n * (1 if group is None else dist.get_world_size(group)) < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input {tuple(y.shape)}")
    mean, var = mean.detach(), var.detach()
    if group is not None:
        mean, var, n = _merge_over_ranks(mean, var, n, group)
    if bn.training and rm is not None:
        with torch.no_grad():
            rm.copy_((1.0 - factor) * rm.float() + factor * mean)
            rv.copy_((1.0 - factor) * rv.float() + factor * var * (n / (n - 1)))
    if group is not None:
        return _SyncBnActFromStats.apply(y, bn.weight, bn.bias, _prelu_weight(act), mean, var, float(bn.eps),
                                         act_kind(act), n, group)
    return _BnActFromStats.apply(y, bn.weight, bn.bias, _prelu_weight(act), mean, var, float(bn.eps),
                                 act_kind(act))


def conv_norm_act(x: Tensor, conv: nn.Module, norm: nn.Module, act: nn.Module | None, kernels: str = "triton",
                  conv_impl: str = "auto") -> Tensor:
    """``act(norm(conv(x)))``; with ``kernels="triton"`` the norm + activation are fused, and a 3x3x3 conv feeding
    a BatchNorm that uses batch statistics also produces those statistics (conv3d_bn_stats, when available)."""
    check_kernels(kernels)
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if kernels != "triton" or not _fusable(x, norm, act) or not triton_usable(x, "fused conv block"):
        return _torch_norm_act(conv(x), norm, act)
    if conv_gives_stats(conv, norm) and (norm.training or norm.running_mean is None):
        return _conv_bn_from_stats(x, conv, norm, act, conv_impl, conv_bn_stats_fn())
    if _local_stats_only(norm):
        return _torch_norm_act(conv(x), norm, act)
    return _fused_norm_act(conv(x), norm, act)
