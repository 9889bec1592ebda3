"""The term list of the fused cosine loss, without Triton: the kernel (``cosine_loss.py``), its reference
(``pcrlv2_fast.reference.fused_losses``) and the objective all describe their pairs with it."""

from __future__ import annotations

from typing import NamedTuple


class CosineTerm(NamedTuple):
    """``weight * mean_{r < rows} cos(preds[pred][pred_row + r], sg(projs[proj][proj_row + r]))`` into ``slot``."""

    pred: int
    pred_row: int
    proj: int
    proj_row: int
    rows: int
    weight: float
    slot: int


def pair_terms(pred_a: int, proj_a: int, row_a: int, pred_b: int, proj_b: int, row_b: int, rows: int,
               weight: float, slot: int) -> list[CosineTerm]:
    """The two directed terms of a symmetric pair: weight * -0.5 * (cos(pred_a, sg proj_b) + cos(pred_b, sg proj_a))."""
    return [CosineTerm(pred_a, row_a, proj_b, row_b, rows, -0.5 * weight, slot),
            CosineTerm(pred_b, row_b, proj_a, row_a, rows, -0.5 * weight, slot)]
