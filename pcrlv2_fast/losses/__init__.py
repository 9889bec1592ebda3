"""The PCRLv2 objective: multi-scale siamese cosine terms plus multi-scale pixel restoration."""

from .pcrlv2 import LossTerms, PCRLv2Loss, beta_schedule, pair_loss, pair_loss_all_scales, split_views

__all__ = ["LossTerms", "PCRLv2Loss", "beta_schedule", "pair_loss", "pair_loss_all_scales", "split_views"]
