"""The label-efficiency benchmark (``pcrlv2-fast transfer``, ``benchmarks/benchmark_transfer.py``): PCRLv2 init
against random init at a few labelled-subject budgets on a fixed split. See protocol.py and docs/transfer.md."""

from .protocol import INITS, TransferConfig, run_transfer

__all__ = ["INITS", "TransferConfig", "run_transfer"]
