"""``pretrain --profile-steps A:B``: a ``torch.profiler`` trace of steps A..B (1-based) of a real run, written as
OUT/trace.pt.trace.json (trace-rank<r>.pt.trace.json for the other processes of a torchrun launch). The rest of the
run is not slowed.

The name is the one TensorBoard's profiler plugin (torch-tb-profiler) looks for: ``tensorboard --logdir OUT`` shows
the trace next to the run's scalars, one worker per process; Perfetto (ui.perfetto.dev) opens the file as it is."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def trace_name(rank: int = 0) -> str:
    """The trace file of process ``rank``: the plugin reads ``<worker>.pt.trace.json``, the worker being the part
    before."""
    return "trace.pt.trace.json" if rank == 0 else f"trace-rank{rank}.pt.trace.json"


def parse_window(text: str) -> tuple[int, int]:
    """``"A:B"`` -> (A, B) with 1 <= A <= B; anything else is a ValueError saying what is expected."""
    first, sep, last = text.partition(":")
    try:
        window = (int(first), int(last)) if sep else None
    except ValueError:
        window = None
    if window is None or not 1 <= window[0] <= window[1]:
        raise ValueError(f"--profile-steps takes A:B with 1 <= A <= B (steps of the run, 1-based), got {text!r}")
    return window


class StepTrace:
    """Starts the profiler before step ``first`` and writes the trace after step ``last`` (or when the run ends
    inside the window)."""

    def __init__(self, window: tuple[int, int], path: Path, device: torch.device):
        self.first, self.last = window
        self.path = path
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._prof = None
        self.written: Path | None = None

    def before_step(self, step: int) -> None:
        """``step``: the number of the step about to run."""
        if self._prof is None and self.written is None and self.first <= step <= self.last:
            self._prof = profile(activities=self.activities)
            self._prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self._prof is None:
            return
        self._prof.__exit__(None, None, None)
        self._prof.export_chrome_trace(str(self.path))
        self._prof, self.written = None, self.path
