"""Fused PCRLv2 feature loss: every symmetric stop-gradient negative-cosine pair of a step in one launch.

PCRLv2 compares views at the decoder scales: pair(a, b, s) = -0.5 * (mean cos(pred_a_s, sg(proj_b_s)) +
mean cos(pred_b_s, sg(proj_a_s))), for the global pair and 2 x n_local local pairs, each at its own scale
(or at all three). Eagerly that is hundreds of tiny launches; here it is one forward and one backward kernel.

The general form is a list of directed terms: ``out[slot] += weight * mean_r cos(preds[i][a + r], sg(projs[j][b + r]))``
(:class:`CosineTerm`). The wrapper packs the distinct prediction and projection tensors into two flat buffers
(``torch.cat``: autograd splits the gradient back into views) and builds an int32 table on the host:

- blocks (n_blocks, 6): [pred offset, C, rows, row offset in its view, first term, end term]. The rows of
  every packed prediction are partitioned into views (identical or disjoint row ranges; gaps become views
  with no terms), so each prediction row is owned by exactly one program: the backward sums every term's
  contribution to that row in registers and writes it once (no atomics, every element written);
- terms (n_terms, 3): [projection offset of the view's first row, slot, weight / rows as float32 bits].

cos follows ``F.cosine_similarity`` (torch >= 2.0): cos = sum((x / max(|x|, eps)) * (y / max(|y|, eps))),
where the clamp is not differentiated, so d cos / dx = y / (max(|x|, eps) max(|y|, eps))
- cos * x / (max(|x|, eps) |x|) (the last term 0 at x = 0). Inputs float32/bfloat16/float16, float32 math.
Registered as ``torch.ops.pcrlv2.cosine_pair_loss`` with a fake and an autograd formula.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import interpreting as _interpreting
from .common import device_guard
from .cosine_terms import CosineTerm, pair_terms

__all__ = ["CosineTerm", "cosine_pair_loss", "pair_terms", "pcrlv2_cosine_losses"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_FIELDS = 6
_TERM_FIELDS = 3


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_block(P_ptr, BLK_ptr, pid, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's prediction rows (BLOCK_R, BLOCK_C) in float32, its table row and its lane masks."""
    row = BLK_ptr + pid * 6
    p_off = tl.load(row)
    n_cols = tl.load(row + 1)
    n_rows = tl.load(row + 2)
    q_row = tl.load(row + 3)
    r = tl.arange(0, BLOCK_R)[:, None]
    cc = tl.arange(0, BLOCK_C)[None, :]
    ok = (r < n_rows) & (cc < n_cols)
    p = tl.load(P_ptr + p_off + r * n_cols + cc, mask=ok, other=0.0).to(tl.float32)
    return p, p_off, n_cols, q_row, tl.load(row + 4), tl.load(row + 5), r, cc, ok


@triton.jit
def _load_term(Q_ptr, TRM_ptr, k, q_row, n_cols, r, cc, ok):
    """Term k's projection rows (float32), its slot and its per-row weight."""
    term = TRM_ptr + k * 3
    q_off = tl.load(term)
    q = tl.load(Q_ptr + q_off + (q_row + r) * n_cols + cc, mask=ok, other=0.0).to(tl.float32)
    return q, tl.load(term + 1), tl.load(term + 2).to(tl.float32, bitcast=True)


@triton.jit
def _cosine_fwd_kernel(
    P_ptr, Q_ptr,  # packed predictions, packed projections: flat, each tensor's rows of C values back to back
    BLK_ptr, TRM_ptr,  # int32 tables: blocks (n_blocks, 6), terms (n_terms, 3)
    OUT_ptr,  # (N_SLOTS, n_blocks) fp32 partial sums
    eps,
    N_SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    p, p_off, n_cols, q_row, t_start, t_end, r, cc, ok = _load_block(P_ptr, BLK_ptr, pid, BLOCK_R, BLOCK_C)
    p_norm = tl.maximum(tl.sqrt(tl.sum(p * p, axis=1)), eps)
    slots = tl.arange(0, SLOTS_P2)
    acc = tl.zeros([SLOTS_P2], dtype=tl.float32)
    # Rows past the block are zero in p and q: their cosine is 0 / eps^2 = 0, no row mask needed.
    for k in range(t_start, t_end):
        q, slot, wgt = _load_term(Q_ptr, TRM_ptr, k, q_row, n_cols, r, cc, ok)
        q_norm = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), eps)
        cos = tl.sum(p * q, axis=1) / (p_norm * q_norm)
        acc += tl.where(slots == slot, tl.sum(cos) * wgt, 0.0)
    tl.store(OUT_ptr + slots * tl.num_programs(0) + pid, acc, mask=slots < N_SLOTS)


