"""3x3x3 Conv3d (stride 1, padding 1) with the bias and the following BatchNorm's batch statistics fused in.

``conv3d_bn_stats(x, weight, bias)`` returns ``(y, mean, var)``: y = conv3d(x, weight, bias) in
channels_last_3d and x's dtype, and the fp32 per-channel mean and biased variance of y over N*D*H*W, so the
BatchNorm after the convolution gets its batch statistics without reading y again.

Triton implementation: every pass is an implicit GEMM over NDHWC tensors (M = N*D*H*W output voxels);
the 27 shifted copies of x that a 3x3x3 conv multiplies are never materialised, each K step gathers its
tile straight from x with masked loads standing in for the zero padding.
- forward: Y[M, C_out] = X_shift[M, 27*C_in] @ Wp[27*C_in, C_out], fp32 accumulation (tl.dot); the
  epilogue adds the bias, stores y and writes the tile's per-channel (count, mean, M2) into a
  (4, num_m_tiles, C_out) buffer (the mean as an fp32 pair hi + lo), M2 being the sum of squared
  deviations from the tile's own mean, taken from the accumulator still in registers. A small second
  kernel merges the tiles with Chan's parallel formula in a fixed order (no atomics: deterministic). No
  sum of squares is ever formed: E[y^2] - E[y]^2 in fp32 cancels catastrophically when a channel's mean
  is large against its spread (outputs of mean 1000 and spread 0.7: variance errors of tens of percent).
- data gradient: the same kernel run on dy with the flipped, transposed weights (the adjoint of a
  stride-1 "same" conv is the conv with the kernel mirrored and C_in/C_out swapped), no bias, no statistics.
- weight gradient: dW^T[C_out, 27*C_in] = dY^T @ X_shift, a reduction over M split across programs
  (per-split partials, summed by a small column-sum kernel); the bias gradient (the sum of dy over M) rides
  along in the programs of the first K tile.
K index k = tap * C_in + ci with tap = (kd * 3 + kh) * 3 + kw. When C_in >= 16 the K loop steps tap by tap
over C_in chunks (one padding mask per row per tap); for C_in < 16 (the 1-channel input layer, the
1-channel deep-supervision head's data gradient) it steps over k directly, so the 27 taps share one
tl.dot instead of each padding a 1-channel K step to the minimum dot size of 16.

Which implementation runs is ``impl``: "triton", "torch" (cuDNN via F.conv3d and aten.convolution_backward,
with the statistics from torch.var_mean) or "auto": on CUDA, a per-shape choice made by timing both on first
use, per direction (forward, backward), kept in memory and in a JSON file, and printed once; on CPU
always torch. The Triton forward/backward are the custom ops ``pcrlv2::conv3d_bn_stats_fwd`` / ``_bwd``
(fake implementations and autograd registered), so torch.compile traces through them.

mean/var are differentiable: gradients g_m, g_v on them add (g_m + 2 * (y - mean) * g_v) / n to dy (one
extra elementwise pass, only when such gradients exist). A BatchNorm that computes its own backward from y
and dy (as the fused norm_act kernels do) passes none, and the conv backward then reads dy only.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting as _interpreting
from .common import chan_merge as _chan_merge
from .common import device_guard, num_sms
from .common import to_out as _to_out

IMPLS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CL = torch.channels_last_3d


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # acc + a @ b in fp32. UPCAST (interpreter only, whose dot reads bf16 operands as raw integers) widens the
    # operands to fp32 first: exact, so the products and the fp32 accumulation are the GPU's.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _voxels(m, M, D, H, W):
    # Output voxel m (flat NDHW index) -> its (d, h, w) and whether it exists; n is never needed because a
    # tap's neighbour is m + a constant offset, and the d/h/w bounds checks keep it inside the same sample.
    w = m % W
    t = m // W
    h = t % H
    d = (t // H) % D
    return d, h, w, m < M


@triton.jit
def _tap_rows(d, h, w, m_ok, tap, D, H, W):
    # For one tap: which rows read inside the volume (the rest are the zero padding) and the voxel offset of
    # the neighbour, the same for every row.
    kd = tap // 9 - 1
    kh = (tap // 3) % 3 - 1
    kw = tap % 3 - 1
    dd = d + kd
    hh = h + kh
    ww = w + kw
    ok = m_ok & (dd >= 0) & (dd < D) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    return ok, (kd * H + kh) * W + kw


@triton.jit
def _gather_flat(X_ptr, m, d, h, w, m_ok, k, C, D, H, W, K):
    # [BLOCK_M, BLOCK_K] tile of X_shift for arbitrary k = tap * C + ci: every element has its own tap, so the
    # padding mask is two-dimensional. Used only when C < 16.
    tap = k // C
    ci = k - tap * C
    kd = tap // 9 - 1
    kh = (tap // 3) % 3 - 1
    kw = tap % 3 - 1
    dd = d[:, None] + kd[None, :]
    hh = h[:, None] + kh[None, :]
    ww = w[:, None] + kw[None, :]
    ok = (m_ok[:, None] & (k < K)[None, :] & (dd >= 0) & (dd < D) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))
    koff = ((kd * H + kh) * W + kw) * C + ci
    return tl.load(X_ptr + m[:, None] * C + koff[None, :], mask=ok, other=0.0)


@triton.jit
def _tap_tile(X_ptr, m, d, h, w, m_ok, tap, c, C_in, D, H, W, EVEN_K: tl.constexpr):
    # [BLOCK_M, BLOCK_K] tile of X shifted by one tap, channels c (one chunk); zero in the padding.
    ok, delta = _tap_rows(d, h, w, m_ok, tap, D, H, W)
    a_ptrs = X_ptr + (m + delta)[:, None] * C_in + c[None, :]
    if EVEN_K:
        return tl.load(a_ptrs, mask=ok[:, None], other=0.0)
    return tl.load(a_ptrs, mask=ok[:, None] & (c < C_in)[None, :], other=0.0)


@triton.jit
def _conv3d_fwd_kernel(
    X_ptr,  # (N, D, H, W, C_in) input, dense channels-last
    W_ptr,  # (27 * C_in, C_out) packed weight in X's dtype: row tap * C_in + ci
    B_ptr,  # (C_out,) bias, read when HAS_BIAS
    Y_ptr,  # (N, D, H, W, C_out) output, dense channels-last
    P_ptr,  # (4, num_m_tiles, C_out) fp32 per-tile count, mean (hi + lo) and M2, written when STATS
    M, D, H, W, C_in, C_out,  # M = N * D * H * W
    P_plane,  # num_m_tiles * C_out
    FLAT: tl.constexpr,  # K loop over k = tap * C_in + ci (C_in < 16) instead of tap by tap
    EVEN_K: tl.constexpr,  # C_in % BLOCK_K == 0: no channel mask on the X loads (tap-by-tap loop only)
    HAS_BIAS: tl.constexpr, STATS: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d, h, w, m_ok = _voxels(m, M, D, H, W)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT:
        K = 27 * C_in
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _gather_flat(X_ptr, m, d, h, w, m_ok, k, C_in, D, H, W, K)
            b = tl.load(W_ptr + k[:, None] * C_out + co[None, :], mask=(k < K)[:, None] & co_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
    else:
        # One flat loop over (tap, channel chunk) rather than two nested loops: the compiler software-pipelines
        # the innermost loop only, and with C_in <= BLOCK_K the chunk loop would have a single iteration.
        ncb = tl.cdiv(C_in, BLOCK_K)
        for it in range(0, 27 * ncb):
            tap = it // ncb
            c = (it - tap * ncb) * BLOCK_K + tl.arange(0, BLOCK_K)
            ok, delta = _tap_rows(d, h, w, m_ok, tap, D, H, W)
            a_ptrs = X_ptr + (m + delta)[:, None] * C_in + c[None, :]
            b_ptrs = W_ptr + (tap * C_in + c)[:, None] * C_out + co[None, :]
            if EVEN_K:
                a = tl.load(a_ptrs, mask=ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=co_ok[None, :], other=0.0)
            else:
                c_ok = c < C_in
                a = tl.load(a_ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_ok[:, None] & co_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & co_ok[None, :]
    tl.store(Y_ptr + m[:, None] * C_out + co[None, :], _to_out(acc, Y_ptr.dtype.element_ty, ROUND_BF16), mask=out_ok)
    if STATS:
        # BatchNorm partials from the fp32 accumulator (before rounding y); rows past M hold the bias only and
        # are left out. Passes over the registers, no sum of squares of y: the tile mean, then the squared
        # deviations from it. The mean is kept as hi + lo: an fp32 mean of 1000 is only good to 3e-5, which
        # next to a unit spread costs the merged variance a few 1e-5 relative through the between-tile term;
        # lo is the mean of acc - hi (exact differences when the spread is small against the mean).
        n_t = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        hi = tl.sum(tl.where(out_ok, acc, 0.0), axis=0) / n_t
        dev = tl.where(out_ok, acc - hi[None, :], 0.0)
        lo = tl.sum(dev, axis=0) / n_t
        dev = tl.where(out_ok, dev - lo[None, :], 0.0)
        p = P_ptr + pid_m * C_out + co
        tl.store(p, tl.zeros([BLOCK_N], dtype=tl.float32) + n_t, mask=co_ok)
        tl.store(p + P_plane, hi, mask=co_ok)
        tl.store(p + 2 * P_plane, lo, mask=co_ok)
        tl.store(p + 3 * P_plane, tl.sum(dev * dev, axis=0), mask=co_ok)


@triton.jit
def _conv3d_wgrad_kernel(
    X_ptr,  # (N, D, H, W, C_in) forward input, dense channels-last
    DY_ptr,  # (N, D, H, W, C_out) output gradient, dense channels-last, X's dtype
    DW_ptr,  # (NSPLIT, C_out, 27 * C_in) fp32 partial weight gradients, column tap * C_in + ci
    DB_ptr,  # (NSPLIT, C_out) fp32 partial bias gradients, written when HAS_BIAS
    M, D, H, W, C_in, C_out,
    SPAN,  # output voxels per split, a multiple of BLOCK_M
    FLAT: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dW^T[C_out, K] = dY^T @ X_shift with C_out as the MMA's row dimension: Hopper's warp-group MMA wants at
    # least 64 rows, which C_out (64..512 in the heavy layers) has and one tap's C_in chunk (32 in the
    # full-resolution 32->64 conv) has not. Tap by tap, a program takes the three w-neighbour taps of one
    # (kd, kh): each dY tile loaded feeds three MMAs (three accumulators), so dY, the largest operand of the
    # deep layers, is read 9 times per conv instead of 27.
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    K = 27 * C_in
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    if FLAT:
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    else:
        # A K tile is the taps kw = 0, 1, 2 of one (kd, kh) and a chunk of their channels: the padding mask is
        # per row.
        ncb = tl.cdiv(C_in, BLOCK_K)
        tap = (pid_k // ncb) * 3
        c = (pid_k - (pid_k // ncb) * ncb) * BLOCK_K + tl.arange(0, BLOCK_K)
        k = tap * C_in + c
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_lo = split * SPAN
    m_hi = tl.minimum(m_lo + SPAN, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        d, h, w, m_ok = _voxels(m, M, D, H, W)
        # dY^T tile [BLOCK_N, BLOCK_M], loaded in the orientation the dot consumes (no register transpose).
        g = tl.load(DY_ptr + co[:, None] + m[None, :] * C_out, mask=co_ok[:, None] & m_ok[None, :], other=0.0)
        if FLAT:
            a = _gather_flat(X_ptr, m, d, h, w, m_ok, k, C_in, D, H, W, K)
        else:
            a = _tap_tile(X_ptr, m, d, h, w, m_ok, tap, c, C_in, D, H, W, EVEN_K)
        acc = _mma(g, a, acc, DOT_PRECISION, UPCAST)
        if not FLAT:
            acc1 = _mma(g, _tap_tile(X_ptr, m, d, h, w, m_ok, tap + 1, c, C_in, D, H, W, EVEN_K), acc1,
                        DOT_PRECISION, UPCAST)
            acc2 = _mma(g, _tap_tile(X_ptr, m, d, h, w, m_ok, tap + 2, c, C_in, D, H, W, EVEN_K), acc2,
                        DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            db += tl.sum(g.to(tl.float32), axis=1)
    out = DW_ptr + split * C_out * K + co[:, None] * K + k[None, :]
    if FLAT:
        tl.store(out, acc, mask=co_ok[:, None] & (k < K)[None, :])
    else:
        # Each tap's columns are C_in further on; c < C_in keeps a partial chunk out of the next tap's columns
        # (another program's).
        ok = co_ok[:, None] & (c < C_in)[None, :]
        tl.store(out, acc, mask=ok)
        tl.store(out + C_in, acc1, mask=ok)
        tl.store(out + 2 * C_in, acc2, mask=ok)
    if HAS_BIAS:
        # Every K tile summed the same dy; the first one writes it.
        if pid_k == 0:
            tl.store(DB_ptr + split * C_out + co, db, mask=co_ok)


@triton.jit
def _colsum_kernel(
    P_ptr,  # (Q, R, C) fp32 partials
    Out_ptr,  # (Q, NSPLIT, C) fp32 sums over row blocks of ROWS rows
    R, C, ROWS, NSPLIT,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Column sums in a fixed order (deterministic); called once more on its own output when NSPLIT > 1.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    q = tl.program_id(2)
    c_ok = c < C
    base = P_ptr + q.to(tl.int64) * R * C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    r_lo = split * ROWS
    r_hi = tl.minimum(r_lo + ROWS, R)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < r_hi)[:, None] & c_ok[None, :]
        acc += tl.sum(tl.load(base + r[:, None].to(tl.int64) * C + c[None, :], mask=mask, other=0.0), axis=0)
    tl.store(Out_ptr + (q * NSPLIT + split).to(tl.int64) * C + c, acc, mask=c_ok)


@triton.jit
def _stats_combine_kernel(
    P_ptr,  # (4, R, C) fp32 partials: count, mean as hi + lo, M2 (deviations from that partial's mean)
    Out_ptr,  # (4, NSPLIT, C) fp32 partials of blocks of ROWS rows, same format, written unless FINAL
    Mean_ptr, Var_ptr,  # (C,) fp32 mean and biased variance, written when FINAL (NSPLIT == 1)
    R, C, ROWS, NSPLIT,
    FINAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Chan's parallel formula in a fixed order (deterministic); called again on its own output while
    # NSPLIT > 1. Each step folds BLOCK_R partials at once (M2 about their joint mean) and merges the block
    # into the running triple: the correction terms are squared differences of means, never of raw sums.
    # Means are taken relative to a per-channel shift, row 0's hi (the same for every program), so they are
    # of the size of the spread and fp32 holds them to full relative precision whatever the channel's mean.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    c_ok = c < C
    plane = R * C
    shift = tl.load(P_ptr + plane + c, mask=c_ok, other=0.0)
    n_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    r_lo = split * ROWS
    r_hi = tl.minimum(r_lo + ROWS, R)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < r_hi)[:, None] & c_ok[None, :]
        off = r[:, None] * C + c[None, :]
        cnt = tl.load(P_ptr + off, mask=mask, other=0.0)
        hi = tl.load(P_ptr + plane + off, mask=mask, other=0.0)
        lo = tl.load(P_ptr + 2 * plane + off, mask=mask, other=0.0)
        q = tl.load(P_ptr + 3 * plane + off, mask=mask, other=0.0)
        mu = tl.where(mask, (hi - shift[None, :]) + lo, 0.0)
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, cnt, mu, q, mask)
    if FINAL:
        tl.store(Mean_ptr + c, shift + mean_a, mask=c_ok)
        tl.store(Var_ptr + c, m2_a / tl.maximum(n_a, 1.0), mask=c_ok)
    else:
        out = Out_ptr + split * C + c
        tl.store(out, n_a, mask=c_ok)
        tl.store(out + NSPLIT * C, shift, mask=c_ok)
        tl.store(out + 2 * NSPLIT * C, mean_a, mask=c_ok)
        tl.store(out + 3 * NSPLIT * C, m2_a, mask=c_ok)


# ------------------------------------------------------------------------------------------- launchers
# (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_K of the flat loop) under the interpreter, whose cost is per operation and
# iteration rather than per element: the smallest tiles that still leave the tests' odd shapes with partial
# tiles along every axis and several tiles along M and (for more than 32 channels) K and N.
_INTERPRET_TILES = (64, 32, 32, 32)


def _np2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(triton.next_power_of_2(v), hi))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows the rule torch applies to cuDNN convolutions (TF32 allowed by default on Ampere and later).
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def _gemm_config(M: int, c_red: int, c_out: int, t: Tensor) -> dict:
    """Tiles of the forward-shaped GEMM (forward and data gradient): M rows, reduction 27 * c_red, c_out columns.

    GPU: 128 x up to 128 output tiles, K steps of up to 64 channels (32 in fp32, to keep the pipelined
    stages in shared memory) one tap at a time, 64-row tiles when 128-row ones leave SMs idle (the deep layers
    have few voxels). Interpreter: _INTERPRET_TILES."""
    flat = c_red < 16
    if _interpreting():
        bm, bn, bk, flat_bk = _INTERPRET_TILES
    else:
        bn = _np2(c_out, 16, 128)
        bm = 128 if triton.cdiv(M, 128) * triton.cdiv(c_out, bn) >= num_sms(t) else 64
        fp32 = t.dtype == torch.float32
        bk = _np2(c_red, 16, 32 if fp32 else 64)
        flat_bk = _np2(27 * c_red, 16, 32 if fp32 else 64)
    bk = flat_bk if flat else bk
    fp32 = t.dtype == torch.float32
    return dict(FLAT=flat, EVEN_K=not flat and c_red % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=2 if fp32 else 3)


def _colsum(part: Tensor) -> Tensor:
    """(Q, R, C) fp32 -> (Q, C) column sums, deterministic: split over row blocks, then those sums again."""
    Q, R, C = part.shape
    # Under the interpreter two rows per program, so that small inputs go through both levels.
    rows = 2 if _interpreting() else 256
    block_r = 2 if _interpreting() else 32
    block_c = _np2(C, 16, 128)
    while True:
        nsplit = triton.cdiv(R, rows)
        out = torch.empty((Q, nsplit, C), device=part.device, dtype=torch.float32)
        _colsum_kernel[(triton.cdiv(C, block_c), nsplit, Q)](part, out, R, C, rows, nsplit,
                                                            BLOCK_R=block_r, BLOCK_C=block_c)
        if nsplit == 1:
            return out[:, 0]
        part, R = out, nsplit


def _combine_stats(part: Tensor) -> tuple[Tensor, Tensor]:
    """(4, R, C) fp32 partials (count, mean as hi + lo, M2) -> per-channel mean and biased variance, (C,) fp32
    each, merged by Chan's formula in a fixed order: blocks of rows, then those blocks' partials again."""
    _, R, C = part.shape
    # Under the interpreter two rows per program, so that small inputs go through several levels.
    rows = 2 if _interpreting() else 256
    block_r = 2 if _interpreting() else 32
    block_c = _np2(C, 16, 128)
    while True:
        nsplit = triton.cdiv(R, rows)
        if nsplit == 1:
            # Two separate (C,) tensors: a custom op's outputs may not alias one another.
            mean = torch.empty(C, device=part.device, dtype=torch.float32)
            var = torch.empty_like(mean)
            _stats_combine_kernel[(triton.cdiv(C, block_c), 1)](part, mean, mean, var, R, C, rows, 1, FINAL=True,
                                                                 BLOCK_R=block_r, BLOCK_C=block_c)
            return mean, var
        out = torch.empty((4, nsplit, C), device=part.device, dtype=torch.float32)
        _stats_combine_kernel[(triton.cdiv(C, block_c), nsplit)](part, out, out, out, R, C, rows, nsplit, FINAL=False,
                                                                 BLOCK_R=block_r, BLOCK_C=block_c)
        part, R = out, nsplit


def _cl(t: Tensor) -> Tensor:
    """t as dense channels-last (a copy only when it is not already)."""
    return t.contiguous(memory_format=_CL)


def _empty_cl(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, device=like.device, dtype=like.dtype, memory_format=_CL)


def _pack_weight(weight: Tensor, transpose: bool) -> Tensor:
    """(C_out, C_in, 3, 3, 3) -> (27 * C_in, C_out) with row tap * C_in + ci; with transpose the weight of the
    data-gradient conv: mirrored taps, C_in and C_out swapped, (27 * C_out, C_in)."""
    if transpose:
        return weight.flip(2, 3, 4).permute(2, 3, 4, 0, 1).reshape(-1, weight.shape[1]).contiguous()
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def _launch_gemm(x: Tensor, wp: Tensor, c_out: int, bias: Tensor | None, stats: bool):
    """Forward-shaped implicit GEMM: y (N, c_out, D, H, W) channels-last and, with stats, the (mean, var)
    pair of (c_out,) fp32 tensors (else None)."""
    N, C, D, H, W = x.shape
    M = N * D * H * W
    y = _empty_cl((N, c_out, D, H, W), x)
    cfg = _gemm_config(M, C, c_out, x)
    n_mt = triton.cdiv(M, cfg["BLOCK_M"])
    part = torch.empty((4, n_mt, c_out), device=x.device, dtype=torch.float32) if stats else y
    grid = (n_mt, triton.cdiv(c_out, cfg["BLOCK_N"]))
    _conv3d_fwd_kernel[grid](
        x, wp, bias if bias is not None else wp, y, part, M, D, H, W, C, c_out, n_mt * c_out,
        HAS_BIAS=bias is not None, STATS=stats, ROUND_BF16=_interpreting() and y.dtype == torch.bfloat16,
        DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_interpreting(), **cfg)
    return y, (_combine_stats(part) if stats else None)


def triton_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var) by the Triton kernels; x dense channels-last, weight/bias in x's dtype."""
    y, (mean, var) = _launch_gemm(x, _pack_weight(weight, False), weight.shape[0], bias, stats=True)
    return y, mean, var


