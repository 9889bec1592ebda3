"""Plain-PyTorch references of the fused PCRLv2 losses (restoration_loss, cosine_pair_loss).

Written from the formulas, in float32 whatever the input dtype, with the same call signatures as the
kernels, so tests compare outputs and gradients element-wise. Importing this module needs no Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..kernels.cosine_terms import CosineTerm


def upsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The model's deep-supervision upsampling: trilinear, align_corners=False, by the integer factor per dim; a
    full-size mask is returned as is. The loss's torch path and the pictures upsample with it too."""
    factors = tuple(float(big // small) for small, big in zip(mask.shape[2:], size))
    if all(f == 1.0 for f in factors):
        return mask
    return F.interpolate(mask, scale_factor=factors, mode="trilinear", align_corners=False)


def restoration_loss_reference(restored: torch.Tensor, masks: Sequence[torch.Tensor], target: torch.Tensor,
                               weights: Sequence[float] | None = None, from_logits: bool = False) -> torch.Tensor:
    """``[MSE(restored, target), weights[k] * MSE(up(masks[k]), target)...]`` in float32."""
    weights = [1.0] * len(masks) if weights is None else list(weights)
    target = target.float()
    act = torch.sigmoid if from_logits else (lambda v: v)
    terms = [F.mse_loss(act(restored.float()), target)]
    for m, w in zip(masks, weights, strict=True):
        terms.append(w * F.mse_loss(upsample_mask(act(m.float()), target.shape[2:]), target))
    return torch.stack(terms)


def cosine_pair_loss_reference(preds: Sequence[torch.Tensor], projs: Sequence[torch.Tensor],
                               terms: Sequence[CosineTerm], n_slots: int, eps: float = 1e-8) -> torch.Tensor:
    """Sum of weighted mean cosines per slot, float32 ``(n_slots,)``; projections are detached."""
    out = [preds[0].new_zeros((), dtype=torch.float32) for _ in range(n_slots)]
    for t in terms:
        p = preds[t.pred][t.pred_row:t.pred_row + t.rows].float()
        q = projs[t.proj][t.proj_row:t.proj_row + t.rows].float().detach()
        out[t.slot] = out[t.slot] + t.weight * F.cosine_similarity(p, q, eps=eps).mean()
    return torch.stack(out)
