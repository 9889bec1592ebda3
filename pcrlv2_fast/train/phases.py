"""Where a step's time goes: named phases timed by CUDA events on a GPU and by the wall clock on the CPU.

The step (:func:`~pcrlv2_fast.train.step.pretrain_step`) opens its phases through ``phase(name)``; without a
timer that is a no-op (:data:`NO_PHASES`), so the trainer pays nothing. :class:`PhaseTimer` records each phase's
start and end (CUDA events: no synchronisation inside the step) and :meth:`PhaseTimer.collect` reads them once
per step. Phases of the same name add up (the optimizer phase, for instance, opens twice per step).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

# The phases of one step, in order; "comm" only when several processes average the step's statistics.
PHASES = ("data_wait", "h2d", "forward_global", "forward_local", "loss", "backward", "comm", "optimizer")


class _NoPhases:
    """The phase hook of an untimed step: every phase is a no-op."""

    def __call__(self, name: str):
        return nullcontext()


NO_PHASES = _NoPhases()


class PhaseTimer:
    """Times named phases on ``device``: ``with timer("backward"): ...``; ``collect()`` returns {phase: seconds}
    of everything timed since the last call (waiting for the GPU once) and starts afresh."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._spans: list[tuple[str, object, object]] = []

    def mark(self):
        """A point in time: a recorded CUDA event, or the wall clock."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds(start, end) -> float:
        if isinstance(start, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    @contextmanager
    def __call__(self, name: str):
        start = self.mark()
        try:
            yield
        finally:
            self._spans.append((name, start, self.mark()))

    def collect(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self._spans:
            out[name] += self.seconds(start, end)
        self._spans = []
        return dict(out)