def _wgrad_k_tiles(c_in: int, bk: int, flat: bool) -> int:
    """Programs along K: flat tiles of the 27 * c_in columns, or (kd, kh) pairs (three taps each) x channel chunks."""
    return triton.cdiv(27 * c_in, bk) if flat else 9 * triton.cdiv(c_in, bk)


def _wgrad_config(M: int, c_in: int, c_out: int, t: Tensor) -> tuple[dict, int, int]:
    """(tile meta-parameters, NSPLIT, SPAN) of the weight-gradient reduction: output tiles of up to 128 output
    channels x three taps' chunks of up to 64 input channels, reduced over 64-voxel steps; enough M splits that
    the (K tiles x C_out tiles x splits) programs fill the GPU about twice, each still looping over at least
    8 steps, and few enough that the fp32 partials keep int32 offsets."""
    flat = c_in < 16
    if _interpreting():
        bm, bn, bk, flat_bk = _INTERPRET_TILES
    else:
        bm, bn = 64, _np2(c_out, 16, 128)
        bk, flat_bk = _np2(c_in, 16, 64), _np2(27 * c_in, 16, 64)
    bk = flat_bk if flat else bk
    n_kt = _wgrad_k_tiles(c_in, bk, flat)
    chunks = triton.cdiv(M, bm)
    if _interpreting():
        nsplit = min(2, chunks)  # the tests' shapes still go through the split reduction
    else:
        nsplit = triton.cdiv(2 * num_sms(t), n_kt * triton.cdiv(c_out, bn))
        nsplit = max(1, min(nsplit, chunks // 8, (2**31 - 1) // (27 * c_in * c_out)))
    per_split = triton.cdiv(chunks, nsplit)
    nsplit = triton.cdiv(chunks, per_split)
    cfg = dict(FLAT=flat, EVEN_K=not flat and c_in % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
               num_warps=8 if bk * bn >= 64 * 128 else 4, num_stages=2 if t.dtype == torch.float32 else 3)
    return cfg, nsplit, per_split * bm


def triton_backward(dy: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_dw: bool, need_db: bool):
    """(dx, dweight, dbias) by the Triton kernels, None where not asked for; dy and x dense channels-last."""
    N, C_in, D, H, W = x.shape
    C_out = weight.shape[0]
    M = N * D * H * W
    dx = dw = db = None
    if need_dx:
        dx, _ = _launch_gemm(dy, _pack_weight(weight, True), C_in, None, stats=False)
    if need_dw or need_db:
        cfg, nsplit, span = _wgrad_config(M, C_in, C_out, x)
        K = 27 * C_in
        part_w = torch.empty((nsplit, K * C_out), device=x.device, dtype=torch.float32)
        part_b = torch.empty((nsplit, C_out), device=x.device, dtype=torch.float32) if need_db else part_w
        grid = (_wgrad_k_tiles(C_in, cfg["BLOCK_K"], cfg["FLAT"]), triton.cdiv(C_out, cfg["BLOCK_N"]), nsplit)
        _conv3d_wgrad_kernel[grid](x, dy, part_w, part_b, M, D, H, W, C_in, C_out, span, HAS_BIAS=need_db,
                                   DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_interpreting(), **cfg)
        if need_dw:
            dwp = part_w[0] if nsplit == 1 else _colsum(part_w[None])[0]
            # (C_out, 27 * C_in) -> (C_out, C_in, 3, 3, 3)
            dw = dwp.view(C_out, 3, 3, 3, C_in).permute(0, 4, 1, 2, 3).contiguous().to(weight.dtype)
        if need_db:
            db = (part_b[0] if nsplit == 1 else _colsum(part_b[None])[0]).to(weight.dtype)
    return dx, dw, db


def torch_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var) by F.conv3d (cuDNN on GPU) and torch's (Welford) var_mean of the rounded y in fp32."""
    with torch.autocast(x.device.type, enabled=False):
        y = F.conv3d(x, weight, bias, padding=1)
    y = _as_cl_strides(y)
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3, 4), correction=0)
    return y, mean, var


