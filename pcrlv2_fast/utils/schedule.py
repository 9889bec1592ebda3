"""The half-cosine annealing every schedule of the package uses (learning rates, the deep-supervision weight)."""

from __future__ import annotations

import math


def cosine_factor(t: float, total: float) -> float:
    """1 at ``t = 0``, falling by a half cosine to 0 at ``t = total``: 0.5 * (1 + cos(pi * t / total))."""
    if total <= 0:
        raise ValueError(f"the schedule's length must be positive, got {total}")
    return 0.5 * (1.0 + math.cos(math.pi * t / total))
