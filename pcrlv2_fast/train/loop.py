"""The pretraining loop: one process or a torchrun launch (DistributedDataParallel), CPU or GPU, AMP and
channels_last_3d, exact resume, a clean stop on SIGTERM/SIGINT.

Reproducibility: the sample drawn at position i of epoch e is a pure function of (seed, e, i) (see
``PretrainDataset``), the batch order of an epoch a pure function of (seed, e), and the scale draws of a
step a pure function of (seed, step). A run resumed from a checkpoint therefore continues exactly as an
uninterrupted run would.

Scale: ``batch_size`` is the global batch of a step. With N processes and ``accumulate`` K, each process
takes its contiguous N-th of the step's items and runs it as K micro-batches (see ``distributed.py``);
every micro-batch uses the step's scale draws and the gradients are averaged, so the step optimises the
loss of the same global batch as a single process would. With synchronised batch norm (``sync_bn``, on by
default for several processes) and K = 1 the numbers equal the single-process run up to rounding; with
K > 1 batch norm sees each micro-batch separately. A run may resume with another number of processes.

Precision: ``fp32`` (TF32 off), ``tf32`` (fp32 tensors, TF32 matmuls and convolutions on CUDA), ``bf16``
(autocast) or ``fp16`` (autocast and a gradient scaler). The objective is always computed in fp32.

One step function: :func:`pretrain_step` (views in, loss terms and skip decision out) is what the trainer,
the benchmarks and the profiler run. Skipped steps leave parameters, optimizer state and batch-norm running
statistics as they were. A step is skipped when its loss (over all processes) is not finite, its gradient is
not finite, the fp16 scaler finds an overflow, or, as in the official code, its loss exceeds
``skip_loss_above`` after epoch 10. After ``max_nonfinite`` steps in a row with a non-finite loss or gradient
the run saves and stops with ``NonFiniteLossError`` (checked at log points).

Overlap: batches are built ahead by a producer thread (``prefetch``, see prefetch.py) and copied to the GPU on a
side stream. The step leaves its results on the device: the skip decision is a device flag the fused optimizer
reads (``found_inf``), skip counts are device counters, and the loop reads loss terms, counters and the stop
agreement back every ``log_every`` steps only (10 by default on CUDA). With fp16's gradient scaler, an unfused
optimizer, or on the first step that creates optimizer state, one flag is read per step.

Stopping: SIGTERM or SIGINT lets the current step finish, saves a checkpoint and returns normally (the
command exits 0); a second signal interrupts at once. The processes of a torchrun launch agree at every log
point on whether any of them was signalled, so all stop after the same step (torchrun forwards SIGTERM to
them; it reports the signal itself with a non-zero exit). ``--resume auto`` continues from the newest
readable checkpoint.

CUDA graphs are not supported (``config.CUDA_GRAPHS_UNSUPPORTED`` says why): the random per-step scale choice
changes the kernels of every step.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import (
    LATEST,
    CheckpointError,
    check_state_dict,
    find_latest_checkpoint,
    read_training_checkpoint,
    save_rotating_checkpoint,
)
from ..data import (
    BatchLoader,
    CropConfig,
    PretrainDataset,
    ScanError,
    Volume,
    bank_bytes,
    cached_volumes,
    default_loader,
    gpu_cache_choice,
    is_cache,
    open_cache,
    resolve_loader,
)
from ..data.native import available as native_available
from ..losses import PCRLv2Loss
from ..losses.pcrlv2 import full_size
from ..models import NonSkipUNet3D
from ..nn import fused_block_counts
from ..utils.io import WriteError, atomic_write
from ..utils.lock import folder_lock
from . import distributed as D
from .config import PretrainConfig
from .prefetch import Prefetcher

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What a run writes into its folder (removed by --overwrite before a fresh start).
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "config.json", "restoration.png", "loss_curve.png")
RUN_GLOBS = ("checkpoint-*.pt", "events.out.tfevents.*")
TERMS = ("loss", "loss_global", "loss_local", "loss_restore", "loss_deep", "beta")
PERF_KEYS = ("samples_per_s", "data_wait_s", "step_s", "data_wait", "gpu_mem_gb")


class NonFiniteLossError(ValueError):
    """Too many steps in a row had a non-finite loss or gradient; the message says what was saved and what to try."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def lr_at_epoch(base_lr: float, epoch: int, total_epochs: int) -> float:
    """Official cosine schedule, stepped once per epoch, over the run's own epochs (0 .. total_epochs-1)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def step_rng(seed: int, step: int) -> random.Random:
    """The scale draws of one step; string seeding is stable across processes and Python versions."""
    return random.Random(f"pcrlv2-scales-{seed}-{step}")


def local_batch(locals_: torch.Tensor) -> torch.Tensor:
    """(B, V, 1, X, Y, Z) -> (V*B, 1, X, Y, Z), view-major as the official ``torch.cat(local_views)``."""
    b, v = locals_.shape[:2]
    return locals_.transpose(0, 1).reshape(v * b, *locals_.shape[2:])


def set_float32_precision(precision: str) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA: off for ``fp32``, on for ``tf32`` and for the fp32 parts of
    ``bf16``/``fp16`` runs. The CPU ignores both flags."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def optimizer_impl(name: str, device: torch.device) -> str:
    """``auto``: one fused kernel per update on CUDA, multi-tensor (foreach) ops on the CPU."""
    if name == "auto":
        return "fused" if device.type == "cuda" else "foreach"
    return name


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    impl = optimizer_impl(cfg.optim_impl, next(model.parameters()).device)
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              **kwargs)
        if cfg.momentum:
            prime_momentum(opt)
        return opt
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def prime_momentum(opt: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer up front. Fused SGD fails when a parameter gets its first
    gradient after others already have buffers (it expects all or none), and each PCRLv2 step leaves the heads of
    undrawn scales without a gradient, so a head can join late. With dampening 0 a zero buffer is exactly torch's
    first step (buffer = gradient), so the updates do not change."""
    for group in opt.param_groups:
        if group["dampening"] != 0:
            raise ValueError("momentum buffers can be primed only without dampening")
        for p in group["params"]:
            if opt.state[p].get("momentum_buffer") is None:  # a loaded checkpoint's buffers are kept
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def grad_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients together (inf or nan when one of them is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: multi-tensor norms
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))