@triton.jit
def _cosine_bwd_kernel(
    G_ptr,  # (N_SLOTS,) fp32 upstream gradients
    P_ptr, Q_ptr, GP_ptr,  # packed predictions, projections, gradient of the predictions (same layout as P)
    BLK_ptr, TRM_ptr,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    p, p_off, n_cols, q_row, t_start, t_end, r, cc, ok = _load_block(P_ptr, BLK_ptr, pid, BLOCK_R, BLOCK_C)
    norm = tl.sqrt(tl.sum(p * p, axis=1))
    p_norm = tl.maximum(norm, eps)
    # d|x|/dx = x / |x|, 0 at x = 0 (torch's norm backward); the eps clamp itself carries no gradient.
    inv_norm = tl.where(norm > 0.0, 1.0 / tl.where(norm > 0.0, norm, 1.0), 0.0)
    grad = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k in range(t_start, t_end):
        q, slot, wgt = _load_term(Q_ptr, TRM_ptr, k, q_row, n_cols, r, cc, ok)
        q_norm = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), eps)
        inv_pq = 1.0 / (p_norm * q_norm)
        cos = tl.sum(p * q, axis=1) * inv_pq
        coef = tl.load(G_ptr + slot) * wgt
        grad += coef * (q * inv_pq[:, None] - (cos * inv_norm / p_norm)[:, None] * p)
    tl.store(GP_ptr + p_off + r * n_cols + cc, grad.to(GP_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- launchers


def _blocks(max_rows: int, max_cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): a whole feature row per lane row; 2048 elements a GPU program (twice that would double
    the registers; the compile report, ``make bench-compile``, has them per configuration), 4 rows under the
    interpreter so that tests cross row blocks."""
    bc = triton.next_power_of_2(max(max_cols, 1))
    cap = 4 if _interpreting() else max(1, 2048 // bc)
    return min(triton.next_power_of_2(max(max_rows, 1)), cap), bc


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not _interpreting():
        raise RuntimeError("the Triton cosine loss needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def cosine_forward(pred: torch.Tensor, proj: torch.Tensor, blocks: torch.Tensor, terms: torch.Tensor,
                   n_slots: int, eps: float, block_r: int, block_c: int) -> torch.Tensor:
    """Per-slot sums (float32, (n_slots,)) from packed buffers and tables (see the module docstring)."""
    _check_device(pred)
    n_blocks = blocks.shape[0]
    partial = torch.empty((n_slots, n_blocks), dtype=torch.float32, device=pred.device)
    if n_blocks:
        with device_guard(pred):
            _cosine_fwd_kernel[(n_blocks,)](
                pred, proj, blocks, terms, partial, eps,
                N_SLOTS=n_slots, SLOTS_P2=triton.next_power_of_2(n_slots), BLOCK_R=block_r, BLOCK_C=block_c,
                num_warps=4,
            )
    return partial.sum(dim=1)


def cosine_backward(grad: torch.Tensor, pred: torch.Tensor, proj: torch.Tensor, blocks: torch.Tensor,
                    terms: torch.Tensor, eps: float, block_r: int, block_c: int) -> torch.Tensor:
    """Gradient of the packed predictions for the upstream per-slot gradient ``grad``."""
    _check_device(pred)
    grad_pred = torch.empty_like(pred)
    if blocks.shape[0]:
        with device_guard(pred):
            _cosine_bwd_kernel[(blocks.shape[0],)](
                grad.to(torch.float32).contiguous(), pred, proj, grad_pred, blocks, terms, eps,
                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
            )
    return grad_pred


# ------------------------------------------------------------------------------------ torch.library op


@torch.library.custom_op("pcrlv2::cosine_pair_loss", mutates_args=())
def _cosine_op(pred: torch.Tensor, proj: torch.Tensor, blocks: torch.Tensor, terms: torch.Tensor, n_slots: int,
               eps: float, block_r: int, block_c: int) -> torch.Tensor:
    return cosine_forward(pred, proj, blocks, terms, n_slots, eps, block_r, block_c)


@_cosine_op.register_fake
def _(pred, proj, blocks, terms, n_slots, eps, block_r, block_c):
    return pred.new_empty((n_slots,), dtype=torch.float32)


@torch.library.custom_op("pcrlv2::cosine_pair_loss_backward", mutates_args=())
def _cosine_backward_op(grad: torch.Tensor, pred: torch.Tensor, proj: torch.Tensor, blocks: torch.Tensor,
                        terms: torch.Tensor, eps: float, block_r: int, block_c: int) -> torch.Tensor:
    return cosine_backward(grad, pred, proj, blocks, terms, eps, block_r, block_c)


@_cosine_backward_op.register_fake
def _(grad, pred, proj, blocks, terms, eps, block_r, block_c):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    pred, proj, blocks, terms, n_slots, eps, block_r, block_c = inputs
    ctx.save_for_backward(pred, proj, blocks, terms)
    ctx.eps, ctx.block_r, ctx.block_c = eps, block_r, block_c


def _backward(ctx, grad):
    pred, proj, blocks, terms = ctx.saved_tensors
    grad_pred = torch.ops.pcrlv2.cosine_pair_loss_backward(grad, pred, proj, blocks, terms, ctx.eps, ctx.block_r,
                                                          ctx.block_c)
    return grad_pred, None, None, None, None, None, None, None


_cosine_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- public API


def _tables(preds: Sequence[torch.Tensor], projs: Sequence[torch.Tensor], terms: Sequence[CosineTerm],
            n_slots: int):
    """Host-side packing plan: (used preds, used projs, flat int32 table, n_blocks, block_r, block_c)."""
    used_p = sorted({t.pred for t in terms})
    used_q = sorted({t.proj for t in terms})
    p_off, q_off, off = {}, {}, 0
    for u in used_p:
        p_off[u], off = off, off + preds[u].numel()
    off = 0
    for v in used_q:
        q_off[v], off = off, off + projs[v].numel()
    # Views per prediction tensor: identical row ranges share a program, overlapping ones are rejected.
    views: dict[tuple[int, int, int], list[int]] = {}
    for k, t in enumerate(terms):
        if not 0 <= t.slot < n_slots:
            raise ValueError(f"term {k}: slot {t.slot} outside [0, {n_slots})")
        p, q = preds[t.pred], projs[t.proj]
        if p.shape[1] != q.shape[1]:
            raise ValueError(f"term {k}: prediction width {p.shape[1]} != projection width {q.shape[1]}")
        if t.rows < 1 or t.pred_row < 0 or t.proj_row < 0 or t.pred_row + t.rows > p.shape[0] \
                or t.proj_row + t.rows > q.shape[0]:
            raise ValueError(f"term {k}: rows out of range ({t})")
        views.setdefault((t.pred, t.pred_row, t.rows), []).append(k)
    groups = []
    for u in used_p:
        start = 0
        for (_, row0, rows) in sorted(v for v in views if v[0] == u):
            if row0 < start:
                raise ValueError(f"prediction {u}: row ranges of different terms overlap without being equal")
            if row0 > start:
                groups.append((u, start, row0 - start, []))
            groups.append((u, row0, rows, views[(u, row0, rows)]))
            start = row0 + rows
        if start < preds[u].shape[0]:
            groups.append((u, start, preds[u].shape[0] - start, []))
    block_r, block_c = _blocks(max([g[2] for g in groups]), max([preds[u].shape[1] for u in used_p]))
    block_rows, term_rows = [], []
    for u, row0, rows, ks in groups:
        width = preds[u].shape[1]
        t_start = len(term_rows)
        for k in ks:
            t = terms[k]
            term_rows.append((q_off[t.proj] + t.proj_row * width, t.slot, t.weight / t.rows))
        for ro in range(0, rows, block_r):
            block_rows.append((p_off[u] + (row0 + ro) * width, width, min(block_r, rows - ro), ro, t_start,
                               len(term_rows)))
    table = torch.tensor([v for b in block_rows for v in b], dtype=torch.int32)
    if term_rows:
        ints = torch.tensor([[q, s] for q, s, _ in term_rows], dtype=torch.int32)
        bits = torch.tensor([w for _, _, w in term_rows], dtype=torch.float32).view(torch.int32)[:, None]
        table = torch.cat([table, torch.cat([ints, bits], dim=1).reshape(-1)])
    return used_p, used_q, table, len(block_rows), block_r, block_c


def cosine_pair_loss(preds: Sequence[torch.Tensor], projs: Sequence[torch.Tensor], terms: Sequence[CosineTerm],
                     n_slots: int, eps: float = 1e-8) -> torch.Tensor:
    """Weighted mean cosines summed per slot in one launch: float32 ``(n_slots,)``.

    ``out[s] = sum over terms with slot s of weight * mean_{r < rows} cos(preds[pred][pred_row + r],
    projs[proj][proj_row + r].detach())``. Gradients flow to ``preds`` only. Every prediction row range used
    by a term must equal or be disjoint from every other term's range on the same tensor.
    """
    terms = [CosineTerm(*t) for t in terms]
    if not terms:
        raise ValueError("cosine_pair_loss needs at least one term")
    for name, ts in (("preds", preds), ("projs", projs)):
        for i, t in enumerate(ts):
            if t.dim() != 2 or t.dtype not in _DTYPES:
                raise ValueError(f"{name}[{i}] must be a 2-D float32/bfloat16/float16 tensor, got "
                                 f"{tuple(t.shape)} {t.dtype}")
    used_p, used_q, table, n_blocks, block_r, block_c = _tables(preds, projs, terms, n_slots)
    device = preds[used_p[0]].device
    pred = torch.cat([preds[u].reshape(-1) for u in used_p]) if len(used_p) > 1 else preds[used_p[0]].reshape(-1)
    proj = torch.cat([projs[v].detach().reshape(-1) for v in used_q])
    if proj.device != device or any(projs[v].device != device for v in used_q):
        raise ValueError("predictions and projections must be on one device")
    if device.type == "cuda" and not torch.compiler.is_compiling():
        # Pinned + non_blocking: a pageable copy would wait for the stream to drain every step.
        table = table.pin_memory().to(device, non_blocking=True)
    else:
        table = table.to(device)
    blocks = table[: n_blocks * _BLOCK_FIELDS].view(n_blocks, _BLOCK_FIELDS)
    term_table = table[n_blocks * _BLOCK_FIELDS:].view(-1, _TERM_FIELDS)
    return torch.ops.pcrlv2.cosine_pair_loss(pred, proj, blocks, term_table, n_slots, float(eps), block_r, block_c)


def pcrlv2_cosine_losses(feats1, feats2, local_feats, n_local: int, global_scale: int | None,
                         local_scales: Sequence[int] | None, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """PCRLv2Loss's ``(global, local)`` feature terms in one launch.

    ``feats1``/``feats2``: the global views' ``[[proj, pred]]`` per scale, (B, C_s); ``local_feats``: the local
    views batched view-major, (n_local * B, C_s) per scale, or None. ``global_scale``: the global pair's scale,
    or None for all scales averaged (all_scales=True, then ``local_scales`` is None too). ``local_scales``: the
    2 * n_local scales in PCRLv2Loss's draw order (view j, then anchor feats1 before feats2).
    """
    n_scales = len(feats1)
    all_scales = global_scale is None
    preds, projs, index = [], [], {}

    def tensors(source: int, feats, scale: int) -> tuple[int, int]:
        if (source, scale) not in index:
            index[(source, scale)] = len(preds)
            projs.append(feats[scale][0])
            preds.append(feats[scale][1])
        i = index[(source, scale)]
        return i, i

    scales = range(n_scales) if all_scales else [global_scale]
    terms = []
    rows = feats1[0][0].shape[0]
    if any(t.shape[0] != rows for f in (feats1, feats2) for pair in f for t in pair):
        raise ValueError("the two global views' features must all have the same number of rows")
    for s in scales:
        p1, q1 = tensors(0, feats1, s)
        p2, q2 = tensors(1, feats2, s)
        terms += pair_terms(p1, q1, 0, p2, q2, 0, rows, 1.0 / len(scales), 0)
    if local_feats is not None and n_local > 0:
        local_rows = local_feats[0][0].shape[0]
        if local_rows % n_local or local_rows // n_local != rows:
            raise ValueError(f"{local_rows} local rows are not {n_local} views of {rows} rows")
        if not all_scales and (local_scales is None or len(local_scales) != 2 * n_local):
            raise ValueError(f"need {2 * n_local} local scales, got {local_scales}")
        for j in range(n_local):
            for a, anchor in enumerate((feats1, feats2)):
                view_scales = range(n_scales) if all_scales else [local_scales[2 * j + a]]
                for s in view_scales:
                    pa, qa = tensors(a, anchor, s)
                    pl, ql = tensors(2, local_feats, s)
                    terms += pair_terms(pa, qa, 0, pl, ql, j * rows, rows, 1.0 / (2 * n_local * len(view_scales)),
                                        1)
    out = cosine_pair_loss(preds, projs, terms, 2, eps)
    return out[0], out[1]