def torch_backward(dy: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_dw: bool, need_db: bool):
    """(dx, dweight, dbias) by aten.convolution_backward (cuDNN on GPU), None where not asked for."""
    with torch.autocast(x.device.type, enabled=False):
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy, x, weight, [weight.shape[0]] if need_db else None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False,
            [0, 0, 0], 1, [need_dx, need_dw, need_db])
    return (_as_cl_strides(dx) if need_dx else None, dw.contiguous() if need_dw else None,
            db if need_db else None)


def _as_cl_strides(t: Tensor) -> Tensor:
    """t with exactly the strides of a fresh channels-last tensor (what the fake implementations promise;
    torch may return other strides on size-1 dimensions)."""
    ref = torch.empty(t.shape, device="meta", memory_format=_CL)
    if t.stride() == ref.stride():
        return t
    out = torch.empty(t.shape, device=t.device, dtype=t.dtype, memory_format=_CL)
    return out.copy_(t)


# --------------------------------------------------------------------------------------------- chooser
def _default_cache_file() -> Path:
    root = os.environ.get("PCRLV2_FAST_CACHE_DIR") or Path.home() / ".cache" / "pcrlv2_fast"
    return Path(root) / "conv3d_block.json"


def cuda_timer(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median milliseconds of fn on the current CUDA stream after warm-up runs (which also compile)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _print_line(line: str) -> None:
    print(line, flush=True)


# Largest relative difference (max |triton - cudnn| / max |cudnn| per output) at which a Triton candidate's first
# output is accepted: the rounding of the compute dtype, with room for another summation order.
_AGREEMENT = {"ieee": 1e-4, "tf32": 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _tolerance(dtype: torch.dtype) -> float:
    return _AGREEMENT[_dot_precision(dtype)] if dtype == torch.float32 else _AGREEMENT[dtype]


def compare_outputs(candidate, reference) -> str | None:
    """None when two candidates' outputs (tensors, or tuples with None where a gradient was not asked for)
    agree within the compute dtype's tolerance, else what differs."""
    pairs = zip(candidate, reference) if isinstance(reference, tuple | list) else [(candidate, reference)]
    for i, (a, b) in enumerate(pairs):
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            shapes = [None if t is None else tuple(t.shape) for t in (a, b)]
            return f"output {i}: shape {shapes[0]} vs {shapes[1]}"
        a32, b32 = a.detach().float(), b.detach().float()
        if not bool(torch.isfinite(a32).all()):
            return f"output {i} is not finite"
        scale = max(float(b32.abs().max()), 1e-30) if b32.numel() else 1.0
        rel = float((a32 - b32).abs().max()) / scale if a32.numel() else 0.0
        tol = _tolerance(b.dtype)
        if rel > tol:
            return f"output {i} differs by {rel:.2e} of its largest value (tolerance {tol:.0e})"
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class ImplChooser:
    """Per-shape choice between torch's convolution ("torch", the reference: cuDNN on a GPU) and the Triton kernels,
    made on first use.

    A Triton candidate is accepted only if it runs and its first output agrees with cuDNN's on that shape
    (``compare``); then both are timed (``timer(fn) -> ms``, replaceable in tests) and the faster wins. Any
    exception from a Triton candidate (does not fit, compile or ptxas error, launch error, ...) makes cuDNN the
    choice, its reason logged once per distinct reason; an exception from cuDNN propagates. Decisions are kept in
    ``choices`` and, when ``cache_file`` is set, in a JSON file shared by later runs (its keys name the GPU and
    the torch/Triton versions, so a new stack measures again); a cached Triton choice is still checked against
    cuDNN once per process. A cache file that cannot be written leaves the choices in memory, with one warning.
    The module's ``CHOOSER`` keeps its file in $PCRLV2_FAST_CACHE_DIR (default ~/.cache/pcrlv2_fast)/
    conv3d_block.json; delete the file to measure again. A first use inside CUDA-graph capture would fail
    (timing synchronises): run an eager step first.
    """

    REFERENCE = "torch"

    def __init__(self, cache_file: Path | None = None, timer: Callable[[Callable[[], object]], float] = cuda_timer,
                 log: Callable[[str], None] = _print_line, compare: Callable[[object, object], str | None] = None):
        self.cache_file = cache_file
        self.timer = timer
        self.log = log
        self.compare = compare or compare_outputs
        self.choices: dict[str, str] = {}
        self._logged: set[str] = set()

    def _log_once(self, line: str, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            self.log(line)

    def _read_file(self) -> dict:
        if self.cache_file is None or not self.cache_file.exists():
            return {}
        try:
            data = json.loads(self.cache_file.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._log_once(f"conv3d_block: ignoring unreadable choice cache {self.cache_file}: {exc}", "read")
            return {}
        return data if isinstance(data, dict) else {}

    def _write_file(self, key: str, choice: str) -> None:
        if self.cache_file is None:
            return
        # Merge with what other processes wrote meanwhile; the rename makes the update atomic.
        data = self._read_file()
        data[key] = choice
        tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the folder itself may be what cannot be written
                tmp.unlink(missing_ok=True)
            self.log(f"warning: conv3d_block: cannot write the choice cache {self.cache_file} ({exc}); choices stay "
                     "in memory for this process (set PCRLV2_FAST_CACHE_DIR to a writable folder to keep them)")
            self.cache_file = None

    def _usable(self, label: str, name: str, fn: Callable[[], object], reference_out) -> bool:
        """Whether candidate ``name`` runs and agrees with the reference's output (logs why not, once)."""
        try:
            problem = self.compare(fn(), reference_out)
        except triton.runtime.errors.OutOfResources as exc:
            self._log_once(f"{label}: {name} does not fit on this GPU ({exc}); using {self.REFERENCE}", _reason(exc))
            return False
        except Exception as exc:  # compile, ptxas, launch or any other failure of the candidate: never fatal
            self._log_once(f"{label}: {name} failed ({_reason(exc)}); using {self.REFERENCE} for every shape where "
                           "it fails", _reason(exc))
            return False
        if problem:
            self.log(f"{label}: {name} disagrees with {self.REFERENCE} ({problem}); using {self.REFERENCE}")
        return problem is None

    def choose(self, key: str, label: str, candidates: dict[str, Callable[[], object]]) -> str:
        """The chosen candidate name for key: remembered, read from the file, or measured now (the fastest)."""
        if key in self.choices:
            return self.choices[key]
        reference = candidates[self.REFERENCE]
        reference_out = reference()
        cached = self._read_file().get(key)
        if cached in candidates:
            if cached == self.REFERENCE or self._usable(label, cached, candidates[cached], reference_out):
                self.choices[key] = cached
                self.log(f"{label}: {cached} (cached in {self.cache_file})")
                return cached
        usable = {self.REFERENCE: reference}
        usable.update({n: fn for n, fn in candidates.items()
                       if n != self.REFERENCE and self._usable(label, n, fn, reference_out)})
        times = {name: self.timer(fn) for name, fn in usable.items()}
        choice = min(times, key=times.get)
        self.choices[key] = choice
        self.log(f"{label}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()) + f" -> {choice}")
        self._write_file(key, choice)
        return choice

    def demote(self, key: str, label: str, exc: BaseException) -> None:
        """A chosen Triton kernel failed on a later call: cuDNN from now on for this shape (in memory only)."""
        self.choices[key] = self.REFERENCE
        self._log_once(f"{label}: triton failed ({_reason(exc)}); using {self.REFERENCE} from now on", _reason(exc))


CHOOSER = ImplChooser(cache_file=_default_cache_file())


def _shape_key(x: Tensor, weight: Tensor, direction: str) -> tuple[str, str]:
    """(cache key, printed label) of one conv shape and direction (fwd, dgrad or wgrad)."""
    N, C_in, D, H, W = x.shape
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[x.dtype]
    label = f"conv3d_block {C_in}->{weight.shape[0]} {D}x{H}x{W} N={N} {dt} {direction}"
    if x.dtype == torch.float32:
        label += " tf32" if torch.backends.cudnn.allow_tf32 else " ieee"
    dev = torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"
    return f"{dev}|torch {torch.__version__}|triton {triton.__version__}|{label}", label


def _fits_int32(x: Tensor, weight: Tensor) -> bool:
    """Whether every offset the kernels form fits int32, including masked (padding) neighbours one plane past
    the end."""
    N, C, D, H, W = x.shape
    return max(C, weight.shape[0]) * (N * D * H * W + H * W + W + 1) < 2**31


def _measures(x: Tensor) -> bool:
    """Whether ``auto`` asks the chooser: on CUDA only (timing the interpreter would say nothing)."""
    return x.is_cuda


def _dispatch(impl: str, x: Tensor, weight: Tensor, direction: str, run_torch: Callable[[], object],
              run_triton: Callable[[], object]):
    """Run this call by the chosen implementation. ``auto``: the chooser's per-shape choice on CUDA (a Triton
    failure on a later call falls back to cuDNN), torch on the CPU and for shapes beyond int32 offsets."""
    if impl == "torch":
        return run_torch()
    if impl == "triton":
        return run_triton()
    if not _measures(x) or not _fits_int32(x, weight):
        return run_torch()
    key, label = _shape_key(x, weight, direction)
    if CHOOSER.choose(key, label, {"torch": run_torch, "triton": run_triton}) != "triton":
        return run_torch()
    try:
        return run_triton()
    except Exception as exc:  # the chooser promised never to take training down for a Triton failure
        CHOOSER.demote(key, label, exc)
        return run_torch()


# ------------------------------------------------------------------------------------------ custom ops
def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if x.dim() != 5 or x.numel() == 0:
        raise ValueError(f"expected a non-empty x of shape (N, C_in, D, H, W), got {tuple(x.shape)}")
    if weight.shape != (weight.shape[0], x.shape[1], 3, 3, 3):
        raise ValueError(f"weight must have shape (C_out, {x.shape[1]}, 3, 3, 3), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got {t.dtype}, {t.device}")
    if impl == "triton" and not (x.is_cuda or _interpreting()):
        raise RuntimeError("conv3d_block's Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                           "use impl='torch' or 'auto'")
    if impl == "triton" and not _fits_int32(x, weight):
        raise ValueError(f"x {tuple(x.shape)} with {weight.shape[0]} output channels exceeds the Triton kernels' "
                         "int32 offsets; use impl='auto' (falls back to torch) or 'torch'")


def _stat_like(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((weight.shape[0],), dtype=torch.float32)


@torch.library.custom_op("pcrlv2::conv3d_bn_stats_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Tensor | None, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y (N, C_out, D, H, W) channels-last in x's dtype, mean/var (C_out,) fp32."""
    _check_inputs(x, weight, bias, impl)
    xc = _cl(x)
    with device_guard(xc):
        return _dispatch(impl, xc, weight, "fwd", lambda: torch_forward(xc, weight, bias),
                         lambda: triton_forward(xc, weight, bias))


@_fwd_op.register_fake
def _(x, weight, bias, impl):
    N, _, D, H, W = x.shape
    y = torch.empty((N, weight.shape[0], D, H, W), device=x.device, dtype=x.dtype, memory_format=_CL)
    return y, _stat_like(x, weight), _stat_like(x, weight)


@torch.library.custom_op("pcrlv2::conv3d_bn_stats_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_dw: bool, need_db: bool, impl: str
            ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); a gradient not asked for is an empty tensor. dx is channels-last."""
    xc, dyc = _cl(x), _cl(dy.to(x.dtype))
    dx = dw = db = None
    # Data and weight gradients are chosen separately: their GEMMs have different shapes and winners.
    with device_guard(xc):
        if need_dx:
            data = (dyc, xc, weight, True, False, False)
            dx = _dispatch(impl, xc, weight, "dgrad", lambda: torch_backward(*data)[0],
                           lambda: triton_backward(*data)[0])
        if need_dw or need_db:
            wargs = (dyc, xc, weight, False, need_dw, need_db)
            dw, db = _dispatch(impl, xc, weight, "wgrad", lambda: torch_backward(*wargs)[1:],
                               lambda: triton_backward(*wargs)[1:])
    empty = x.new_empty(0)
    return tuple(g if g is not None else empty.clone() for g in (dx, dw, db))


@_bwd_op.register_fake
def _(dy, x, weight, need_dx, need_dw, need_db, impl):
    empty = lambda: x.new_empty(0)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_CL) if need_dx else empty()
    dw = weight.new_empty(weight.shape) if need_dw else empty()
    db = weight.new_empty((weight.shape[0],)) if need_db else empty()
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, impl = inputs
    y, mean, _ = output
    # Unused outputs' gradients arrive as None (not zeros): the statistics' gradient pass runs only when needed.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, y, mean)
    ctx.has_bias = bias is not None
    ctx.impl = impl


def _backward(ctx, dy, d_mean, d_var):
    x, weight, y, mean = ctx.saved_tensors
    if d_mean is not None or d_var is not None:
        # d mean / dy = 1 / n and d var / dy = 2 (y - mean) / n per channel (the mean's own dependence on y drops
        # out: the deviations sum to zero); summed in fp32 (the op casts to x's dtype).
        n = y.numel() // y.shape[1]
        dy = torch.zeros(y.shape, device=y.device) if dy is None else dy.float()
        if d_mean is not None:
            dy = dy + (d_mean / n).view(1, -1, 1, 1, 1)
        if d_var is not None:
            dy = dy + (y.float() - mean.view(1, -1, 1, 1, 1)) * (2 * d_var / n).view(1, -1, 1, 1, 1)
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    if dy is None or not (need_dx or need_dw or need_db):
        return None, None, None, None
    dx, dw, db = torch.ops.pcrlv2.conv3d_bn_stats_bwd(dy, x, weight, need_dx, need_dw, need_db, ctx.impl)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None


torch.library.register_autograd("pcrlv2::conv3d_bn_stats_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- public
def conv3d_bn_stats(x: Tensor, weight: Tensor, bias: Tensor | None = None, impl: str = "auto"
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """y = conv3d(x, weight, bias, padding=1) and the fp32 per-channel mean and biased variance of y over N*D*H*W.

    x: (N, C_in, D, H, W) fp32/bf16/fp16 in any memory format (converted to channels_last_3d); weight
    (C_out, C_in, 3, 3, 3); bias (C_out,) or None. weight and bias are cast to x's dtype (the compute dtype);
    under autocast everything is first cast to the autocast dtype, as torch does for convolutions.
    Returns y (N, C_out, D, H, W) channels_last_3d in the compute dtype, and mean, var (C_out,) fp32, var being
    the biased variance (divided by N*D*H*W; a running variance wants var * n / (n - 1)): with impl "triton"
    the statistics of the fp32 accumulator before y is rounded to a low-precision dtype (per-tile mean and M2
    merged by Chan's formula), with "torch" those of the rounded y (torch.var_mean in fp32). All three outputs
    are differentiable (grads for x, weight, bias).
    impl: "triton", "torch" (F.conv3d: cuDNN on GPU) or "auto" (per-shape measured choice on CUDA, torch on CPU).
    """
    if x.dim() != 5:
        raise ValueError(f"expected x of shape (N, C_in, D, H, W), got {tuple(x.shape)}")
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    x = _cl(x)
    weight = weight.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return torch.ops.pcrlv2.conv3d_bn_stats_fwd(x, weight, bias, impl)
