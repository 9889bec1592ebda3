"""Triton helpers shared by the kernels."""

import functools
from contextlib import nullcontext

import torch
import triton
import triton.language as tl


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device for a launch: Triton launches on the current device and stream, which
    is GPU 0 unless set, so tensors on another GPU (``--device cuda:1``) need it. A no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(t: torch.Tensor, cpu: int = 4) -> int:
    """Streaming multiprocessors of ``t``'s GPU (grids are sized to fill them); ``cpu`` for CPU tensors, where the
    interpreter runs programs one after another."""
    if not t.is_cuda:
        return cpu
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


@triton.jit
def to_out(y, OUT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    # fp32 -> output dtype. The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even
    # (cvt.rn), so under the interpreter ROUND_BF16 rounds by hand with the same result for finite values.
    if ROUND_BF16:
        u = y.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(OUT_DTYPE)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, cnt, mu, q, mask):
    # Merges a block of partial statistics (rows of count cnt, mean mu, M2 q; masked rows hold zeros) into the
    # running (n_a, mean_a, m2_a) per column: the block's own count/mean/M2 about its joint mean, then Chan's
    # parallel combination. Returns the new (n, mean, m2).
    n_b = tl.sum(cnt, axis=0)
    mean_b = tl.sum(cnt * mu, axis=0) / tl.maximum(n_b, 1.0)
    dev = tl.where(mask, mu - mean_b[None, :], 0.0)
    m2_b = tl.sum(q + cnt * dev * dev, axis=0)
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac
