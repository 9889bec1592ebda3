"""Fused PCRLv2 restoration loss: full-resolution MSE plus the deep-supervision MSEs, forward and backward.

``restoration_loss(restored, masks, target, weights)`` returns the float32 vector

    [MSE(restored, target), weights[0] * MSE(up(masks[0]), target), weights[1] * MSE(up(masks[1]), target), ...]

where ``up`` is ``F.interpolate(mode="trilinear", align_corners=False)`` by the integer factor target / mask in
each dimension: the model's deep-supervision heads come at 1/4, 1/2 and full resolution (x4, x2, x1). The
upsampled masks are never materialised:

- forward: one pass over the full-resolution target; each program interpolates the masks at its voxels from
  the low-resolution tensors (8 cached gathers per voxel and scale) and writes its partial sums, pre-scaled by
  1/N; a final ``sum`` over programs gives the terms (deterministic, no atomics).
- backward: the restoration and any full-resolution mask get their elementwise gradient in one pass; a
  low-resolution mask m gets the adjoint 2/N * g * U^T (U m - t) by a gather per low-resolution voxel, using
  the separable identity U^T (U m - t) = (U^T U) m - U^T t: U^T U is tridiagonal per dimension (a 27-point
  stencil on the low-resolution mask, cached) and U^T t is a weighted sum over the voxel's (2F)^3 target
  window. Both parts run in a single launch (program-id ranges), no atomics, no upsampled tensor.

``from_logits=True`` takes pre-sigmoid inputs: the sigmoid is fused for the full-resolution tensors (restored,
x1 masks); low-resolution masks get ``torch.sigmoid`` first (1/8 or 1/64 of the voxels, cheaper than 8
sigmoids per gathered voxel). Inputs may be float32, bfloat16 or float16, in any strides (NCDHW,
channels_last_3d, views); accumulation is float32. The op is registered as ``torch.ops.pcrlv2.restoration_loss``
(with a fake and an autograd formula), so torch.compile traces it without graph breaks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import interpreting as _interpreting
from .common import device_guard

__all__ = ["restoration_loss", "restoration_loss_forward", "restoration_loss_backward", "pcrlv2_restoration_losses"]

MAX_MASKS = 3
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _source_index(o, n_in, F: tl.constexpr):
    """Trilinear source of output index ``o`` (any int tensor) for upsampling by ``F``, align_corners=False.

    Mirrors torch: src = (o + 0.5) / F - 0.5 clamped at 0, i0 = floor(src), i1 = min(i0 + 1, n_in - 1),
    lambda = src - i0. Exact in float32 for power-of-two factors.
    """
    src = tl.maximum((o.to(tl.float32) + 0.5) * (1.0 / F) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # truncation is floor here: src >= 0
    return i0, tl.minimum(i0 + 1, n_in - 1), src - i0.to(tl.float32)


@triton.jit
def _adjoint_weight(o, i, n_in, n_out, F: tl.constexpr):
    """Weight with which low-resolution sample ``i`` enters output ``o`` (0 for ``o`` outside the output)."""
    i0, i1, lam = _source_index(o, n_in, F)
    wgt = tl.where(i0 == i, 1.0 - lam, 0.0) + tl.where(i1 == i, lam, 0.0)
    return tl.where((o >= 0) & (o < n_out), wgt, 0.0)


@triton.jit
def _gram_row(i, n_in, n_out, F: tl.constexpr):
    """Row ``i`` (1-D int vector) of U^T U for the 1-D upsampling U by F: (A[i, i-1], A[i, i], A[i, i+1]).

    Only the 2F outputs that sample ``i`` contribute, from o = F*i - (F+1)//2 on: a (len(i), 2F) tile.
    """
    ii = i[:, None]
    o = F * ii - (F + 1) // 2 + tl.arange(0, 2 * F)[None, :]
    wi = _adjoint_weight(o, ii, n_in, n_out, F)
    am = tl.sum(wi * _adjoint_weight(o, ii - 1, n_in, n_out, F), axis=1)
    ap = tl.sum(wi * _adjoint_weight(o, ii + 1, n_in, n_out, F), axis=1)
    return am, tl.sum(wi * wi, axis=1), ap


@triton.jit
def _stencil_columns(am, a0, ap):
    """(N,) coefficients of neighbours -1, 0, +1 -> (N, 4); the 4th column is 0 (power-of-two axis)."""
    k = tl.arange(0, 4)[None, :]
    return tl.where(k == 0, am[:, None], tl.where(k == 1, a0[:, None], tl.where(k == 2, ap[:, None], 0.0)))


@triton.jit
def _full_res_index(pid, n_rows, C, D, H, W, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Tile ``pid`` of the full-resolution volume seen as rows (b, c, d, h) of W voxels: indices and lane mask.

    Row indices are (BLOCK_R, 1) and column indices (1, BLOCK_W), so every address is a broadcast sum.
    """
    n_col_blocks = tl.cdiv(W, BLOCK_W)
    rb = pid // n_col_blocks
    cb = pid % n_col_blocks
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    w = cb * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    h = r % H
    q = r // H
    d = q % D
    q = q // D
    return q // C, q % C, d, h, w, (r < n_rows) & (w < W)


