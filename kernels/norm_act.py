"""Fused normalisation + activation for the 3D conv blocks, forward and backward, as Triton kernels.

``bn_act3d`` is training/eval BatchNorm3d and ``gn_act3d`` is GroupNorm (InstanceNorm3d = one group per
channel), each followed by ReLU, ELU(alpha=1), PReLU (one weight or one per channel), sigmoid (the
deep-supervision heads) or nothing. Both are autograd-aware and go through ``torch.library`` custom ops
(``pcrlv2::bn_act3d_fwd``/``_bwd``, ``pcrlv2::gn_act3d_fwd``/``_bwd``) with fake (meta) implementations,
so torch.compile traces them without graph breaks.

Every kernel sees x as (N, C, S), S = D*H*W, in one of two dense layouts: NCDHW (s has unit stride) or
NDHWC = channels_last_3d (c has unit stride); any other strides are first copied into the nearer one, and
the output keeps the layout. A program works on tiles [BLOCK_S, BLOCK_C] of one sample: Triton coalesces
along whichever axis has unit stride, so one kernel serves both layouts with a tile that is long in s
(NCDHW) or wide in c (NDHWC).

Passes over the big tensors (statistics and all accumulation in fp32; y and dx in the input dtype):
- forward: (1) read x -> per-(sample, split, channel) partial count/mean/M2; (2) a small combine (Chan's
  parallel merge: no E[x^2]-E[x]^2 cancellation) -> mean, rstd per channel (BN) or per (sample, group)
  (GN), and BN's updated running stats (copied into the buffers by bn_act3d); (3) read x, write
  y = act((x - mean) * rstd * w + b).
- backward: (1) read x, dy -> partial sums of g = dL/dz, g * xhat (and dy * z for PReLU's weight);
  (2) a small sum; (3) read x, dy again, write dx. z is recomputed from x rather than stored.
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting as _interpreting
from .common import chan_merge as _chan_merge
from .common import device_guard, num_sms
from .common import to_out as _to_out

ACT_CODES = {"none": 0, "relu": 1, "elu": 2, "prelu": 3, "sigmoid": 4}
_PRELU = ACT_CODES["prelu"]


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _act_fwd(z, a, ACT: tl.constexpr):
    # z: fp32 pre-activation tile; a: PReLU weight (broadcastable), ignored by the other activations.
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        # min(z, 0) keeps exp finite on the branch that tl.where discards.
        z = tl.where(z > 0, z, tl.exp(tl.minimum(z, 0.0)) - 1.0)
    elif ACT == 3:
        z = tl.where(z > 0, z, a * z)
    elif ACT == 4:
        z = 1.0 / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _act_grad(dy, z, a, ACT: tl.constexpr):
    # dL/dz from dL/dy; the z > 0 conventions at z == 0 are torch's (relu/prelu/elu all use the slope left of 0).
    if ACT == 1:
        g = tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, dy, dy * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == 3:
        g = tl.where(z > 0, dy, dy * a)
    elif ACT == 4:
        sig = 1.0 / (1.0 + tl.exp(-z))
        g = dy * sig * (1.0 - sig)
    else:
        g = dy
    return g


@triton.jit
def _tile(n, s, c, S, C, CHANNELS_LAST: tl.constexpr):
    # Element offsets and mask of the tile (s[:, None], c[None, :]) of sample n. The sample base is int64
    # (N*C*S can pass 2**31); offsets inside one sample stay int32 (the launcher checks C*S < 2**31).
    base = n.to(tl.int64) * S * C
    if CHANNELS_LAST:
        off = base + s[:, None] * C + c[None, :]
    else:
        off = base + c[None, :] * S + s[:, None]
    mask = (s < S)[:, None] & (c < C)[None, :]
    return off, mask


@triton.jit
def _channel_params(c, n, Mean_ptr, Rstd_ptr, W_ptr, B_ptr, A_ptr, a_stride, C, G, CG,
                    GROUPED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    # Per-channel vectors [BLOCK_C] for the tile: mean, rstd (indexed by channel for BN, by (n, group) for GN),
    # scale = rstd * w, bias, PReLU weight.
    mc = c < C
    if GROUPED:
        sidx = n * G + c // CG
    else:
        sidx = c
    mean = tl.load(Mean_ptr + sidx, mask=mc, other=0.0)
    rstd = tl.load(Rstd_ptr + sidx, mask=mc, other=0.0)
    scale = rstd
    if HAS_W:
        scale = rstd * tl.load(W_ptr + c, mask=mc, other=0.0).to(tl.float32)
    b = tl.zeros_like(mean)
    if HAS_B:
        b = tl.load(B_ptr + c, mask=mc, other=0.0).to(tl.float32)
    a = tl.zeros_like(mean)
    if ACT == 3:
        # a_stride is 1 for one weight per channel, 0 for a single shared weight.
        a = tl.load(A_ptr + c * a_stride, mask=mc, other=0.0).to(tl.float32)
    return sidx, mean, rstd, scale, b, a


@triton.jit
def _stats_kernel(
    X_ptr,  # (N, C, S) input in the layout given by CHANNELS_LAST
    P_ptr,  # (3, N * NSPLIT, C) fp32 partials: count, mean, M2
    S, C,
    NSPLIT,  # programs per (sample, channel block) along s
    SPAN,  # voxels per split, a multiple of BLOCK_S
    P_plane,  # N * NSPLIT * C
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    n = row // NSPLIT
    s_lo = (row % NSPLIT) * SPAN
    s_hi = tl.minimum(s_lo + SPAN, S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cnt_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Loop over the split's tiles: per tile an exact mean and M2 (deviations from the tile mean), merged
    # into the running per-channel (count, mean, M2) by Chan's formula, so no large sums of squares form.
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        off, mask = _tile(n, s, c, S, C, CHANNELS_LAST)
        x = tl.load(X_ptr + off, mask=mask, other=0.0).to(tl.float32)
        cnt_b = tl.minimum(s_hi - s0, BLOCK_S).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / cnt_b
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        cnt = cnt_a + cnt_b
        frac = cnt_b / cnt
        delta = mean_b - mean_a
        mean_a += delta * frac
        m2_a += m2_b + delta * delta * cnt_a * frac
        cnt_a = cnt
    mc = c < C
    p = P_ptr + row * C + c
    tl.store(p, cnt_a, mask=mc)
    tl.store(p + P_plane, mean_a, mask=mc)
    tl.store(p + 2 * P_plane, m2_a, mask=mc)


@triton.jit
def _partial_offsets(k, j, KG, sk0, sk1, JI, sj0, sj1):
    # Partials are addressed as key k (one output statistic) x item j (one partial to fold in):
    # offset = (k // KG) * sk0 + (k % KG) * sk1 + (j // JI) * sj0 + (j % JI) * sj1. BatchNorm: keys are
    # channels, items are (sample, split) rows; GroupNorm: keys are (sample, group), items (split, channel).
    kbase = (k // KG) * sk0 + (k % KG) * sk1
    jbase = (j // JI) * sj0 + (j % JI) * sj1
    return jbase[:, None] + kbase[None, :]


@triton.jit
def _combine_kernel(
    P_ptr,  # (3, ...) fp32 partials from _stats_kernel: count, mean, M2
    Mean_ptr, Rstd_ptr,  # (K,) fp32 outputs
    RM_ptr, RV_ptr,  # (K,) running mean / variance, read when UPDATE_RUNNING
    RM_out_ptr, RV_out_ptr,  # (K,) their updated values, written when UPDATE_RUNNING
    K, J, P_plane, KG, sk0, sk1, JI, sj0, sj1,
    eps, momentum,
    UPDATE_RUNNING: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = k < K
    n_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    mean_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        off = _partial_offsets(k, j, KG, sk0, sk1, JI, sj0, sj1)
        m = (j < J)[:, None] & mk[None, :]
        cnt = tl.load(P_ptr + off, mask=m, other=0.0)
        mu = tl.load(P_ptr + P_plane + off, mask=m, other=0.0)
        q = tl.load(P_ptr + 2 * P_plane + off, mask=m, other=0.0)
        # Fold BLOCK_J partials at once (M2 about their joint mean), then merge into the running triple.
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, cnt, mu, q, m)
    rstd = 1.0 / tl.sqrt(m2_a / tl.maximum(n_a, 1.0) + eps)
    tl.store(Mean_ptr + k, mean_a, mask=mk)
    tl.store(Rstd_ptr + k, rstd, mask=mk)
    if UPDATE_RUNNING:
        # torch's rule: the running variance takes the unbiased batch variance; math in fp32, stored in the
        # buffers' own dtype.
        rm = tl.load(RM_ptr + k, mask=mk, other=0.0).to(tl.float32)
        rv = tl.load(RV_ptr + k, mask=mk, other=0.0).to(tl.float32)
        var_unbiased = m2_a / tl.maximum(n_a - 1.0, 1.0)
        tl.store(RM_out_ptr + k, ((1.0 - momentum) * rm + momentum * mean_a).to(RM_out_ptr.dtype.element_ty), mask=mk)
        tl.store(RV_out_ptr + k, ((1.0 - momentum) * rv + momentum * var_unbiased).to(RV_out_ptr.dtype.element_ty),
                 mask=mk)


@triton.jit
def _apply_kernel(
    X_ptr, Y_ptr,  # (N, C, S) input and output, same layout
    Mean_ptr, Rstd_ptr,  # (C,) for BN or (N, G) for GN, fp32
    W_ptr, B_ptr,  # (C,) affine weight and bias (read only when HAS_W / HAS_B)
    A_ptr, a_stride,  # PReLU weight, (C,) with stride 1 or (1,) with stride 0
    S, C, NSB, G, CG,  # NSB: s-blocks per sample; G groups of CG channels (GROUPED only)
    GROUPED: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    n = row // NSB
    s = (row % NSB) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    _, mean, rstd, scale, b, a = _channel_params(c, n, Mean_ptr, Rstd_ptr, W_ptr, B_ptr, A_ptr, a_stride, C, G, CG,
                                                 GROUPED, HAS_W, HAS_B, ACT)
    off, mask = _tile(n, s, c, S, C, CHANNELS_LAST)
    x = tl.load(X_ptr + off, mask=mask, other=0.0).to(tl.float32)
    # Subtract the mean before scaling: x * scale + (b - mean * scale) would cancel for large offsets (CT HU).
    z = (x - mean[None, :]) * scale[None, :] + b[None, :]
    y = _act_fwd(z, a[None, :], ACT)
    tl.store(Y_ptr + off, _to_out(y, Y_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


@triton.jit
def _bwd_reduce_kernel(
    X_ptr, DY_ptr,  # (N, C, S), same layout
    P_ptr,  # (3, N * NSPLIT, C) fp32 partials: sum g, sum g * xhat, sum of dy * z where z <= 0 (PReLU)
    Mean_ptr, Rstd_ptr, W_ptr, B_ptr, A_ptr, a_stride,  # as in _apply_kernel
    S, C, NSPLIT, SPAN, P_plane, G, CG,
    GROUPED: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    n = row // NSPLIT
    s_lo = (row % NSPLIT) * SPAN
    s_hi = tl.minimum(s_lo + SPAN, S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    _, mean, rstd, scale, b, a = _channel_params(c, n, Mean_ptr, Rstd_ptr, W_ptr, B_ptr, A_ptr, a_stride, C, G, CG,
                                                 GROUPED, HAS_W, HAS_B, ACT)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        off, mask = _tile(n, s, c, S, C, CHANNELS_LAST)
        x = tl.load(X_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + off, mask=mask, other=0.0).to(tl.float32)
        # Masked lanes have dy == 0, hence g == 0: they add nothing to the sums.
        xc = x - mean[None, :]
        z = xc * scale[None, :] + b[None, :]
        g = _act_grad(dy, z, a[None, :], ACT)
        acc_g += tl.sum(g, axis=0)
        acc_gx += tl.sum(g * (xc * rstd[None, :]), axis=0)
        if ACT == 3:
            acc_a += tl.sum(tl.where(z > 0, 0.0, dy * z), axis=0)
    mc = c < C
    p = P_ptr + row * C + c
    tl.store(p, acc_g, mask=mc)
    tl.store(p + P_plane, acc_gx, mask=mc)
    if ACT == 3:
        tl.store(p + 2 * P_plane, acc_a, mask=mc)


@triton.jit
def _sum_kernel(
    P_ptr,  # (Q, ...) fp32 partials, planes P_plane apart
    Out_ptr,  # (Q, K) fp32 sums
    K, J, P_plane, KG, sk0, sk1, JI, sj0, sj1,  # addressing as in _partial_offsets
    BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    q = tl.program_id(1)
    mk = k < K
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        off = _partial_offsets(k, j, KG, sk0, sk1, JI, sj0, sj1)
        m = (j < J)[:, None] & mk[None, :]
        acc += tl.sum(tl.load(P_ptr + q * P_plane + off, mask=m, other=0.0), axis=0)
    tl.store(Out_ptr + q * K + k, acc, mask=mk)


@triton.jit
def _bwd_dx_kernel(
    X_ptr, DY_ptr, DX_ptr,  # (N, C, S), same layout
    Mean_ptr, Rstd_ptr,  # (C,) or (N, G) fp32
    K1_ptr, K2_ptr,  # same shape: dx = rstd * (w * g - k1 - xhat * k2); read only when BATCH_STATS
    W_ptr, B_ptr, A_ptr, a_stride,
    S, C, NSB, G, CG,
    GROUPED: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, BATCH_STATS: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    n = row // NSB
    s = (row % NSB) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    sidx, mean, rstd, scale, b, a = _channel_params(c, n, Mean_ptr, Rstd_ptr, W_ptr, B_ptr, A_ptr, a_stride, C, G,
                                                    CG, GROUPED, HAS_W, HAS_B, ACT)
    off, mask = _tile(n, s, c, S, C, CHANNELS_LAST)
    x = tl.load(X_ptr + off, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY_ptr + off, mask=mask, other=0.0).to(tl.float32)
    xc = x - mean[None, :]
    z = xc * scale[None, :] + b[None, :]
    g = _act_grad(dy, z, a[None, :], ACT)
    dx = g * scale[None, :]
    if BATCH_STATS:
        # The statistics depend on x: subtract the projections onto 1 and xhat (k1, k2 carry w and 1/M).
        mc = c < C
        k1 = tl.load(K1_ptr + sidx, mask=mc, other=0.0)
        k2 = tl.load(K2_ptr + sidx, mask=mc, other=0.0)
        dx -= (k1[None, :] + xc * (rstd * k2)[None, :]) * rstd[None, :]
    tl.store(DX_ptr + off, _to_out(dx, DX_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


# ------------------------------------------------------------------------------------------- launchers
def _tile_config(S: int, C: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, num_warps): about 4096 elements per tile on a GPU (16 KiB of fp32 per load, enough
    to keep HBM busy), long along the unit-stride axis; 256 under the interpreter, so the tests' small
    shapes still cover several blocks and partial (masked) tiles."""
    tile, max_c = (256, 16) if _interpreting() else (4096, 64)
    if channels_last:
        block_c = min(triton.next_power_of_2(C), max_c)
        block_s = min(max(tile // block_c, 1), triton.next_power_of_2(S))
    else:
        block_s = min(triton.next_power_of_2(S), tile)
        block_c = min(max(tile // block_s, 1), triton.next_power_of_2(C))
    return block_s, block_c, (8 if block_s * block_c >= 4096 else 4)


def _splits(x: Tensor, N: int, ncb: int, nsb: int) -> tuple[int, int]:
    """(NSPLIT, blocks per split) for the reduction kernels: enough programs to fill the GPU (about four per
    SM) while each loops over as many tiles as possible, so the partials stay tiny."""
    target = 4 if _interpreting() else 4 * num_sms(x, cpu=1)
    nsplit = max(1, min(nsb, triton.cdiv(target, N * ncb)))
    per_split = triton.cdiv(nsb, nsplit)
    return triton.cdiv(nsb, per_split), per_split


def _small_blocks(K: int, J: int) -> tuple[int, int]:
    cap = 16 if _interpreting() else 64
    return min(triton.next_power_of_2(K), 64), min(triton.next_power_of_2(max(J, 1)), cap)


def _round_bf16(out: Tensor) -> bool:
    return _interpreting() and out.dtype == torch.bfloat16


def _is_channels_last(x: Tensor) -> bool:
    """True when x is (or is nearer to) the channels-last layout; dense NCDHW (including ambiguous C == 1)
    counts as NCDHW."""
    if x.is_contiguous():
        return False
    if x.movedim(1, -1).is_contiguous():
        return True
    spatial = [x.stride(d) for d in range(2, x.dim()) if x.shape[d] > 1]
    return bool(spatial) and x.stride(1) < min(spatial)


def _as_layout(x: Tensor) -> tuple[Tensor, bool]:
    """x made dense in NCDHW or NDHWC (whichever it is nearer to, NCDHW when neither) and that choice."""
    if _is_channels_last(x):
        return x.movedim(1, -1).contiguous().movedim(-1, 1), True
    return x.contiguous(), False


def _check_inputs(x: Tensor, weight, bias, prelu_weight, act: str) -> None:
    if act not in ACT_CODES:
        raise ValueError(f"act must be one of {tuple(ACT_CODES)}, got {act!r}")
    if x.dim() < 3:
        raise ValueError(f"expected x of shape (N, C, *spatial), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"empty input {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not (x.is_cuda or _interpreting()):
        raise RuntimeError("norm_act kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                           "use the torch reference (kernels='torch') instead")
    C = x.shape[1]
    if x[0].numel() >= 2**31:
        raise ValueError(f"one sample of {x[0].numel()} elements exceeds the kernels' int32 offsets")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
    if act == "prelu":
        if prelu_weight is None or prelu_weight.numel() not in (1, C):
            raise ValueError(f"prelu needs prelu_weight with 1 or {C} elements")


def _dims(x: Tensor) -> tuple[int, int, int]:
    N, C = x.shape[0], x.shape[1]
    return N, C, x.numel() // (N * C)


def _common_args(x: Tensor, weight, bias, prelu_weight):
    """Pointer stand-ins (x) for absent tensors, the PReLU weight stride and the HAS_W/HAS_B flags."""
    a_stride = 1 if prelu_weight is not None and prelu_weight.numel() > 1 else 0
    return (weight if weight is not None else x, bias if bias is not None else x,
            prelu_weight if prelu_weight is not None else x, a_stride, weight is not None, bias is not None)


def _launch_stats(xc: Tensor, cl: bool) -> tuple[Tensor, int]:
    """Per-(sample, split, channel) partial (count, mean, M2) of xc: ((3, N * NSPLIT, C) fp32, NSPLIT)."""
    N, C, S = _dims(xc)
    block_s, block_c, warps = _tile_config(S, C, cl)
    ncb, nsb = triton.cdiv(C, block_c), triton.cdiv(S, block_s)
    nsplit, per_split = _splits(xc, N, ncb, nsb)
    part = torch.empty((3, N * nsplit, C), device=xc.device, dtype=torch.float32)
    _stats_kernel[(N * nsplit, ncb)](xc, part, S, C, nsplit, per_split * block_s, part[0].numel(),
                                     CHANNELS_LAST=cl, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return part, nsplit


def _key_item(N: int, C: int, nsplit: int, groups: int | None, per_sample: bool = False):
    """(K, J, KG, sk0, sk1, JI, sj0, sj1) addressing partials (Q, N * nsplit, C) for _partial_offsets.

    groups None: keys are channels (BatchNorm), items all (sample, split) rows, or, with per_sample, keys
    are (sample, channel) and items the splits. groups G: keys (sample, group), items (split, channel in group).
    """
    if groups is not None:
        cg = C // groups
        return N * groups, nsplit * cg, groups, nsplit * C, cg, cg, C, 1
    if per_sample:
        return N * C, nsplit, C, nsplit * C, 1, 1, C, 0
    return C, N * nsplit, C, 0, 1, 1, C, 0


def _launch_combine(part, N, C, nsplit, groups, eps, running=None, momentum=0.0):
    """mean, rstd (fp32) from the partials; running = (running_mean, running_var, new_mean, new_var) asks for
    the running-stat update, written into the last two."""
    K, J, *addr = _key_item(N, C, nsplit, groups)
    mean = torch.empty(K, device=part.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_k, block_j = _small_blocks(K, J)
    _combine_kernel[(triton.cdiv(K, block_k),)](
        part, mean, rstd, *(running or (mean,) * 4), K, J, part[0].numel(), *addr, eps, momentum,
        UPDATE_RUNNING=running is not None, BLOCK_K=block_k, BLOCK_J=block_j)
    return mean, rstd


def _launch_apply(xc, cl, mean, rstd, weight, bias, prelu_weight, act, groups):
    N, C, S = _dims(xc)
    block_s, block_c, warps = _tile_config(S, C, cl)
    y = torch.empty_like(xc)
    w, b, a, a_stride, has_w, has_b = _common_args(xc, weight, bias, prelu_weight)
    nsb = triton.cdiv(S, block_s)
    G = groups or 1
    _apply_kernel[(N * nsb, triton.cdiv(C, block_c))](
        xc, y, mean, rstd, w, b, a, a_stride, S, C, nsb, G, C // G,
        GROUPED=groups is not None, CHANNELS_LAST=cl, HAS_W=has_w, HAS_B=has_b, ACT=ACT_CODES[act],
        ROUND_BF16=_round_bf16(y), BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return y


def _bwd_layout(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(x, dy, channels_last): x dense in its nearer layout, dy in the same (it may arrive in another layout, e.g.
    contiguous grads of a channels-last output)."""
    xc, cl = _as_layout(x)
    dyc = dy.movedim(1, -1).contiguous().movedim(-1, 1) if cl else dy.contiguous()
    return xc, dyc, cl


def _bwd_setup(xc, cl, weight, bias, prelu_weight, act, groups):
    """What both backward launches share: sizes, tiles, parameter pointers and flags."""
    N, C, S = _dims(xc)
    block_s, block_c, warps = _tile_config(S, C, cl)
    ncb, nsb = triton.cdiv(C, block_c), triton.cdiv(S, block_s)
    w, b, a, a_stride, has_w, has_b = _common_args(xc, weight, bias, prelu_weight)
    flags = dict(GROUPED=groups is not None, CHANNELS_LAST=cl, HAS_W=has_w, HAS_B=has_b, ACT=ACT_CODES[act],
                 BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return N, C, S, ncb, nsb, (w, b, a, a_stride), groups or 1, flags


def _launch_bwd_sums(xc, dyc, cl, weight, bias, prelu_weight, mean, rstd, act, groups):
    """Per-channel sums (3, C) of g, g*xhat and the PReLU term (BN), or per (sample, channel) (3, N, C) (GN)."""
    N, C, S, ncb, nsb, params, G, flags = _bwd_setup(xc, cl, weight, bias, prelu_weight, act, groups)
    nsplit, per_split = _splits(xc, N, ncb, nsb)
    block_s = flags["BLOCK_S"]
    part = torch.empty((3, N * nsplit, C), device=xc.device, dtype=torch.float32)
    _bwd_reduce_kernel[(N * nsplit, ncb)](
        xc, dyc, part, mean, rstd, *params, S, C, nsplit, per_split * block_s, part[0].numel(), G, C // G, **flags)
    # GroupNorm needs per-(sample, channel) sums (its dx mixes the channels of a group within a sample).
    K, J, *addr = _key_item(N, C, nsplit, None, per_sample=groups is not None)
    q = 3 if act == "prelu" else 2
    sums = torch.zeros((3, K), device=xc.device, dtype=torch.float32)
    block_k, block_j = _small_blocks(K, J)
    _sum_kernel[(triton.cdiv(K, block_k), q)](part, sums, K, J, part[0].numel(), *addr,
                                              BLOCK_K=block_k, BLOCK_J=block_j)
    return sums.view(3, N, C) if groups is not None else sums


def _launch_bwd_dx(xc, dyc, cl, weight, bias, prelu_weight, mean, rstd, act, groups, k1, k2, batch_stats):
    """dx = rstd * (w * g - k1 - xhat * k2) (batch statistics) or rstd * w * g (fixed statistics)."""
    N, C, S, ncb, nsb, params, G, flags = _bwd_setup(xc, cl, weight, bias, prelu_weight, act, groups)
    dx = torch.empty_like(xc)
    _bwd_dx_kernel[(N * nsb, ncb)](
        xc, dyc, dx, mean, rstd, k1, k2, *params, S, C, nsb, G, C // G, **flags, BATCH_STATS=batch_stats,
        ROUND_BF16=_round_bf16(dx))
    return dx


def _dx_coefficients(sums: Tensor, weight, count: int, groups, N: int, C: int, S: int) -> tuple[Tensor, Tensor]:
    """(k1, k2) of the batch-statistics dx from the sums: w * sum(g) / count and w * sum(g * xhat) / count per
    channel (BN, over ``count`` values per channel), or per (sample, group) (GN)."""
    wf = weight.float() if weight is not None else torch.ones(C, device=sums.device)
    if groups is None:
        return (wf * sums[0] / count).contiguous(), (wf * sums[1] / count).contiguous()
    M = (C // groups) * S
    k1 = (wf * sums[0]).view(N, groups, -1).sum(-1).reshape(-1) / M
    k2 = (wf * sums[1]).view(N, groups, -1).sum(-1).reshape(-1) / M
    return k1.contiguous(), k2.contiguous()


def _launch_backward(dy, x, weight, bias, prelu_weight, mean, rstd, act, groups, batch_stats, param_grads):
    """dx and the per-channel sums (3, C) of g, g*xhat, PReLU (BN) or (3, N, C) (GN); sums None if unused."""
    xc, dyc, cl = _bwd_layout(dy, x)
    N, C, S = _dims(xc)
    sums = None
    if batch_stats or param_grads:
        sums = _launch_bwd_sums(xc, dyc, cl, weight, bias, prelu_weight, mean, rstd, act, groups)
    k1 = k2 = mean
    if batch_stats:
        k1, k2 = _dx_coefficients(sums, weight, N * S, groups, N, C, S)
    return _launch_bwd_dx(xc, dyc, cl, weight, bias, prelu_weight, mean, rstd, act, groups, k1, k2, batch_stats), sums


def bn_act3d_backward_reduced(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                              prelu_weight: Tensor | None, mean: Tensor, rstd: Tensor, act: str,
                              reduce_sums: Callable[[Tensor], Tensor], count: int):
    """The batch-statistics backward of ``bn_act3d`` when the statistics covered more than this ``x``: the
    per-channel sums of g and g*xhat go through ``reduce_sums`` (e.g. an all-reduce over the processes of a
    synchronised batch norm) and are divided by ``count``, the values per channel behind ``mean``/``rstd``.
    Returns (dx, dweight, dbias, dprelu) with the parameter gradients from this process's own sums (data
    parallelism averages those afterwards)."""
    with device_guard(x):
        xc, dyc, cl = _bwd_layout(dy, x)
        N, C, S = _dims(xc)
        sums = _launch_bwd_sums(xc, dyc, cl, weight, bias, prelu_weight, mean, rstd, act, None)
        k1, k2 = _dx_coefficients(reduce_sums(sums[:2].clone()), weight, count, None, N, C, S)
        dx = _launch_bwd_dx(xc, dyc, cl, weight, bias, prelu_weight, mean, rstd, act, None, k1, k2, True)
        return (dx, *_param_grads(sums, weight, bias, prelu_weight, act, True, x))


def _param_grads(sums, weight, bias, prelu_weight, act, param_grads: bool, x: Tensor):
    """(dweight, dbias, dprelu) from per-channel sums; empty tensors stand for absent or unneeded grads. Each
    is a fresh tensor: a custom op's outputs may not alias one another."""
    empty = lambda: x.new_empty(0, dtype=torch.float32)
    if not param_grads:
        return empty(), empty(), empty()
    if sums.dim() == 3:  # GroupNorm: (3, N, C) -> (3, C)
        sums = sums.sum(1)
    dw = sums[1].to(weight.dtype, copy=True) if weight is not None else empty()
    db = sums[0].to(bias.dtype, copy=True) if bias is not None else empty()
    da = empty()
    if act == "prelu":
        da = (sums[2] if prelu_weight.numel() > 1 else sums[2].sum()).reshape(prelu_weight.shape)
        da = da.to(prelu_weight.dtype, copy=True)
    return dw, db, da


# The forward op is functional (autograd formulas attach only to functional ops): it returns the updated running
# stats and bn_act3d copies them into the buffers, a plain in-place copy that torch.compile functionalizes.
@torch.library.custom_op("pcrlv2::bn_act3d_fwd", mutates_args=())
def _bn_fwd_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
               running_var: Tensor | None, prelu_weight: Tensor | None, training: bool, momentum: float,
               eps: float, act: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, new_running_mean, new_running_var): y in x's dtype and layout; mean/rstd (C,) fp32, the
    statistics y was normalised with; the new running stats are empty unless training with running stats."""
    _check_inputs(x, weight, bias, prelu_weight, act)
    xc, cl = _as_layout(x)
    N, C, S = _dims(xc)
    update = training and running_mean is not None
    new_rm, new_rv = _new_running(x, running_mean, running_var, update)
    with device_guard(xc):
        if training or running_mean is None:
            if N * S < 2 and training:
                raise ValueError(f"expected more than 1 value per channel when training, got input {tuple(x.shape)}")
            part, nsplit = _launch_stats(xc, cl)
            running = (running_mean, running_var, new_rm, new_rv) if update else None
            mean, rstd = _launch_combine(part, N, C, nsplit, None, eps, running, momentum)
        else:
            mean = running_mean.to(torch.float32, copy=True)
            rstd = torch.rsqrt(running_var.float() + eps)
        y = _launch_apply(xc, cl, mean, rstd, weight, bias, prelu_weight, act, None)
    return y, mean, rstd, new_rm, new_rv


def _new_running(x, running_mean, running_var, update: bool) -> tuple[Tensor, Tensor]:
    if update:
        return torch.empty_like(running_mean), torch.empty_like(running_var)
    empty = x.new_empty(0, dtype=torch.float32)
    return empty, torch.empty_like(empty)


@_bn_fwd_op.register_fake
def _(x, weight, bias, running_mean, running_var, prelu_weight, training, momentum, eps, act):
    xc, _ = _as_layout(x)
    stat = x.new_empty((x.shape[1],), dtype=torch.float32)
    update = training and running_mean is not None
    return (torch.empty_like(xc), stat, torch.empty_like(stat), *_new_running(x, running_mean, running_var, update))


@torch.library.custom_op("pcrlv2::bn_act3d_bwd", mutates_args=())
def _bn_bwd_op(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, prelu_weight: Tensor | None,
               mean: Tensor, rstd: Tensor, batch_stats: bool, act: str, param_grads: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dprelu); a grad is an empty tensor when its parameter is absent or not asked for."""
    with device_guard(x):
        dx, sums = _launch_backward(dy, x, weight, bias, prelu_weight, mean, rstd, act, None, batch_stats,
                                    param_grads)
        return (dx, *_param_grads(sums, weight, bias, prelu_weight, act, param_grads, x))


def _fake_param_grads(x, weight, bias, prelu_weight, act, param_grads):
    empty = lambda: x.new_empty(0, dtype=torch.float32)
    if not param_grads:
        return empty(), empty(), empty()
    return (torch.empty_like(weight) if weight is not None else empty(),
            torch.empty_like(bias) if bias is not None else empty(),
            torch.empty_like(prelu_weight) if act == "prelu" else empty())


@_bn_bwd_op.register_fake
def _(dy, x, weight, bias, prelu_weight, mean, rstd, batch_stats, act, param_grads):
    xc, _ = _as_layout(x)
    return (torch.empty_like(xc), *_fake_param_grads(x, weight, bias, prelu_weight, act, param_grads))


# Positions of (x, weight, bias, prelu_weight) among the forward ops' inputs.
_BN_GRAD_INPUTS = (0, 1, 2, 5)
_GN_GRAD_INPUTS = (0, 1, 2, 3)


def _needs_param_grads(ctx, positions) -> bool:
    return any(ctx.needs_input_grad[i] for i in positions[1:])


def _grads_out(ctx, positions, grads) -> dict:
    """{input position: grad} for the inputs that are tensors and need a grad (the rest get None)."""
    saved = list(ctx.saved_tensors[:4])
    if ctx.act != "prelu":
        saved[3] = None  # prelu_weight is unused by the other activations: no grad
    return {i: g for i, g, t in zip(positions, grads, saved, strict=True) if t is not None and ctx.needs_input_grad[i]}


def _bn_setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, _, prelu_weight, training, _, _, act = inputs
    _, mean, rstd, new_rm, new_rv = output
    ctx.mark_non_differentiable(mean, rstd, new_rm, new_rv)
    ctx.save_for_backward(x, weight, bias, prelu_weight, mean, rstd)
    ctx.batch_stats = training or running_mean is None
    ctx.act = act


def _bn_backward(ctx, dy, *_):
    x, weight, bias, prelu_weight, mean, rstd = ctx.saved_tensors
    grads = torch.ops.pcrlv2.bn_act3d_bwd(dy, x, weight, bias, prelu_weight, mean, rstd, ctx.batch_stats, ctx.act,
                                          _needs_param_grads(ctx, _BN_GRAD_INPUTS))
    out = _grads_out(ctx, _BN_GRAD_INPUTS, grads)
    return tuple(out.get(i) for i in range(10))


torch.library.register_autograd("pcrlv2::bn_act3d_fwd", _bn_backward, setup_context=_bn_setup_context)


@torch.library.custom_op("pcrlv2::gn_act3d_fwd", mutates_args=())
def _gn_fwd_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, prelu_weight: Tensor | None,
               num_groups: int, eps: float, act: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y in x's dtype and layout, mean/rstd (N * num_groups,) fp32."""
    _check_inputs(x, weight, bias, prelu_weight, act)
    xc, cl = _as_layout(x)
    N, C, _ = _dims(xc)
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of channels ({C})")
    with device_guard(xc):
        part, nsplit = _launch_stats(xc, cl)
        mean, rstd = _launch_combine(part, N, C, nsplit, num_groups, eps)
        y = _launch_apply(xc, cl, mean, rstd, weight, bias, prelu_weight, act, num_groups)
    return y, mean, rstd


@_gn_fwd_op.register_fake
def _(x, weight, bias, prelu_weight, num_groups, eps, act):
    xc, _ = _as_layout(x)
    stat = x.new_empty((x.shape[0] * num_groups,), dtype=torch.float32)
    return torch.empty_like(xc), stat, torch.empty_like(stat)


@torch.library.custom_op("pcrlv2::gn_act3d_bwd", mutates_args=())
def _gn_bwd_op(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, prelu_weight: Tensor | None,
               mean: Tensor, rstd: Tensor, num_groups: int, act: str, param_grads: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dprelu); a grad is an empty tensor when its parameter is absent or not asked for."""
    with device_guard(x):
        dx, sums = _launch_backward(dy, x, weight, bias, prelu_weight, mean, rstd, act, num_groups, True,
                                    param_grads)
        return (dx, *_param_grads(sums, weight, bias, prelu_weight, act, param_grads, x))


@_gn_bwd_op.register_fake
def _(dy, x, weight, bias, prelu_weight, mean, rstd, num_groups, act, param_grads):
    xc, _ = _as_layout(x)
    return (torch.empty_like(xc), *_fake_param_grads(x, weight, bias, prelu_weight, act, param_grads))


def _gn_setup_context(ctx, inputs, output):
    x, weight, bias, prelu_weight, num_groups, _, act = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, prelu_weight, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act


def _gn_backward(ctx, dy, *_):
    x, weight, bias, prelu_weight, mean, rstd = ctx.saved_tensors
    grads = torch.ops.pcrlv2.gn_act3d_bwd(dy, x, weight, bias, prelu_weight, mean, rstd, ctx.num_groups, ctx.act,
                                          _needs_param_grads(ctx, _GN_GRAD_INPUTS))
    out = _grads_out(ctx, _GN_GRAD_INPUTS, grads)
    return tuple(out.get(i) for i in range(7))


torch.library.register_autograd("pcrlv2::gn_act3d_fwd", _gn_backward, setup_context=_gn_setup_context)


# --------------------------------------------------------------------------------------------- public
def bn_act3d(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
             running_var: Tensor | None, training: bool, momentum: float | None, eps: float, act: str,
             prelu_weight: Tensor | None = None) -> Tensor:
    """act(batch_norm(x)) like ``F.batch_norm`` followed by the activation, in one fused pass each way.

    x: (N, C, *spatial) fp32/bf16/fp16, NCDHW or channels_last_3d (other strides are copied into the nearer
    of the two); y has x's dtype and layout. weight/bias: (C,) or None. act: "none", "relu", "elu" (alpha 1),
    "prelu" (prelu_weight of 1 or C elements) or "sigmoid". training: batch statistics, and when running
    stats are given they are updated in place as torch does (running_var takes the unbiased variance);
    eval: the running stats, or batch statistics when they are None. momentum is the update factor; for
    torch's cumulative average (momentum=None in nn.BatchNorm3d) pass 1 / num_batches_tracked, as the
    module does before calling F.batch_norm.
    """
    update = training and running_mean is not None
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if update and momentum is None:
        raise ValueError("momentum=None (cumulative average): pass 1 / num_batches_tracked as momentum")
    y, _, _, new_rm, new_rv = torch.ops.pcrlv2.bn_act3d_fwd(
        x, weight, bias, running_mean, running_var, prelu_weight, bool(training), float(momentum or 0.0), float(eps),
        act)
    if update:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    return y


def gn_act3d(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, act: str,
             prelu_weight: Tensor | None = None) -> Tensor:
    """act(group_norm(x, num_groups)) like ``F.group_norm`` followed by the activation, fused.

    InstanceNorm3d (no running stats) is ``num_groups = C``, with weight/bias None when not affine. Layouts,
    dtypes and activations as in :func:`bn_act3d`; the statistics are per (sample, group) over the group's
    channels and all voxels.
    """
    y, _, _ = torch.ops.pcrlv2.gn_act3d_fwd(x, weight, bias, prelu_weight, int(num_groups), float(eps), act)
    return y
