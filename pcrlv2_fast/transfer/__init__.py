"""The label-efficiency benchmark (``pcrlv2-fast transfer``, ``benchmarks/benchmark_transfer.py``): PCRLv2 init
against random init at a few labelled-subject budgets on a fixed split. See protocol.py and docs/transfer.md.

Names are imported on first use, so that registering the subcommand (``transfer.cli``) loads neither SimpleITK nor
the fine-tuning code: the training path runs with torch, triton, numpy and tqdm alone."""

from __future__ import annotations

import importlib

__all__ = ["INITS", "TransferConfig", "run_transfer"]


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module(".protocol", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
