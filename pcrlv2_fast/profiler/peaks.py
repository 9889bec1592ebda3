"""The device's peak rate, for model FLOP utilisation: a table of known GPUs, or a probe on the CPU.

GPU peaks are the vendors' dense (no sparsity) tensor-core figures per precision, in TFLOP/s; fp32 without TF32
is the CUDA-core rate. A GPU not in the table has no peak (utilisation is then left out, and the report says so).
On the CPU the peak is measured on the spot: square matmuls in the step's precision, timed for a moment.
"""

from __future__ import annotations

import time

import torch

# name fragment (as torch.cuda.get_device_name reports it) -> {precision: dense TFLOP/s}. More specific first.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9}),  # SXM (and HBM3 variants)
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_peak(name: str, precision: str) -> float | None:
    """Dense TFLOP/s of the GPU called ``name`` in ``precision``, or None for a GPU not in the table."""
    for fragment, peaks in GPU_PEAKS:
        if fragment.lower() in name.lower():
            return peaks[precision]
    return None


def cpu_peak(precision: str, seconds: float = 0.25, sizes: tuple[int, ...] = (1024, 2048)) -> float:
    """TFLOP/s of square matmuls on this CPU in ``precision`` (tf32 is fp32 here): the best of ``sizes``, each timed
    for about ``seconds`` (small matrices leave the wide units idle and would understate the peak)."""
    dtype = _DTYPES[precision]
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
            torch.mm(a, b)
            runs += 1
        best = max(best, 2 * n**3 * runs / elapsed / 1e12)
    return best


def device_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, where it comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, precision)
        return peak, (f"{name}, {precision} dense (table)" if peak else f"{name}: not in the table of known GPUs")
    return cpu_peak(precision), f"CPU {precision} matmul probe ({torch.get_num_threads()} threads)"
