"""Multi-process training: the torchrun environment, the process group, rank-aware batches, cross-rank
reductions and batch-norm statistics over all ranks.

``torchrun --nproc_per_node=N -m pcrlv2_fast pretrain ...`` (or multi-node with ``--nnodes`` and the
``--rdzv-*`` options) starts one process per device; each finds its rank in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``) and joins a process group: NCCL on CUDA, gloo on the CPU.

Batches: ``batch_size`` is the global batch of one optimizer step. Its item indices (a pure function of
the seed, the epoch and the step) are split into ``world_size`` contiguous shards, one per rank, and each
shard into ``accumulate`` micro-batches. The union over ranks and micro-batches of one step is therefore
the batch a single process would draw, whatever the number of processes.

Batch norm: ``torch.nn.SyncBatchNorm`` runs on GPUs only; :class:`CpuSyncBatchNorm` gives the same
statistics over the batch of all ranks with gloo, so a 2-process CPU run computes what one process computes
on the whole batch.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CpuSyncBatchNorm", "DistInfo", "convert_sync_batchnorm", "init_distributed", "rank_micro_batches",
           "wrap_ddp"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run; the defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group, so it also destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launched_world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from the environment torchrun sets; (1, 0, 0) when it is not set."""
    return _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)


def process_device(device: torch.device, local_rank: int, world_size: int) -> torch.device:
    """The device of this process: with several processes on CUDA, the GPU of its local rank."""
    if device.type != "cuda" or world_size == 1:
        return device
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                         "start at most that many processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU), or use one already set up.
    Returns this process's place and its device (the GPU of its local rank when there are several processes)."""
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), owns_group=False)
        return info, process_device(device, info.local_rank, info.world_size)
    world, rank, local_rank = launched_world()
    if world == 1:
        return DistInfo(), device
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed; run a single process")
    device = process_device(device, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True), device


def destroy(info: DistInfo) -> None:
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_micro_batches(batch: Sequence[int], rank: int, world_size: int, accumulate: int) -> list[list[int]]:
    """This rank's micro-batches of one step's global batch: contiguous shard ``rank`` of ``world_size``,
    cut into ``accumulate`` equal micro-batches."""
    n = len(batch)
    if n % (world_size * accumulate):
        raise ValueError(f"a batch of {n} cannot be split into {world_size} ranks x {accumulate} micro-batches")
    shard = n // world_size
    mine = list(batch[rank * shard:(rank + 1) * shard])
    micro = shard // accumulate
    return [[int(i) for i in mine[m * micro:(m + 1) * micro]] for m in range(accumulate)]


# ------------------------------------------------------------------------------------------- reductions
def mean_across(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise mean of a small tensor over all ranks (the tensor itself for one process)."""
    if not info.enabled:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / info.world_size


def sum_across(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """``obj`` as rank 0 holds it, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool,
             sync_buffers: bool) -> nn.parallel.DistributedDataParallel:
    """``module`` under DistributedDataParallel; ``sync_buffers``: copy rank 0's buffers (batch-norm running
    statistics) to the other ranks before every forward (needless when batch norm is synchronised)."""
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (both keep the copy at construction).
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters, **{key: sync_buffers})


# ------------------------------------------------------------------------------------------- batch norm
class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its adjoint: every rank's loss depends on the sum, so each rank's input gradient is
    the sum over ranks of the gradients with respect to that sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


# Subclasses torch's private _BatchNorm, as nn.BatchNorm1d/3d and nn.SyncBatchNorm do: that base gives the
# parameters, buffers and state_dict handling (num_batches_tracked included) of every batch-norm layer, the plain
# forward used in eval and in one process, and the isinstance test by which the fused blocks and torch's own
# converters recognise batch norm. nn.SyncBatchNorm itself needs CUDA tensors. tests/train/test_distributed.py
# pins what this relies on, so a torch release that changes the base fails there.
class CpuSyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover the batch of every rank, for the gloo (CPU) backend.

    Parameter and buffer names equal ``BatchNorm1d/3d``'s, so state_dicts and checkpoints are unchanged. In
    training with more than one rank, each rank takes the count, mean and centred sum of squares of its own
    batch (two passes, at least fp32); one differentiable all-reduce gathers them and Chan's formula combines
    them into the mean and variance of the whole batch, so a layer costs one collective forward and one
    backward. Running statistics are updated as ``F.batch_norm`` updates them (unbiased variance). Otherwise
    it is plain batch norm.
    """

    # Read by pcrlv2_fast.nn (is_sync_bn): the fused conv blocks merge this norm's statistics over the processes.
    SYNCHRONISED = True

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        local_mean = xf.mean(dims)
        local_m2 = (xf - local_mean.view(shape)).square().sum(dims)
        # All-gather as a sum: each rank fills its own row of (world, [count, mean, m2], C), zeros elsewhere.
        rows = [xf.new_zeros(3, c) for _ in range(dist.get_world_size())]
        rows[dist.get_rank()] = torch.stack([local_mean.new_full((c,), x.numel() // c), local_mean, local_m2])
        counts, means, m2s = _SumOverRanks.apply(torch.stack(rows)).unbind(1)
        counts = counts.detach()
        n = counts.sum(0)
        if float(n[0]) < 2:
            raise ValueError(f"expected more than 1 value per channel over all ranks, got input {tuple(x.shape)}")
        mean = (counts * means).sum(0) / n
        var = (m2s + counts * (means - mean).square()).sum(0) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), factor)
        out = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def _to_cpu_sync(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_cpu_sync(child))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch-norm layer of ``module`` synchronised over ranks, with the same parameters and buffers:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` on the CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_cpu_sync(module)
