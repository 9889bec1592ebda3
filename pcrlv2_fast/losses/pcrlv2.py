"""The PCRLv2 objective, written from the paper's formulas and the official ``train_3d`` step.

Per step, with cos(a, b) the cosine similarity over the feature dimension and sg the stop-gradient:

- pair(o1, o2, i) = -0.5 * (mean cos(pred1_i, sg(proj2_i)) + mean cos(pred2_i, sg(proj1_i)))
- global = pair(x1, x2, i) with one random decoder scale i per step
- local  = mean over the local views l_j of pair(x1, l_j, random scale) and pair(x2, l_j, random scale)
- restore = MSE(restoration(x1), gt);  deep = beta * MSE(masks(x1)[i], gt), i the global pair's scale,
  beta = 0.5 * (1 + cos(pi * epoch / total_epochs)) over the run's own length (the official hard-codes 240)
- total = global + local + restore + deep

``all_scales=True`` is the paper's multi-task form: every pair and the deep supervision use all three
scales, averaged, instead of one random scale. All terms are computed in float32 whatever the autocast dtype.

``kernels="triton"`` computes the same terms with the fused kernels (one launch for every cosine pair, one
for the restoration MSEs, reading the deep-supervision masks at their own resolution) from the same scale
draws in the same order. Masks may be given upsampled to the target's size or at their own resolution
(``NonSkipUNet3D(upsample_masks=False)``) on either path.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..nn.dispatch import check_kernels, triton_usable
from ..reference.fused_losses import upsample_mask
from ..utils.schedule import cosine_factor

Features = list  # per scale: [proj (B, C), pred (B, C)]


@dataclass
class LossTerms:
    total: torch.Tensor
    global_: torch.Tensor
    local: torch.Tensor
    restore: torch.Tensor
    deep: torch.Tensor
    beta: float
    scale: int  # the global pair's scale (also the deep-supervision scale); -1 with all_scales
    pair_scales: tuple[int, ...] = ()  # every scale a cosine pair read (the heads that get a gradient)

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_global": float(self.global_.detach()),
            "loss_local": float(self.local.detach()),
            "loss_restore": float(self.restore.detach()),
            "loss_deep": float(self.deep.detach()),
            "beta": self.beta,
        }


def beta_schedule(epoch: float, total_epochs: float) -> float:
    """Weight of the deep-supervision term: 1 at the start, annealed by a half cosine over the run."""
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}")
    return cosine_factor(epoch, total_epochs)


def pair_loss(feats_a: Features, feats_b: Features, scale: int) -> torch.Tensor:
    """Symmetric stop-gradient negative cosine between two views' outputs at one decoder scale."""
    proj_a, pred_a = (t.float() for t in feats_a[scale])
    proj_b, pred_b = (t.float() for t in feats_b[scale])
    return -0.5 * (
        F.cosine_similarity(pred_a, proj_b.detach()).mean() + F.cosine_similarity(pred_b, proj_a.detach()).mean()
    )


def pair_loss_all_scales(feats_a: Features, feats_b: Features) -> torch.Tensor:
    return torch.stack([pair_loss(feats_a, feats_b, s) for s in range(len(feats_a))]).mean()


def split_views(feats: Features, n_views: int) -> list[Features]:
    """Split features of ``n_views`` views batched view-major (rows j*B:(j+1)*B are view j) into per-view lists."""
    out = [[] for _ in range(n_views)]
    for proj, pred in feats:
        if proj.shape[0] % n_views:
            raise ValueError(f"batch of {proj.shape[0]} rows is not a multiple of {n_views} local views")
        for j, (pj, qj) in enumerate(zip(proj.chunk(n_views), pred.chunk(n_views))):
            out[j].append([pj, qj])
    return out


class PCRLv2Loss:
    """Combines the four PCRLv2 terms; scale draws come from the ``random.Random`` passed per call.

    ``kernels``: "torch" (the formulas as written) or "triton" (the fused loss kernels; on CPU tensors they run
    only under the Triton interpreter, elsewhere the torch path runs and the fallback is logged once).
    """

    def __init__(self, total_epochs: float, n_local: int = 6, all_scales: bool = False, kernels: str = "torch"):
        if total_epochs <= 0:
            raise ValueError(f"total_epochs must be positive, got {total_epochs}")
        self.total_epochs = total_epochs
        self.n_local = n_local
        self.all_scales = all_scales
        self.kernels = check_kernels(kernels)

    def __call__(
        self,
        restoration: torch.Tensor,
        masks: list[torch.Tensor],
        feats1: Features,
        feats2: Features,
        local_feats: Features | None,
        gt: torch.Tensor,
        epoch: float,
        rng: random.Random,
    ) -> LossTerms:
        if self.kernels == "triton" and triton_usable(restoration, "PCRLv2Loss"):
            return self._fused(restoration, masks, feats1, feats2, local_feats, gt, epoch, rng)
        n_scales = len(feats1)
        gt = gt.float()
        beta = beta_schedule(epoch, self.total_epochs)
        if self.all_scales:
            scale, used = -1, set(range(n_scales))
            loss_global = pair_loss_all_scales(feats1, feats2)
            deep = torch.stack([F.mse_loss(upsample_mask(m, gt.shape[2:]).float(), gt) for m in masks]).mean()
        else:
            scale = rng.randint(0, n_scales - 1)
            used = {scale}
            loss_global = pair_loss(feats1, feats2, scale)
            deep = F.mse_loss(upsample_mask(masks[scale], gt.shape[2:]).float(), gt)
        loss_local = restoration.new_zeros((), dtype=torch.float32)
        if local_feats is not None and self.n_local > 0:
            terms = []
            for view in split_views(local_feats, self.n_local):
                for anchor in (feats1, feats2):
                    if self.all_scales:
                        terms.append(pair_loss_all_scales(anchor, view))
                    else:
                        local_scale = rng.randint(0, n_scales - 1)
                        used.add(local_scale)
                        terms.append(pair_loss(anchor, view, local_scale))
            loss_local = torch.stack(terms).mean()
        restore = F.mse_loss(restoration.float(), gt)
        deep = beta * deep
        total = loss_global + loss_local + restore + deep
        return LossTerms(total, loss_global, loss_local, restore, deep, beta, scale, tuple(sorted(used)))

    def _fused(self, restoration, masks, feats1, feats2, local_feats, gt, epoch, rng) -> LossTerms:
        """The same terms through the fused kernels; the scale draws are taken in the torch path's order (the
        global scale, then per local view the scales of its pairs with x1 and with x2)."""
        from ..kernels.cosine_loss import pcrlv2_cosine_losses
        from ..kernels.restoration_loss import pcrlv2_restoration_losses

        n_scales = len(feats1)
        beta = beta_schedule(epoch, self.total_epochs)
        has_local = local_feats is not None and self.n_local > 0
        if self.all_scales:
            scale, global_scale, local_scales = -1, None, None
        else:
            scale = global_scale = rng.randint(0, n_scales - 1)
            local_scales = [rng.randint(0, n_scales - 1) for _ in range(2 * self.n_local)] if has_local else None
        loss_global, loss_local = pcrlv2_cosine_losses(feats1, feats2, local_feats if has_local else None,
                                                       self.n_local, global_scale, local_scales)
        restore, deep = pcrlv2_restoration_losses(restoration, masks, gt, beta, scale)
        total = loss_global + loss_local + restore + deep
        used = range(n_scales) if self.all_scales else {global_scale, *(local_scales or ())}
        return LossTerms(total, loss_global, loss_local, restore, deep, beta, scale, tuple(sorted(used)))
