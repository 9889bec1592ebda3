"""Throughput profiling: ``pcrlv2-fast profile`` (run.py), the FLOP count (flops.py), device peaks (peaks.py),
per-layer ranges under torch.profiler (layers.py) and the pictures and summary (report.py)."""

from .run import ProfileConfig, parse_compare, profile

__all__ = ["ProfileConfig", "parse_compare", "profile"]