def forward_objective(forward, loss_fn: PCRLv2Loss, x1, x2, gt, loc, epoch: float, rng: random.Random,
                      amp_dtype: torch.dtype | None = None):
    """The official three forward passes (x1, x2, all local views batched) and the objective.
    Returns (terms, restoration, masks)."""
    autocast = torch.autocast(x1.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        restoration, feats1, masks = forward(x1)
        _, feats2, _ = forward(x2)
        _, feats_local, _ = forward(loc, local=True)
    terms = loss_fn(restoration, masks, feats1, feats2, feats_local, gt, epoch, rng)
    return terms, restoration, masks


class StepModule(nn.Module):
    """One micro-batch's forward passes and objective as one module call.

    DistributedDataParallel then sees one forward per backward and, from the returned loss alone, finds the
    parameters that the step's random scale draws leave without a gradient (with ``find_unused_parameters``).
    Returns (loss, the detached terms [loss, global, local, restore, deep, beta], restoration, masks).
    """

    def __init__(self, model: nn.Module, loss_fn: PCRLv2Loss, forward=None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        # In a list: a torch.compile wrapper is not registered as a second copy of the model's parameters.
        self._forward = [forward if forward is not None else model]
        self.used_scales: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # (pair heads, deep heads) last read

    def forward(self, x1, x2, gt, loc, epoch: float, rng: random.Random, amp_dtype: torch.dtype | None):
        terms, restoration, masks = forward_objective(self._forward[0], self.loss_fn, x1, x2, gt, loc, epoch, rng,
                                                      amp_dtype)
        deep = range(len(self.model.up_blocks)) if terms.scale < 0 else (terms.scale,)
        self.used_scales = (terms.pair_scales, tuple(deep))
        total = terms.total
        stats = torch.stack([total.detach(), terms.global_.detach(), terms.local.detach(), terms.restore.detach(),
                             terms.deep.detach(), torch.full_like(total.detach(), terms.beta)]).float()
        return total, stats, restoration.detach(), [m.detach() for m in masks]

    def drop_unused_head_grads(self) -> None:
        """Eager autograd leaves the heads of the scales the loss did not read this step without a gradient, so the
        optimizer leaves them alone. A compiled forward (AOTAutograd) hands them zero gradients instead, which
        weight decay and momentum would still apply: set those back to None, as eager has them."""
        pair_scales, deep_scales = self.used_scales
        for i, up in enumerate(self.model.up_blocks):
            heads = ([up.bn, up.predictor_head] if i not in pair_scales else []) + (
                [up.deep_supervision_head] if i not in deep_scales else [])
            for head in heads:
                for p in head.parameters():
                    p.grad = None


# Why a step was skipped, by the code pretrain_step leaves on the device (0: not skipped).
SKIP_REASONS = (None, "nonfinite_loss", "loss_limit", "nonfinite_grad", "fp16_overflow")


@dataclass
class StepOutput:
    """One step's results, left on the device: reading ``terms``, ``skipped``, ``reason`` or ``grad_norm`` waits
    for the step to finish (the trainer reads them every ``log_every`` steps)."""

    stats: torch.Tensor  # (6,) fp32: TERMS averaged over the micro-batches and processes
    code: torch.Tensor  # () int64: index into SKIP_REASONS
    norm: torch.Tensor  # () fp32: the 2-norm of the (unscaled) gradients
    sample: dict = field(default_factory=dict)  # first sample's views and outputs (on the device), for pictures

    @property
    def terms(self) -> dict[str, float]:
        return dict(zip(TERMS, self.stats.tolist(), strict=True))

    @property
    def reason(self) -> str | None:
        return SKIP_REASONS[int(self.code)]

    @property
    def skipped(self) -> bool:
        return int(self.code) != 0

    @property
    def grad_norm(self) -> float:
        return float(self.norm)


def loss_skip_code(loss: torch.Tensor, epoch: float, loss_limit: float) -> torch.Tensor:
    """The skip code a step's (process-averaged) loss implies, on the device: 1 for a non-finite loss, 2 for
    (the official rule) a loss above ``loss_limit`` after epoch 10, else 0."""
    code = torch.where(torch.isfinite(loss), 0, 1)
    if epoch > 10:
        code = torch.where((code == 0) & (loss > loss_limit), 2, code)
    return code.long()


@dataclass
class StepEngine:
    """What one optimisation step needs besides its views. The trainer builds one (its module DDP-wrapped under
    torchrun); the benchmarks and the profiler build theirs with :meth:`build`, so all of them time and run the
    same :func:`pretrain_step`."""

    module: nn.Module  # a StepModule, or DistributedDataParallel around one
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list
    buffers: list
    amp_dtype: torch.dtype | None = None
    skip_loss_above: float = 1000.0
    dist: D.DistInfo = field(default_factory=D.DistInfo)

    @classmethod
    def build(cls, model: nn.Module, loss_fn: PCRLv2Loss, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None, forward=None,
              skip_loss_above: float = 1000.0) -> StepEngine:
        """A single-process engine; ``forward`` is the model's compiled wrapper, if any."""
        if scaler is None:
            scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=False)
        return cls(StepModule(model, loss_fn, forward), optimizer, scaler, list(model.parameters()),
                   list(model.buffers()), amp_dtype, skip_loss_above)

    @property
    def ddp(self):
        return self.module if isinstance(self.module, nn.parallel.DistributedDataParallel) else None

    @property
    def step_module(self) -> StepModule:
        return self.module.module if self.ddp is not None else self.module


def _same_draws(rng: random.Random) -> random.Random:
    """A copy of rng: every micro-batch of a step makes the step's scale draws."""
    copy = random.Random()
    copy.setstate(rng.getstate())
    return copy


def _device_skip(engine: StepEngine) -> bool:
    """Whether the update can be skipped on the device: a fused optimizer (it reads ``found_inf``) without a
    gradient scaler, and state already made for every parameter with a gradient (the fused SGD kernel leaves a
    momentum buffer it creates while skipping uninitialised)."""
    opt = engine.optimizer
    fused = all(group.get("fused") for group in opt.param_groups)
    return fused and not engine.scaler.is_enabled() and all(p in opt.state for p in engine.params if p.grad is not None)


def _update(engine: StepEngine, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale (fp16), measure the gradient norm, and take the optimizer step unless the step is to be skipped.
    Returns (norm, code) with code 3 (non-finite gradient) or 4 (fp16 overflow) added. The decision stays on the
    device where the optimizer allows it; otherwise (CPU, an unfused optimizer, fp16's scaler) one flag is read."""
    opt, scaler = engine.optimizer, engine.scaler
    scaler.unscale_(opt)
    norm = grad_norm(engine.params).float().to(code.device)
    if scaler.is_enabled():
        # The scaler finds the overflow itself (and lowers its scale); it reads its flag on the host.
        if int(code) == 0:
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale:
                code = torch.full_like(code, 4)
        return norm, code
    code = torch.where((code == 0) & ~torch.isfinite(norm), 3, code)
    if _device_skip(engine):
        opt.found_inf, opt.grad_scale = (code != 0).float(), None
        try:
            opt.step()
        finally:
            del opt.found_inf, opt.grad_scale
    elif int(code) == 0:
        opt.step()
    return norm, code


def pretrain_step(engine: StepEngine, micro: list[tuple], epoch: float, rng: random.Random) -> StepOutput:
    """One optimizer step over ``micro``, a list of (x1, x2, gt, loc) view tuples on the device (``accumulate``
    micro-batches of this process; loc batched view-major), with the scale draws of ``rng``.

    Gradients are averaged over micro-batches and (DDP) over ranks. A step with a non-finite loss, a loss above
    the official limit after epoch 10, a non-finite gradient or an fp16 overflow is skipped: parameters,
    optimizer state and batch-norm running statistics stay as they were. Nothing is read back to the host here
    on CUDA with the default fused optimizer in fp32/tf32/bf16: the results stay on the device (StepOutput)."""
    k, ddp = len(micro), engine.ddp
    saved_buffers = [b.detach().clone() for b in engine.buffers]
    engine.optimizer.zero_grad(set_to_none=True)
    stats_sum, sample = None, {}
    for m, (x1, x2, gt, loc) in enumerate(micro):
        # Gradients are averaged over ranks once, in the backward of the last micro-batch.
        with nullcontext() if ddp is None or m == k - 1 else ddp.no_sync():
            total, stats, restoration, masks = engine.module(x1, x2, gt, loc, epoch, _same_draws(rng),
                                                             engine.amp_dtype)
            stats = D.mean_across(stats, engine.dist)
            stats_sum = stats if stats_sum is None else stats_sum + stats
            if m == 0:
                # Views of the first sample (no copies, no kernels): only the last step's are drawn.
                sample = {"x1": x1[0], "gt": gt[0], "restoration": restoration[0], "masks": [t[:1] for t in masks]}
            engine.scaler.scale(total / k if k > 1 else total).backward()
    engine.step_module.drop_unused_head_grads()
    stats = stats_sum / k
    norm, code = _update(engine, loss_skip_code(stats[0], epoch, engine.skip_loss_above))
    with torch.no_grad():
        skipped = code != 0
        for b, saved in zip(engine.buffers, saved_buffers):
            b.copy_(torch.where(skipped, saved, b))
    return StepOutput(stats, code, norm, sample)


class SkipCounters:
    """Skipped steps by reason and the current run of steps with a non-finite loss or gradient, counted on the
    device from each step's skip code; ``read()`` brings them to the host (at log points and checkpoints)."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(len(SKIP_REASONS), dtype=torch.long, device=device)
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self._one = torch.ones(1, dtype=torch.long, device=device)

    def add(self, code: torch.Tensor) -> None:
        code = code.to(self.counts.device)
        self.counts.index_add_(0, code.view(1), self._one)
        nonfinite = (code == 1) | (code == 3)
        # A non-finite step extends the run, a step that trained ends it, other skips leave it as it is.
        self.streak = torch.where(nonfinite, self.streak + 1, torch.where(code == 0, 0, self.streak))

    def load(self, skip_counts: dict, streak: int) -> None:
        for reason, n in skip_counts.items():
            self.counts[SKIP_REASONS.index(reason)] = int(n)
        self.streak.fill_(int(streak))

    def read(self) -> tuple[int, dict[str, int], int]:
        """(skipped steps, {reason: count}, streak)."""
        values = torch.cat([self.counts, self.streak.view(1)]).tolist()
        counts = {reason: n for reason, n in zip(SKIP_REASONS[1:], values[1:-1], strict=True) if n}
        return sum(counts.values()), counts, values[-1]


class _Window:
    """Host-side timing of the steps since the last log point."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0


class Pretrainer:
    """Builds data, model, objective and optimizer from a ``PretrainConfig`` and runs the loop.

    Under torchrun every process builds one; rank 0 alone writes checkpoints, metrics, event files, pictures
    and the summary. ``close()`` (called by :func:`pretrain`) leaves the process group it joined.
    """

    def __init__(self, cfg: PretrainConfig, volumes: list[Volume] | None = None):
        self.cfg = cfg.validate()
        self.out = Path(cfg.out)
        self.ddp = self.engine = None
        self.dist, self.device = D.init_distributed(resolve_device(cfg.device))
        if self.device.type == "cuda" and self.device.index is not None:
            # --device cuda:N in one process: libraries that use the current device (cuDNN handles, Triton
            # launches outside a guard) then use the run's GPU too.
            torch.cuda.set_device(self.device)
        try:
            self._build(volumes)
        except BaseException:
            self.close()
            raise

    def _build(self, volumes: list[Volume] | None) -> None:
        cfg, world = self.cfg, self.dist.world_size
        if cfg.batch_size % (world * cfg.accumulate):
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of processes x "
                             f"--accumulate = {world} x {cfg.accumulate}")
        self.micro_batch = cfg.batch_size // (world * cfg.accumulate)
        self.sync_bn = world > 1 and (cfg.sync_bn if cfg.sync_bn is not None else True)
        bn_rows = self.micro_batch * (world if self.sync_bn else 1)
        if bn_rows < 2:
            fixes = "raise --batch-size or lower --accumulate" + (" or use --sync-bn" if world > 1 else "")
            raise ValueError(
                f"each batch-norm batch would hold {bn_rows} sample (--batch-size {cfg.batch_size} over {world} "
                f"process(es) x {cfg.accumulate} micro-batch(es)); the projection BatchNorm1d layers need 2: {fixes}")
        if volumes is None:
            volumes = self._load_volumes()
        self.dataset = PretrainDataset(volumes, CropConfig(), seed=cfg.seed, pairs_per_volume=cfg.pairs_per_volume)
        # "dataset": per-sample items through a DataLoader (cfg.workers processes); "torch" / "native": whole
        # batches cut and augmented in one pass (same samples, see data/loader.py).
        self.loader = resolve_loader(default_loader() if cfg.loader == "auto" else cfg.loader)
        if self.loader == "torch" and self.device.type == "cuda":
            self.loader = self._fit_gpu_cache(volumes)
        if self.loader == "dali":
            from ..data.dali import DaliLoader

            self.batch_loader = DaliLoader(self.dataset, self.device, batch_size=self.micro_batch)
        else:
            self.batch_loader = None if self.loader == "dataset" else BatchLoader(
                self.dataset, self.loader, self.device if self.loader == "torch" else "cpu",
                num_threads=cfg.loader_threads, pin_memory=self.device.type == "cuda" and self.loader == "native")
        self.steps_per_epoch = len(self.dataset) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has only {len(self.dataset)} samples ({len(volumes)} scans x {cfg.pairs_per_volume} pairs) "
                f"but --batch-size is {cfg.batch_size}; lower --batch-size or raise --pairs-per-volume"
            )
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        set_float32_precision(cfg.precision)
        torch.manual_seed(cfg.seed)
        # Fused kernels: the loss reads the low-resolution deep-supervision masks directly.
        model = NonSkipUNet3D(width=cfg.width, norm=cfg.norm, act=cfg.act, kernels=cfg.kernels,
                              upsample_masks=cfg.kernels == "torch")
        if self.sync_bn:
            model = D.convert_sync_batchnorm(model, self.device)
        # Counted after the SyncBatchNorm conversion: what the run's blocks will really execute.
        self.fused_blocks = fused_block_counts(model, self.device)
        self.memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
        self.model = model.to(self.device).to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(cfg, self.model)
        self.optim_impl = optimizer_impl(cfg.optim_impl, self.device)
        self.amp_dtype = AMP_DTYPES.get(cfg.precision)
        self.loss_fn = PCRLv2Loss(total_epochs=self.total_epochs, n_local=self.dataset.crop.n_local,
                                  all_scales=cfg.all_scales, kernels=cfg.kernels)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.step_module = StepModule(self.model, self.loss_fn, self.forward)
        if self.dist.enabled:
            # Random scales leave some heads without a gradient in a step (the same ones on every rank); with
            # all_scales every parameter is used. Synchronised batch norm keeps the buffers equal on all ranks.
            self.ddp = D.wrap_ddp(self.step_module, self.device, find_unused_parameters=not cfg.all_scales,
                                  sync_buffers=not self.sync_bn)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.engine = StepEngine(self.ddp or self.step_module, self.optimizer, scaler,
                                 list(self.model.parameters()), list(self.model.buffers()), self.amp_dtype,
                                 cfg.skip_loss_above, self.dist)
        self.step = 0
        self._epoch = 0
        self.counters = SkipCounters(self.device)
        self.stop_signal: str | None = None
        self.resumed_from: Path | None = None
        self.skipped_checkpoints: list[Path] = []
        self._saved_step: int | None = None

    def _fit_gpu_cache(self, volumes: list[Volume]) -> str:
        """The torch loader keeps every volume on the GPU: only within --gpu-cache-gb (default a quarter of the
        free memory); above it the native loader. The choice is printed."""
        cfg = self.cfg
        budget = (cfg.gpu_cache_gb * 2**30 if cfg.gpu_cache_gb is not None
                  else torch.cuda.mem_get_info(self.device)[0] / 4)
        loader, message = gpu_cache_choice(bank_bytes(volumes), budget, native_available())
        if self.dist.is_main:
            print(message, file=sys.stderr)
        return loader

    def _load_volumes(self) -> list[Volume]:
        """Raw scans are preprocessed into OUT/cache first (resumable); with several processes rank 0 does it and
        the others open the finished cache. A cache given as --data is memory-mapped as it is."""
        cfg = self.cfg
        s = cfg.spacing
        kwargs = dict(spacing=(s, s, s), modality=cfg.modality, workers=max(1, cfg.workers))
        if not self.dist.enabled or is_cache(cfg.data):
            return cached_volumes(cfg.data, self.out / "cache", **kwargs)
        payload, volumes = None, None
        if self.dist.is_main:
            try:
                volumes = cached_volumes(cfg.data, self.out / "cache", **kwargs)
                payload = ("ok", [v.name for v in volumes])
            except Exception as exc:
                D.broadcast_object(("error", f"{type(exc).__name__}: {exc}"), self.dist)
                raise
        payload = D.broadcast_object(payload, self.dist)
        if self.dist.is_main:
            return volumes
        if payload[0] == "error":
            raise ScanError(f"rank 0 could not prepare the data: {payload[1]}")
        return open_cache(self.out / "cache", names=payload[1])

    def close(self) -> None:
        """Leave the process group this trainer joined (the DDP wrapper goes first: it holds the group)."""
        self.ddp = self.engine = None
        D.destroy(self.dist)

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The gradient scaler the step uses (disabled unless --precision fp16); the engine owns it."""
        return self.engine.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.engine.scaler = scaler

    # ----------------------------------------------------------------------------------------- state
    def resolved(self) -> dict:
        """What the configuration turned into on this launch."""
        return {
            "device": str(self.device), "world_size": self.dist.world_size, "micro_batch": self.micro_batch,
            "accumulate": self.cfg.accumulate, "sync_bn": self.sync_bn, "optim_impl": self.optim_impl,
            "loader": self.loader, "prefetch": self.prefetch, "log_every": self.log_every,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "total_epochs": self.total_epochs, "torch": torch.__version__,
        }

    def state(self) -> dict:
        skipped, counts, streak = self.counters.read()
        return {
            "skipped": skipped,
            "skip_counts": counts,
            "nonfinite_streak": streak,
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
            "resolved": self.resolved(),
            "pcrlv2_fast_version": __version__,
            "arch": {"width": self.cfg.width, "norm": self.cfg.norm, "act": self.cfg.act},
        }

    def save(self) -> Path:
        """Checkpoint the current step (rank 0; once per step), keeping ``keep_checkpoints`` older ones."""
        latest = self.out / LATEST
        if not self.dist.is_main or self._saved_step == self.step:
            return latest
        try:
            save_rotating_checkpoint(self.out, self.step, self.model, self.optimizer,
                                     epoch=self.step // self.steps_per_epoch, keep=self.cfg.keep_checkpoints,
                                     **self.state())
        except WriteError as error:
            kept = f"; the checkpoints saved before ({latest}, numbered files) are intact" if latest.exists() else ""
            raise WriteError(error.errno, f"{error}{kept}; continue with --resume auto") from error
        self._saved_step = self.step
        return latest

    def resume(self, path: str | Path) -> None:
        self._load(read_training_checkpoint(path, trusted=self.cfg.trust_checkpoint), path)

    def _load(self, ckpt: dict, path: str | Path) -> None:
        check_state_dict(self.model, ckpt["state_dict"], path)
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if isinstance(self.optimizer, torch.optim.SGD) and self.cfg.momentum:
            prime_momentum(self.optimizer)  # checkpoints of runs without primed buffers
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.counters.load(dict(ckpt.get("skip_counts", {})), int(ckpt.get("nonfinite_streak", 0)))
        self._saved_step = self.step
        # Settings that change the samples, the schedule or the objective make the continuation another run.
        saved = {**(ckpt.get("config") or {}), **(ckpt.get("resolved") or {})}
        now = {**self.cfg.to_dict(), **self.resolved()}
        changed = [k for k in ("seed", "batch_size", "pairs_per_volume", "total_steps", "lr", "optimizer", "all_scales")
                   if k in saved and saved[k] != now[k]]
        if changed and self.dist.is_main:
            print(f"warning: {path} was saved with other settings ({', '.join(f'{k}={saved[k]!r}' for k in changed)});"
                  " the continuation will differ from an uninterrupted run", file=sys.stderr)
        if self.dist.is_main:
            self._truncate_metrics(self.step)

    def _resume_for_run(self) -> Path | None:
        """Load the checkpoint --resume names (``auto``: the newest readable one in the run folder, if any)."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        if cfg.resume == "auto":
            found = find_latest_checkpoint(self.out, on_skip=self._skip_checkpoint, trusted=cfg.trust_checkpoint)
            if found is None:
                if self.skipped_checkpoints:
                    raise CheckpointError(f"{self.out}: no checkpoint there is readable "
                                          f"({', '.join(p.name for p in self.skipped_checkpoints)}); pass --overwrite "
                                          "to start again")
                return None
            path, ckpt = found
        else:
            path = Path(cfg.resume)
            ckpt = read_training_checkpoint(path, trusted=cfg.trust_checkpoint)
        self._load(ckpt, path)
        steps = D.gather_objects(self.step, self.dist)
        if len(set(steps)) > 1:
            raise CheckpointError(f"the processes resumed at different steps {steps}: every process must read the same "
                                  "--out folder (a shared file system)")
        self.resumed_from = Path(path)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")
        return self.resumed_from

    def _skip_checkpoint(self, path: Path, error: CheckpointError) -> None:
        self.skipped_checkpoints.append(path)
        if self.dist.is_main:
            print(f"warning: skipping an unreadable checkpoint: {error}", file=sys.stderr)

    def _claim_run_folder(self, force: bool) -> None:
        """A fresh run never mixes its metrics or checkpoints with an earlier run's in the same folder."""
        previous = [self.out / name for name in RUN_FILES if (self.out / name).exists()]
        previous += [p for pattern in RUN_GLOBS for p in sorted(self.out.glob(pattern))]
        if not previous:
            return
        if not force:
            raise ValueError(
                f"{self.out} already holds a run ({', '.join(p.name for p in previous)}); pass --resume auto to "
                "continue it, --overwrite to start again, or choose another --out"
            )
        for path in previous:
            path.unlink()

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after the checkpoint we resume from (they will be produced again), and a last
        line cut short by a killed run."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------------------------------ step
    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def train_step(self, batch: dict | list[dict], epoch: int) -> StepOutput:
        """One optimizer step on this process's micro-batches (a batch dict, or a list of ``accumulate`` of them;
        dicts from :meth:`device_batch` are used as they are)."""
        micro = [self.device_batch(mb) for mb in (batch if isinstance(batch, list) else [batch])]
        views = [(mb["x1"], mb["x2"], mb["gt"], mb["loc"]) for mb in micro]
        return pretrain_step(self.engine, views, epoch, step_rng(self.cfg.seed, self.step))

    # ------------------------------------------------------------------------------------------- run
    def batch_indices(self, epoch: int, start: int) -> list[list[int]]:
        """This process's micro-batches (item indices) for steps ``start ..`` of ``epoch``, in order."""
        order = epoch_order(self.cfg.seed, epoch, len(self.dataset))
        bs = self.cfg.batch_size
        # Incomplete last batches are dropped: the projection BatchNorm1d layers fail on a batch of one.
        out = []
        for i in range(start, self.steps_per_epoch):
            out += D.rank_micro_batches(order[i * bs:(i + 1) * bs].tolist(), self.dist.rank, self.dist.world_size,
                                        self.cfg.accumulate)
        return out

    def batches(self, epoch: int, start: int):
        """This process's micro-batches for steps ``start ..`` of ``epoch`` (``accumulate`` per step)."""
        batch_indices = self.batch_indices(epoch, start)
        self.dataset.set_epoch(epoch)
        if self.batch_loader is not None:
            return self.batch_loader.batches(batch_indices)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_indices, num_workers=self.cfg.workers,
                                           pin_memory=self.device.type == "cuda")

    def run(self) -> dict:
        """Train to the end (or a stop signal) and return the summary. The main process holds the run folder's lock
        throughout: a second run pointed at the same --out is refused while this one runs."""
        if not self.dist.is_main:
            return self._run()
        with folder_lock(self.out, "pretrain", hint="wait for it to end, or choose another --out"):
            return self._run()

    def _run(self) -> dict:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            for tmp in self.out.glob(".*.tmp"):  # left by a save that a SIGKILL or power loss interrupted
                tmp.unlink(missing_ok=True)
        D.barrier(self.dist)
        resumed = self._resume_for_run() is not None
        if not resumed and main:
            # --resume auto without a checkpoint (a run killed before its first save) starts again.
            self._claim_run_folder(force=cfg.overwrite or cfg.resume == "auto")
        D.barrier(self.dist)
        if main:
            with atomic_write(self.out / "config.json", "w") as f:
                json.dump({**cfg.to_dict(), "resolved": self.resolved()}, f, indent=2)
        self.model.train()
        if main:
            print(f"fused blocks: conv {self.fused_blocks['conv']}, norm+act {self.fused_blocks['norm_act']} "
                  f"(--kernels {cfg.kernels}, {self.dist.world_size} process(es), {self.device})", file=sys.stderr)
        rates, last = [], None
        writer = self._open_tensorboard(resumed) if main else None
        metrics = open(self.out / "metrics.jsonl", "a") if main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not main)
        handlers = self._catch_stop_signals()
        try:
            last = self._loop(rates, metrics, writer, bar)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            bar.close()
            if metrics is not None:
                metrics.close()
            if writer is not None:
                writer.close()
        return self.finish(rates, last)

    def _micro_batches(self):
        """(epoch, micro-batch) for this process, from the current step to the end of the run, epoch after epoch."""
        step = self.step
        while step < self.total_steps:
            epoch, start = divmod(step, self.steps_per_epoch)
            for batch in self.batches(epoch, start):
                yield epoch, batch
            step = (epoch + 1) * self.steps_per_epoch

    def device_batch(self, batch: dict) -> dict:
        """x1, x2, gt and loc (the local views batched view-major) of a batch on the device, in the model's memory
        format: what a step reads (made by the prefetching thread, ahead of the step)."""
        out = {key: self.to_device(batch[key]) for key in ("x1", "x2", "gt")}
        # The pinned host batch is copied as it is; the view-major reordering runs on the device.
        loc = batch["loc"] if "loc" in batch else local_batch(batch["locals"].to(self.device, non_blocking=True))
        out["loc"] = self.to_device(loc)
        return out

    def _loop(self, rates: list[float], metrics, writer, bar) -> StepOutput | None:
        cfg, last = self.cfg, None
        feed = Prefetcher(self._micro_batches(), self.device_batch, self.device, depth=self.prefetch)
        window = _Window()
        try:
            while self.step < self.total_steps:
                last = self._one_step(feed, window)
                stop = self._at_log_point(last, window, rates, metrics, writer, bar)
                bar.update(1)
                if self.step % self.steps_per_epoch == 0 or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save()
                if stop:
                    self.stop_signal = self.stop_signal or "a signal to another process"
                    path = self.save()
                    if self.dist.is_main:
                        print(f"\nstopped by {self.stop_signal} after step {self.step}; saved {path} "
                              "(continue with --resume auto)", file=sys.stderr)
                    break
        finally:
            feed.close()
        self.save()
        return last

    def _one_step(self, feed: Prefetcher, window: _Window) -> StepOutput:
        """Take one step's micro-batches from the feed and run the step (nothing is read back from the device)."""
        cfg = self.cfg
        micro = []
        for _ in range(cfg.accumulate):
            epoch, batch, waited = next(feed)
            micro.append(batch)
            window.wait += waited
        self._epoch = epoch
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at_epoch(cfg.lr, epoch, self.total_epochs)
        last = self.train_step(micro, epoch)
        self.step += 1
        window.steps += 1
        self.counters.add(last.code)
        return last

    def _at_log_point(self, last: StepOutput, window: _Window, rates: list[float], metrics, writer, bar) -> bool:
        """Every ``log_every`` steps (and at the end): read the step's results and the skip counters back from the
        device, agree with the other processes on stopping, write the metrics row and check the non-finite
        streak. Returns whether to stop. Between log points a single process still stops on its own signal."""
        cfg = self.cfg
        if not (self.step % self.log_every == 0 or self.step == self.total_steps):
            return not self.dist.enabled and self.stop_signal is not None
        values = torch.cat([last.stats.float(), last.norm.view(1).float(), last.code.view(1).float()]).tolist()
        terms, norm, code = dict(zip(TERMS, values[:len(TERMS)], strict=True)), values[-2], int(values[-1])
        skipped, _, streak = self.counters.read()
        stop, wait = self._agree(window.wait)
        elapsed = time.perf_counter() - window.start
        rate = cfg.batch_size * window.steps / elapsed
        rates.append(rate)
        row = {"step": self.step, "epoch": self._epoch, **terms, "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": norm, "samples_per_s": rate, "data_wait_s": wait / window.steps,
               "step_s": elapsed / window.steps, "data_wait": min(1.0, wait / elapsed), "skipped": code != 0,
               "skip_reason": SKIP_REASONS[code], "skipped_total": skipped, "window_steps": window.steps}
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._log(row, metrics, writer)
        bar.set_postfix(loss=f"{row['loss']:.3f}", glob=f"{row['loss_global']:.3f}",
                        loc=f"{row['loss_local']:.3f}", rest=f"{row['loss_restore']:.4f}", sps=f"{rate:.2f}")
        window.reset()
        self._check_nonfinite_streak(streak)
        return stop

    @property
    def prefetch(self) -> int:
        """--prefetch, or by default 2 on CUDA and 0 on the CPU: on 2 CPU cores the producer slowed the demo's steps
        (4.45 -> 3.80 samples/s) more than overlapping a few milliseconds of batch building gained."""
        if self.cfg.prefetch is not None:
            return self.cfg.prefetch
        return 2 if self.device.type == "cuda" else 0

    @property
    def log_every(self) -> int:
        """--log-every, or by default every step on the CPU and every 10 steps on CUDA (each read waits for the GPU)."""
        if self.cfg.log_every is not None:
            return self.cfg.log_every
        return 10 if self.device.type == "cuda" else 1

    # Skip statistics, read from the device counters (each read waits for the device).
    @property
    def skipped(self) -> int:
        return self.counters.read()[0]

    @property
    def skip_counts(self) -> dict[str, int]:
        return self.counters.read()[1]

    @property
    def nonfinite_streak(self) -> int:
        return self.counters.read()[2]

    def _check_nonfinite_streak(self, streak: int) -> None:
        cfg = self.cfg
        if cfg.max_nonfinite and streak >= cfg.max_nonfinite:
            path = self.save()
            raise NonFiniteLossError(
                f"{streak} steps in a row (steps {self.step - streak + 1}-"
                f"{self.step}) had a non-finite loss or gradient, so the run stopped (--max-nonfinite "
                f"{cfg.max_nonfinite}); step {self.step} is saved in {path}. Lower --lr, use --precision bf16 "
                "instead of fp16, or check the scans; --resume auto continues after these steps")

    def _agree(self, data_s: float) -> tuple[bool, float]:
        """(stop, data_s): whether any process was asked to stop, and the data wait (seconds) averaged over
        processes, in one reduction so that every process leaves the loop after the same step."""
        values = torch.tensor([float(self.stop_signal is not None), data_s], dtype=torch.float64, device=self.device)
        values = D.sum_across(values, self.dist).tolist()
        return values[0] > 0, values[1] / self.dist.world_size

    def _log(self, row: dict, metrics, writer) -> None:
        if metrics is not None:
            try:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            except OSError as error:
                raise WriteError(error.errno, f"{metrics.name}: could not be written ({error.strerror}); the rows of "
                                 "earlier steps are intact (a row cut short is dropped on resuming). Free space and "
                                 "continue with --resume auto") from error
        if writer is not None:
            for key, value in row.items():
                if key in ("step", "epoch", "skipped") or not isinstance(value, int | float):
                    continue
                group = "loss" if key.startswith("loss") and key != "loss_scale" else (
                    "perf" if key in PERF_KEYS else "train")
                writer.add_scalar(f"{group}/{key}", value, row["step"])

    def _open_tensorboard(self, resumed: bool):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            print(f"note: no TensorBoard event files ({exc}); pip install tensorboard to get them", file=sys.stderr)
            return None
        # A resumed run drops the events an interrupted run logged after its checkpoint.
        writer = SummaryWriter(log_dir=str(self.out), purge_step=self.step + 1 if resumed else None, flush_secs=30)
        writer.add_text("config", "```\n" + json.dumps({**self.cfg.to_dict(), "resolved": self.resolved()},
                                                       indent=2) + "\n```", self.step)
        return writer

    def _catch_stop_signals(self) -> dict:
        """SIGTERM / SIGINT set a flag that ends the loop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_stop_signal)
        return previous

    def _on_stop_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        if self.dist.is_main:
            print(f"\n{self.stop_signal}: finishing step {self.step + 1}, then saving a checkpoint (send it again to "
                  "stop at once)", file=sys.stderr)

    def _pictures(self, last: StepOutput) -> dict[str, str]:
        """restoration.png and loss_curve.png ({name: path}); without matplotlib a one-line notice and none."""
        try:
            from ..viz import save_loss_curve_png, save_restoration_png
        except ImportError as exc:
            print(f"note: no pictures ({exc}); pip install matplotlib to get them", file=sys.stderr)
            return {}
        s = {k: _cpu(v) for k, v in last.sample.items()}
        s["masks"] = [full_size(m, s["gt"].shape[1:])[0] for m in s["masks"]]
        save_restoration_png(self.out / "restoration.png", s["x1"], s["gt"], s["restoration"], s["masks"],
                             title=f"step {self.step}")
        save_loss_curve_png(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        return {"restoration": str(self.out / "restoration.png"), "loss_curve": str(self.out / "loss_curve.png")}

    def finish(self, rates: list[float], last: StepOutput | None) -> dict:
        skipped, counts, _ = self.counters.read()
        # Throughput excludes the first steps (allocator and compile warm-up) when there are enough of them.
        steady = rates[min(3, len(rates) // 2):] if rates else []
        files = {"checkpoint": str(self.out / LATEST), "metrics": str(self.out / "metrics.jsonl")}
        summary = {
            "steps": self.step,
            "skipped_steps": skipped,
            "skip_counts": counts,
            "samples_per_s": float(np.median(steady)) if steady else None,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "rank": self.dist.rank,
            "precision": self.cfg.precision,
            "fused_blocks": self.fused_blocks,
            "stopped_by": self.stop_signal,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "files": files,
        }
        if not self.dist.is_main:
            return summary
        if self.cfg.pictures and last is not None:
            files.update(self._pictures(last))
        if any(self.out.glob("events.out.tfevents.*")):
            files["tensorboard"] = str(self.out)
        with atomic_write(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary


def _cpu(t):
    if isinstance(t, list):
        return [_cpu(x) for x in t]
    return t.detach().float().cpu()


def pretrain(cfg: PretrainConfig, volumes: list[Volume] | None = None) -> dict:
    trainer = Pretrainer(cfg, volumes)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["SKIP_REASONS", "NonFiniteLossError", "Pretrainer", "StepEngine", "StepModule", "StepOutput", "pretrain",
           "pretrain_step"]
