"""Per-layer time of a few steps under ``torch.profiler``: each reported layer's forward and backward as a named
range (``layer:<name>:fwd`` / ``:bwd``), the top kernels, and a Chrome/Perfetto trace.

The ranges open and close in module hooks (forward pre/post, full backward pre/post). On a GPU a range's time is
that of the kernels launched inside it; on the CPU its wall time. Backward ranges of layers on parallel
branches (a decoder block and its deep-supervision head) may overlap where autograd interleaves them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from .flops import reported_layers


class _Ranges:
    """Forward and backward ranges for every reported layer of ``model``, while it is in use."""

    def __init__(self, model: nn.Module):
        self._open: dict[tuple[str, str], list] = {}
        self._handles = []
        for name, layer in reported_layers(model):
            self._handles += [
                layer.register_forward_pre_hook(self._enter(name, "fwd")),
                layer.register_forward_hook(self._exit(name, "fwd")),
                layer.register_full_backward_pre_hook(self._enter(name, "bwd")),
                layer.register_full_backward_hook(self._exit(name, "bwd")),
            ]

    def _enter(self, name: str, kind: str):
        def hook(*_):
            span = record_function(f"layer:{name}:{kind}")
            span.__enter__()
            self._open.setdefault((name, kind), []).append(span)
        return hook

    def _exit(self, name: str, kind: str):
        def hook(*_):
            stack = self._open.get((name, kind))
            if stack:
                stack.pop().__exit__(None, None, None)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _event_seconds(event, cuda: bool) -> float:
    if cuda:
        return getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / 1e6
    return event.cpu_time_total / 1e6


def profile_layers(model: nn.Module, run_step: Callable[[], None], steps: int, trace: Path | None,
                   device: torch.device, top: int = 15) -> dict:
    """Run ``run_step`` ``steps`` times under the profiler. Returns {"layers": {name: {"fwd_s", "bwd_s"}} per
    step, "top_kernels": [...], "trace": path or None}."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ranges = _Ranges(model)
    try:
        with warnings.catch_warnings(), profile(activities=activities) as prof:
            # The first block's input needs no gradient: its backward range then closes on its output's gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(steps):
                run_step()
            if cuda:
                torch.cuda.synchronize(device)
    finally:
        ranges.remove()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    layers: dict[str, dict[str, float]] = {}
    kernels = []
    for event in averages:
        if event.key.startswith("layer:"):
            _, name, kind = event.key.split(":")
            layers.setdefault(name, {"fwd_s": 0.0, "bwd_s": 0.0})[f"{kind}_s"] += _event_seconds(event, cuda) / steps
        else:
            self_s = (getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
                      if cuda else event.self_cpu_time_total) / 1e6
            if self_s > 0:
                kernels.append({"name": event.key, "calls": event.count // steps, "s_per_step": self_s / steps})
    kernels.sort(key=lambda k: -k["s_per_step"])
    return {"layers": layers, "top_kernels": kernels[:top], "trace": str(trace) if trace else None}
