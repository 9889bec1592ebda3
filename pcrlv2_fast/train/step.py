"""One optimisation step: :func:`pretrain_step` (views in, loss terms and skip decision out) is what the trainer,
the benchmarks and the profiler run.

Skipped steps leave parameters, optimizer state and batch-norm running statistics as they were. A step is skipped
when its loss (over all processes) is not finite, its gradient is not finite, the fp16 scaler finds an overflow,
or, as in the official code, its loss exceeds ``skip_loss_above`` after epoch 10. The step leaves its results on
the device: the skip decision is a device flag the fused optimizer reads (``found_inf``) and skip counts are
device counters (:class:`SkipCounters`); with fp16's gradient scaler, an unfused optimizer, or on the first step
that creates optimizer state, one flag is read per step.

Precision: ``fp32`` (TF32 off), ``tf32`` (fp32 tensors, TF32 matmuls and convolutions on CUDA), ``bf16``
(autocast) or ``fp16`` (autocast and a gradient scaler). The objective is always computed in fp32.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..losses import PCRLv2Loss
from ..utils.tf32 import set_tf32
from . import distributed as D
from .phases import NO_PHASES

# Why the step cannot be captured in a CUDA graph (pretrain --cuda-graphs prints it).
CUDA_GRAPHS_UNSUPPORTED = (
    "--cuda-graphs is not supported: a CUDA graph replays one fixed sequence of kernels, and the PCRLv2 step is not "
    "one. (1) Each step draws random decoder scales for the global pair, the deep supervision and each of the 12 "
    "local pairs, so the loss reads different outputs and the backward pass runs different kernels from step to "
    "step (3^13 variants), and with several processes the set of parameters that receive gradients changes with "
    "them. (2) fp16's gradient scaler decides on the host whether to skip a step. (The skip of a step with a "
    "non-finite loss or gradient is a device flag, and batch-norm running-statistic updates would be fine inside "
    "a graph.) "
    "Use --compile to cut kernel-launch overhead instead."
)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TERMS = ("loss", "loss_global", "loss_local", "loss_restore", "loss_deep", "beta")


def step_rng(seed: int, step: int) -> random.Random:
    """The scale draws of one step; string seeding is stable across processes and Python versions."""
    return random.Random(f"pcrlv2-scales-{seed}-{step}")


def set_float32_precision(precision: str) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA: off for ``fp32``, on for ``tf32`` and for the fp32 parts of
    ``bf16``/``fp16`` runs. The CPU ignores both flags."""
    set_tf32(precision != "fp32")


def grad_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients together (inf or nan when one of them is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: multi-tensor norms
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))


def forward_objective(forward, loss_fn: PCRLv2Loss, x1, x2, gt, loc, epoch: float, rng: random.Random,
                      amp_dtype: torch.dtype | None = None, phase=NO_PHASES):
    """The official three forward passes (x1, x2, all local views batched) and the objective, each in its
    ``phase`` (see phases.py). Returns (terms, restoration, masks)."""
    autocast = torch.autocast(x1.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        with phase("forward_global"):
            restoration, feats1, masks = forward(x1)
            _, feats2, _ = forward(x2)
        with phase("forward_local"):
            _, feats_local, _ = forward(loc, local=True)
    with phase("loss"):
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
        self.phase = NO_PHASES  # a PhaseTimer while the profiler times the step

    def forward(self, x1, x2, gt, loc, epoch: float, rng: random.Random, amp_dtype: torch.dtype | None):
        terms, restoration, masks = forward_objective(self._forward[0], self.loss_fn, x1, x2, gt, loc, epoch, rng,
                                                      amp_dtype, self.phase)
        deep = range(len(self.model.up_blocks)) if terms.scale < 0 else (terms.scale,)
        self.used_scales = (terms.pair_scales, tuple(deep))
        total = terms.total
        with self.phase("loss"):
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
    k, ddp, phase = len(micro), engine.ddp, engine.step_module.phase
    with phase("optimizer"):
        saved_buffers = [b.detach().clone() for b in engine.buffers]
        engine.optimizer.zero_grad(set_to_none=True)
    stats_sum, sample = None, {}
    for m, (x1, x2, gt, loc) in enumerate(micro):
        # Gradients are averaged over ranks once, in the backward of the last micro-batch.
        with nullcontext() if ddp is None or m == k - 1 else ddp.no_sync():
            total, stats, restoration, masks = engine.module(x1, x2, gt, loc, epoch, _same_draws(rng),
                                                             engine.amp_dtype)
            if engine.dist.enabled:
                with phase("comm"):
                    stats = D.mean_across(stats, engine.dist)
            stats_sum = stats if stats_sum is None else stats_sum + stats
            if m == 0:
                # Views of the first sample (no copies, no kernels): only the last step's are drawn.
                sample = {"x1": x1[0], "gt": gt[0], "restoration": restoration[0], "masks": [t[:1] for t in masks]}
            with phase("backward"):  # under DDP, the gradient all-reduce overlaps it
                engine.scaler.scale(total / k if k > 1 else total).backward()
    with phase("optimizer"):
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
