"""Shared benchmark helpers: environment description, timing, FLOP counts and JSON result rows."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The roofline that predictions are judged by: H100 SXM, dense bf16 tensor-core peak and HBM3 bandwidth.
H100 = {"bf16_tflops": 989.0, "hbm_gbps": 3350.0}


def roofline_ms(flop: float = 0.0, nbytes: float = 0.0, device: dict = H100) -> float:
    """The least time an op can take on ``device``: its FLOPs at the compute peak or its bytes at the memory
    bandwidth, whichever binds (milliseconds)."""
    return max(flop / (device["bf16_tflops"] * 1e12), nbytes / (device["hbm_gbps"] * 1e9)) * 1e3
RESULTS = ROOT / "benchmarks" / "results"


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


def source_state(root: Path = ROOT) -> dict:
    """The commit the benchmark runs and whether the tree differs from it (result files aside).

    A copy of the tree without ``.git`` (a GPU machine) reads ``$PCRLV2_COMMIT`` / ``$PCRLV2_DIRTY`` instead."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", f":!{RESULTS.relative_to(root)}"],
                                cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        dirty = os.environ.get("PCRLV2_DIRTY")
        return {"commit": os.environ.get("PCRLV2_COMMIT"), "dirty": None if dirty is None else dirty == "1"}


def environment(device: torch.device) -> dict:
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.date.today().isoformat(), **source_state()}
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
