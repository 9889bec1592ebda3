"""The optimizer of a pretraining run and its learning-rate schedule (the official SGD recipe, or AdamW)."""

from __future__ import annotations

import torch

from ..utils.schedule import cosine_factor
from .config import PretrainConfig


def lr_at_epoch(base_lr: float, epoch: int, total_epochs: int) -> float:
    """Official cosine schedule, stepped once per epoch, over the run's own epochs (0 .. total_epochs-1)."""
    return base_lr * cosine_factor(epoch, total_epochs)


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