@triton.jit
def _address(ptr, s, b, c, d, h, w):
    """Address of element (b, c, d, h, w) of the tensor at ``ptr`` with strides ``s`` (a 5-tuple)."""
    return ptr + b * s[0] + c * s[1] + d * s[2] + h * s[3] + w * s[4]


@triton.jit
def _load_full_res(ptr, s, b, c, d, h, w, valid, LOGITS: tl.constexpr):
    """A full-resolution tile as float32, through the sigmoid when ``LOGITS``."""
    v = tl.load(_address(ptr, s, b, c, d, h, w), mask=valid, other=0.0).to(tl.float32)
    if LOGITS:
        v = tl.sigmoid(v)
    return v


@triton.jit
def _upsampled_tile(M_ptr, s, size, b, c, d, h, w, valid, F: tl.constexpr, LOGITS: tl.constexpr):
    """Mask value at full-resolution voxels (b, c, d, h, w): a load at factor 1, else trilinear from 8 samples."""
    FD: tl.constexpr = F[0]
    FH: tl.constexpr = F[1]
    FW: tl.constexpr = F[2]
    if FD * FH * FW == 1:
        return _load_full_res(M_ptr, s, b, c, d, h, w, valid, LOGITS)
    else:
        # Low-resolution samples are few and reused by F^3 voxels each: these gathers hit the cache.
        d0, d1, ld = _source_index(d, size[0], FD)
        h0, h1, lh = _source_index(h, size[1], FH)
        w0, w1, lw = _source_index(w, size[2], FW)
        sb, sc, sd, sh, sw = s
        base = M_ptr + b * sb + c * sc
        p00 = base + d0 * sd + h0 * sh
        p01 = base + d0 * sd + h1 * sh
        p10 = base + d1 * sd + h0 * sh
        p11 = base + d1 * sd + h1 * sh
        q0 = w0 * sw
        q1 = w1 * sw
        c00 = (1.0 - lw) * tl.load(p00 + q0, mask=valid, other=0.0).to(tl.float32) + lw * tl.load(
            p00 + q1, mask=valid, other=0.0).to(tl.float32)
        c01 = (1.0 - lw) * tl.load(p01 + q0, mask=valid, other=0.0).to(tl.float32) + lw * tl.load(
            p01 + q1, mask=valid, other=0.0).to(tl.float32)
        c10 = (1.0 - lw) * tl.load(p10 + q0, mask=valid, other=0.0).to(tl.float32) + lw * tl.load(
            p10 + q1, mask=valid, other=0.0).to(tl.float32)
        c11 = (1.0 - lw) * tl.load(p11 + q0, mask=valid, other=0.0).to(tl.float32) + lw * tl.load(
            p11 + q1, mask=valid, other=0.0).to(tl.float32)
        c0 = (1.0 - lh) * c00 + lh * c01
        c1 = (1.0 - lh) * c10 + lh * c11
        return (1.0 - ld) * c0 + ld * c1


