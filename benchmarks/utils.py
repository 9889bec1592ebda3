"""Shared benchmark helpers: environment description, timing, FLOP counts and JSON result rows."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.date.today().isoformat()}
    for mod in ("triton", "nvidia.dali"):
        try:
            env[mod.split(".")[-1]] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            env[mod.split(".")[-1]] = None
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_rows(rows: list[dict], name: str, device: torch.device, out: str | Path | None = None) -> Path:
    """Write result rows as a JSON list to ``out`` or benchmarks/results/<name>-<device>-<date>.json."""
    if out is None:
        tag = "cuda" if device.type == "cuda" else "cpu"
        out = RESULTS / f"{name}-{tag}-{datetime.date.today().isoformat()}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return out