# Per-mask arguments are tuples with one entry per mask slot (MAX_MASKS of them; slots N_MASKS and up are padding,
# never read), indexed by the constant index of a tl.static_range loop: M_ptrs, m_strides, m_sizes, weights, ...
# Per-mask constants are constexpr tuples: FACTORS (the upsampling factors (d, h, w)) and LOW_BLOCKS; an element is
# passed on as tl.constexpr(FACTORS[k]) because Triton 3.6 hands a bare element of a constexpr tuple to a jit
# function as a plain Python tuple, which its code generator rejects.


@triton.jit
def _restoration_fwd_kernel(
    X_ptr, T_ptr, P_ptr,  # restored, target: (B, C, D, H, W); P: (1 + N_MASKS, n_programs) fp32 partial sums
    M_ptrs,  # the masks
    x_strides, t_strides, m_strides, m_sizes, weights,  # weights are folded with 1/N into the partial sums
    C, D, H, W, n_rows, inv_n,  # n_rows = B*C*D*H
    N_MASKS: tl.constexpr, FACTORS: tl.constexpr,
    LOGITS: tl.constexpr,  # apply the sigmoid to restored and full-resolution masks
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    b, c, d, h, w, valid = _full_res_index(pid, n_rows, C, D, H, W, BLOCK_R, BLOCK_W)
    t = _load_full_res(T_ptr, t_strides, b, c, d, h, w, valid, False)
    x = _load_full_res(X_ptr, x_strides, b, c, d, h, w, valid, LOGITS)
    e = tl.where(valid, x - t, 0.0)
    tl.store(P_ptr + pid, tl.sum(e * e) * inv_n)
    for k in tl.static_range(N_MASKS):
        m = _upsampled_tile(M_ptrs[k], m_strides[k], m_sizes[k], b, c, d, h, w, valid, tl.constexpr(FACTORS[k]),
                            LOGITS)
        e = tl.where(valid, m - t, 0.0)
        tl.store(P_ptr + (k + 1) * tl.num_programs(0) + pid, tl.sum(e * e) * (inv_n * weights[k]))


@triton.jit
def _elementwise_grad(X_ptr, GX_ptr, s, gs, b, c, d, h, w, valid, t, scale, LOGITS: tl.constexpr):
    """Gradient of a full-resolution tensor (restored, an x1 mask): scale * (x - t), times sigmoid' for logits."""
    x = _load_full_res(X_ptr, s, b, c, d, h, w, valid, LOGITS)
    g = (x - t) * scale
    if LOGITS:
        g = g * x * (1.0 - x)
    tl.store(_address(GX_ptr, gs, b, c, d, h, w), g.to(GX_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _low_res_mask_grad(lpid, n_col_blocks, n_rows, scale, M_ptr, GM_ptr, T_ptr, s, gs, ts, size, C, D, H, W,
                       F: tl.constexpr, BLOCK: tl.constexpr):
    """Gradient of a low-resolution mask at a tile of its voxels: scale * ((U^T U) m - U^T t).

    The tile is rows (b, c, i_d, i_h) x columns i_w of the mask: BLOCK = (rows, columns). Neighbour and window
    offsets along h and w are extra tile axes, (BLOCK_R, K_h, BLOCK_W, K_w), so only the d offsets are a loop.
    """
    FD: tl.constexpr = F[0]
    FH: tl.constexpr = F[1]
    FW: tl.constexpr = F[2]
    BLOCK_R: tl.constexpr = BLOCK[0]
    BLOCK_W: tl.constexpr = BLOCK[1]
    sb, sc, sd, sh, sw = s
    gsb, gsc, gsd, gsh, gsw = gs
    tsb, tsc, tsd, tsh, tsw = ts
    md, mh, mw = size
    rb = lpid // n_col_blocks
    cb = lpid % n_col_blocks
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # 1-D row and column indices
    iw = cb * BLOCK_W + tl.arange(0, BLOCK_W)
    ih = r % mh
    q = r // mh
    i_d = q % md
    q = q // md
    b = q // C
    c = q % C
    rvalid = r < n_rows
    wvalid = iw < mw

    # (U^T U) m: separable tridiagonal factors, a 27-point stencil over cached low-resolution samples.
    dm, d0, dp = _gram_row(i_d, md, D, FD)
    hm, h0, hp = _gram_row(ih, mh, H, FH)
    wm, w0, wp = _gram_row(iw, mw, W, FW)
    ch = _stencil_columns(hm, h0, hp)  # (BLOCK_R, 4)
    cw = _stencil_columns(wm, w0, wp)  # (BLOCK_W, 4)
    k4 = tl.arange(0, 4)[None, :]
    jh = ih[:, None] + k4 - 1
    jw = iw[:, None] + k4 - 1
    okh = rvalid[:, None] & (k4 < 3) & (jh >= 0) & (jh < mh)
    okw = wvalid[:, None] & (k4 < 3) & (jw >= 0) & (jw < mw)
    ok_hw = okh[:, :, None, None] & okw[None, None, :, :]
    c_hw = ch[:, :, None, None] * cw[None, None, :, :]
    # int32 offsets, not 64-bit pointers, for the tiles kept across the loops (registers).
    m_off = (b * sb + c * sc)[:, None, None, None] + (jh * sh)[:, :, None, None] + (jw * sw)[None, None, :, :]
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for kd in tl.static_range(3):
        jd = i_d + (kd - 1)
        if kd == 0:
            cd = dm
        elif kd == 1:
            cd = d0
        else:
            cd = dp
        okd = ((jd >= 0) & (jd < md))[:, None, None, None]
        v = tl.load(M_ptr + m_off + (jd * sd)[:, None, None, None], mask=ok_hw & okd, other=0.0).to(tl.float32)
        acc += tl.sum(tl.sum(cd[:, None, None, None] * c_hw * v, axis=3), axis=1)

    # - U^T t: the target over the (2F)^3 window of voxels that sample each mask voxel, separable weights.
    oh = FH * ih[:, None] - (FH + 1) // 2 + tl.arange(0, 2 * FH)[None, :]  # (BLOCK_R, 2FH)
    ow = FW * iw[:, None] - (FW + 1) // 2 + tl.arange(0, 2 * FW)[None, :]  # (BLOCK_W, 2FW)
    wh = tl.where(rvalid[:, None], _adjoint_weight(oh, ih[:, None], mh, H, FH), 0.0)
    ww = tl.where(wvalid[:, None], _adjoint_weight(ow, iw[:, None], mw, W, FW), 0.0)
    w_hw = wh[:, :, None, None] * ww[None, None, :, :]
    t_off = (b * tsb + c * tsc)[:, None, None, None] + (oh * tsh)[:, :, None, None] + (ow * tsw)[None, None, :, :]
    for kd in range(2 * FD):
        od = FD * i_d - (FD + 1) // 2 + kd
        wgt = _adjoint_weight(od, i_d, md, D, FD)[:, None, None, None] * w_hw
        tv = tl.load(T_ptr + t_off + (od * tsd)[:, None, None, None], mask=wgt != 0.0, other=0.0).to(tl.float32)
        acc -= tl.sum(tl.sum(wgt * tv, axis=3), axis=1)
    gm_ptr = (GM_ptr + b * gsb + c * gsc + i_d * gsd + ih * gsh)[:, None] + (iw * gsw)[None, :]
    tl.store(gm_ptr, (acc * scale).to(GM_ptr.dtype.element_ty), mask=rvalid[:, None] & wvalid[None, :])


@triton.jit
def _restoration_bwd_kernel(
    G_ptr,  # (1 + N_MASKS,) fp32 upstream gradients of the terms
    X_ptr, T_ptr, GX_ptr,  # restored, target, grad of restored: (B, C, D, H, W)
    M_ptrs, GM_ptrs,  # the masks and their gradients (same shapes)
    x_strides, t_strides, gx_strides, m_strides, gm_strides, m_sizes, weights,
    low_grids,  # per mask: programs [start, end) are its tiles, column blocks and rows (B*C*d*h) of its tiling
    C, D, H, W, n_rows, n_full, inv_n,  # full-resolution tiles are programs [0, n_full)
    N_MASKS: tl.constexpr, FACTORS: tl.constexpr,
    LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,  # full-resolution tile
    LOW_BLOCKS: tl.constexpr,  # per mask: its low-resolution tile (rows, columns)
):
    pid = tl.program_id(0)
    two_inv_n = 2.0 * inv_n
    if pid < n_full:  # restored and the x1 masks: elementwise
        b, c, d, h, w, valid = _full_res_index(pid, n_rows, C, D, H, W, BLOCK_R, BLOCK_W)
        t = _load_full_res(T_ptr, t_strides, b, c, d, h, w, valid, False)
        _elementwise_grad(X_ptr, GX_ptr, x_strides, gx_strides, b, c, d, h, w, valid, t,
                          two_inv_n * tl.load(G_ptr), LOGITS)
        for k in tl.static_range(N_MASKS):
            if FACTORS[k][0] * FACTORS[k][1] * FACTORS[k][2] == 1:
                _elementwise_grad(M_ptrs[k], GM_ptrs[k], m_strides[k], gm_strides[k], b, c, d, h, w, valid, t,
                                  two_inv_n * weights[k] * tl.load(G_ptr + 1 + k), LOGITS)
    else:  # a tile of a low-resolution mask
        for k in tl.static_range(N_MASKS):
            if FACTORS[k][0] * FACTORS[k][1] * FACTORS[k][2] > 1:
                start, end, n_col_blocks, rows = low_grids[k]
                if (pid >= start) & (pid < end):
                    _low_res_mask_grad(pid - start, n_col_blocks, rows,
                                       two_inv_n * weights[k] * tl.load(G_ptr + 1 + k),
                                       M_ptrs[k], GM_ptrs[k], T_ptr, m_strides[k], gm_strides[k], t_strides,
                                       m_sizes[k], C, D, H, W, tl.constexpr(FACTORS[k]), tl.constexpr(LOW_BLOCKS[k]))


# --------------------------------------------------------------------------------------------- launchers


def _full_res_blocks(width: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_W, num_warps) for full-resolution tiles: 1024 voxels over 8 warps on a GPU (4 a thread; 8
    a thread more than doubles the registers: ``make bench-compile`` reports them), 16-wide tiles under the
    interpreter so that tests cross tile edges in every direction. The low-resolution tiles of the backward
    share its num_warps."""
    if _interpreting():
        bw = min(triton.next_power_of_2(width), 16)
        return max(1, 1024 // bw), bw, 1
    bw = min(triton.next_power_of_2(width), 128)
    return max(1, 1024 // bw), bw, 8


def _low_res_blocks(width: int, factors: tuple[int, int, int]) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_W) for a low-resolution gradient tile: each voxel's (2F_h x 2F_w) window slice is a
    tile axis, so a GPU program holds 1024 window elements (16 voxels at x4, 64 at x2)."""
    if _interpreting():
        bw = min(triton.next_power_of_2(width), 8)
        return max(1, 256 // bw), bw
    bw = min(triton.next_power_of_2(width), 16)
    return max(1, 1024 // (4 * factors[1] * factors[2] * bw)), bw


def _check_inputs(restored: torch.Tensor, masks: Sequence[torch.Tensor], target: torch.Tensor,
                  weights: Sequence[float]) -> list[tuple[int, int, int]]:
    """Validate shapes, dtypes and devices; return each mask's integer upsampling factors (d, h, w)."""
    if target.dim() != 5:
        raise ValueError(f"target must be (B, C, D, H, W), got {tuple(target.shape)}")
    if restored.shape != target.shape:
        raise ValueError(f"restored {tuple(restored.shape)} and target {tuple(target.shape)} differ")
    if len(masks) > MAX_MASKS:
        raise ValueError(f"at most {MAX_MASKS} masks, got {len(masks)}")
    if len(weights) != len(masks):
        raise ValueError(f"{len(weights)} weights for {len(masks)} masks")
    if target.numel() >= 2**31:
        raise ValueError("volumes of 2**31 voxels or more are not supported (32-bit indexing)")
    factors = []
    for k, m in enumerate(masks):
        if m.dim() != 5 or m.shape[:2] != target.shape[:2]:
            raise ValueError(f"mask {k} must be (B, C, d, h, w) with target's B, C; got {tuple(m.shape)}")
        if any(s == 0 or big % s for s, big in zip(m.shape[2:], target.shape[2:])):
            raise ValueError(f"mask {k} size {tuple(m.shape[2:])} does not divide {tuple(target.shape[2:])}")
        f = tuple(big // s for s, big in zip(m.shape[2:], target.shape[2:]))
        if any(v & (v - 1) for v in f):
            raise ValueError(f"mask {k}: upsampling factors {f} must be powers of two (the model's x4, x2, x1)")
        factors.append(f)
    for name, t in [("restored", restored), ("target", target)] + [(f"mask {k}", m) for k, m in enumerate(masks)]:
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != target.device:
            raise ValueError(f"{name} is on {t.device}, target on {target.device}")
    if not target.is_cuda and not _interpreting():
        raise RuntimeError("the Triton restoration loss needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return factors


def _pad(values, filler) -> tuple:
    """Per-mask values as a kernel tuple of MAX_MASKS slots; the slots past the masks are never read."""
    values = tuple(values)
    return values + (filler,) * (MAX_MASKS - len(values))


def restoration_loss_forward(restored: torch.Tensor, masks: Sequence[torch.Tensor], target: torch.Tensor,
                             weights: Sequence[float], from_logits: bool = False) -> torch.Tensor:
    """The float32 terms [MSE(restored), w_k * MSE(up(mask_k))...] (the op's forward; no autograd)."""
    factors = _check_inputs(restored, masks, target, weights)
    B, C, D, H, W = target.shape
    br, bw, warps = _full_res_blocks(W)
    n_rows = B * C * D * H
    grid = triton.cdiv(n_rows, br) * triton.cdiv(W, bw)
    partial = torch.empty((1 + len(masks), grid), dtype=torch.float32, device=target.device)
    with device_guard(target):
        _restoration_fwd_kernel[(grid,)](
            restored, target, partial, _pad(masks, restored), restored.stride(), target.stride(),
            _pad([m.stride() for m in masks], (0,) * 5), _pad([m.shape[2:] for m in masks], (1, 1, 1)),
            _pad(map(float, weights), 0.0),
            C, D, H, W, n_rows, 1.0 / target.numel(),
            N_MASKS=len(masks), FACTORS=_pad(factors, (1, 1, 1)), LOGITS=from_logits, BLOCK_R=br, BLOCK_W=bw,
            num_warps=warps,
        )
    return partial.sum(dim=1)


def restoration_loss_backward(grad: torch.Tensor, restored: torch.Tensor, masks: Sequence[torch.Tensor],
                              target: torch.Tensor, weights: Sequence[float],
                              from_logits: bool = False) -> list[torch.Tensor]:
    """[grad of restored, grad of mask_k...] for the upstream gradient ``grad`` (1 + K,) of the terms."""
    factors = _check_inputs(restored, masks, target, weights)
    B, C, D, H, W = target.shape
    grad = grad.to(torch.float32).contiguous()
    br, bw, warps = _full_res_blocks(W)
    n_rows = B * C * D * H
    gx = torch.empty_like(restored)
    gms = [torch.empty_like(m) for m in masks]
    # Programs [0, n_full) are the full-resolution tiles, then one contiguous range of programs per low-resolution
    # mask (x1 masks are done by the full-resolution tiles).
    n_full = triton.cdiv(n_rows, br) * triton.cdiv(W, bw)
    grids, tiles, start = [], [], n_full
    for m, f in zip(masks, factors):
        lbr, lbw = _low_res_blocks(m.shape[4], f) if f != (1, 1, 1) else (1, 1)
        rows, cb = B * C * m.shape[2] * m.shape[3], triton.cdiv(m.shape[4], lbw)
        end = start if f == (1, 1, 1) else start + triton.cdiv(rows, lbr) * cb
        grids.append((start, end, cb, rows))
        tiles.append((lbr, lbw))
        start = end
    with device_guard(target):
        _restoration_bwd_kernel[(start,)](
            grad, restored, target, gx, _pad(masks, restored), _pad(gms, gx),
            restored.stride(), target.stride(), gx.stride(), _pad([m.stride() for m in masks], (0,) * 5),
            _pad([g.stride() for g in gms], (0,) * 5), _pad([m.shape[2:] for m in masks], (1, 1, 1)),
            _pad(map(float, weights), 0.0), _pad(grids, (start, start, 1, 0)),
            C, D, H, W, n_rows, n_full, 1.0 / target.numel(),
            N_MASKS=len(masks), FACTORS=_pad(factors, (1, 1, 1)), LOGITS=from_logits, BLOCK_R=br, BLOCK_W=bw,
            LOW_BLOCKS=_pad(tiles, (1, 1)), num_warps=warps,
        )
    return [gx] + gms


# ------------------------------------------------------------------------------------ torch.library op


@torch.library.custom_op("pcrlv2::restoration_loss", mutates_args=())
def _restoration_loss_op(restored: torch.Tensor, masks: list[torch.Tensor], target: torch.Tensor,
                         weights: list[float], from_logits: bool) -> torch.Tensor:
    """The terms of :func:`restoration_loss`; here ``from_logits`` applies the sigmoid to ``restored`` and the
    full-resolution masks only (the public function passes low-resolution masks through torch.sigmoid)."""
    return restoration_loss_forward(restored, masks, target, weights, from_logits)


@_restoration_loss_op.register_fake
def _(restored, masks, target, weights, from_logits):
    return target.new_empty((1 + len(masks),), dtype=torch.float32)


@torch.library.custom_op("pcrlv2::restoration_loss_backward", mutates_args=())
def _restoration_loss_backward_op(grad: torch.Tensor, restored: torch.Tensor, masks: list[torch.Tensor],
                                  target: torch.Tensor, weights: list[float], from_logits: bool) -> list[torch.Tensor]:
    return restoration_loss_backward(grad, restored, masks, target, weights, from_logits)


@_restoration_loss_backward_op.register_fake
def _(grad, restored, masks, target, weights, from_logits):
    return [torch.empty_like(restored)] + [torch.empty_like(m) for m in masks]


def _setup_context(ctx, inputs, output):
    restored, masks, target, weights, from_logits = inputs
    ctx.save_for_backward(restored, target, *masks)
    ctx.weights, ctx.from_logits = weights, from_logits


def _backward(ctx, grad):
    restored, target, *masks = ctx.saved_tensors
    gx, *gms = torch.ops.pcrlv2.restoration_loss_backward(grad, restored, masks, target, ctx.weights,
                                                          ctx.from_logits)
    return gx, gms, None, None, None


_restoration_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- public API


def restoration_loss(restored: torch.Tensor, masks: Sequence[torch.Tensor], target: torch.Tensor,
                     weights: Sequence[float] | None = None, from_logits: bool = False) -> torch.Tensor:
    """Per-term restoration losses in one fused pass: float32 ``(1 + len(masks),)``.

    ``out[0] = MSE(restored, target)``, ``out[1 + k] = weights[k] * MSE(up(masks[k]), target)`` with ``up`` the
    trilinear upsampling (align_corners=False) by the integer factor target / mask per dimension, so masks
    are passed at their native (low) resolution. ``weights`` defaults to 1 for every mask. Gradients flow to
    ``restored`` and the masks; ``target`` must not require grad. With ``from_logits`` every input is a
    pre-sigmoid logit.
    """
    if target.requires_grad:
        raise ValueError("restoration_loss does not differentiate the target; pass target.detach()")
    masks = list(masks)
    weights = [1.0] * len(masks) if weights is None else [float(w) for w in weights]
    if from_logits:
        # Low-resolution masks: the sigmoid on their few voxels, not on 8 gathers per full-resolution voxel.
        # The op then fuses the sigmoid only for the full-resolution tensors.
        masks = [torch.sigmoid(m) if m.shape[2:] != target.shape[2:] else m for m in masks]
    return torch.ops.pcrlv2.restoration_loss(restored, masks, target, weights, from_logits)


def pcrlv2_restoration_losses(restoration: torch.Tensor, low_masks: Sequence[torch.Tensor], gt: torch.Tensor,
                              beta: float, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCRLv2Loss's ``(restore, deep)`` from the model's low-resolution deep-supervision outputs, one launch.

    ``restore = MSE(restoration, gt)``; ``deep = beta * MSE(up(low_masks[scale]), gt)``, or with ``scale=-1``
    (all_scales) ``beta`` times the mean over every scale.
    """
    if scale == -1:
        terms = restoration_loss(restoration, low_masks, gt, [beta / len(low_masks)] * len(low_masks))
        return terms[0], terms[1:].sum()
    terms = restoration_loss(restoration, [low_masks[scale]], gt, [beta])
    return terms[0], terms[1]
