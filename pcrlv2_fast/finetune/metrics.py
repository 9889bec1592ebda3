"""Fine-tuning metrics, computed with MONAI: Dice and HD95 per foreground class, ROC AUC and accuracy; and, in
numpy, the per-label ROC AUC of multi-label classification (chest X-ray findings).

Conventions (MONAI's): a class absent from a case's ground truth gets Dice NaN for that case (whatever was
predicted) and is left out of that class's mean; HD95 is NaN when the class is missing from the prediction or the
truth. Means over cases and classes ignore NaN; a class never present gives NaN, written as ``null`` in JSON.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["segmentation_metrics", "summarize_segmentation", "classification_metrics", "multilabel_auc", "nan_to_none",
           "roc_auc"]


def _one_hot(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(X, Y, Z) class indices -> (1, K, X, Y, Z) float one-hot."""
    return F.one_hot(index.long(), num_classes).permute(3, 0, 1, 2).unsqueeze(0).float()


def segmentation_metrics(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    hd95: bool = False,
) -> dict[str, list[float]]:
    """Per foreground class (1..K-1) Dice, and HD95 in mm (voxels when ``spacing`` is None) if asked.

    ``pred`` and ``label`` are (X, Y, Z) class-index maps of one case.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    pred, label = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(label))
    if pred.shape != label.shape or pred.dim() != 3:
        raise ValueError(f"pred and label must be (X, Y, Z) maps of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(label.shape)}")
    p, y = _one_hot(pred, num_classes), _one_hot(label, num_classes)
    out = {"dice": DiceMetric(include_background=False, reduction="none")(p, y)[0].tolist()}
    if hd95:
        metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        with warnings.catch_warnings():
            # MONAI warns for each class missing from the prediction or truth; the NaN it returns says the same.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)  # a deprecation inside MONAI's own helpers
            values = metric(p, y, spacing=list(spacing) if spacing is not None else None)[0]
        out["hd95"] = [v if math.isfinite(v) else math.nan for v in values.tolist()]
    return out


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def summarize_segmentation(per_case: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Means over cases per class and over classes, from :func:`segmentation_metrics` rows."""
    summary: dict = {}
    for key in ("dice", "hd95"):
        if not per_case or key not in per_case[0]:
            continue
        per_class = {name: _nanmean(row[key][i] for row in per_case) for i, name in enumerate(class_names)}
        summary[f"{key}_per_class"] = per_class
        summary[f"mean_{key}"] = _nanmean(per_class.values())
    return summary


def classification_metrics(probs: torch.Tensor | np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """ROC AUC (binary; macro one-vs-rest for more classes) and accuracy from (N, K) probabilities.

    AUC is NaN when the labels hold a single class.
    """
    from monai.metrics import ROCAUCMetric

    probs = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if probs.dim() != 2 or probs.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, K) with N = len(labels), got {tuple(probs.shape)} and {len(y)} labels")
    accuracy = float((probs.argmax(dim=1) == y).float().mean()) if len(y) else math.nan
    if len(torch.unique(y)) < 2:
        return {"auc": math.nan, "accuracy": accuracy}
    metric = ROCAUCMetric(average="macro")
    if probs.shape[1] == 2:
        metric(probs[:, 1], y)
    else:
        metric(probs, F.one_hot(y, probs.shape[1]))
    return {"auc": float(metric.aggregate()), "accuracy": accuracy}


def nan_to_none(obj):
    """A JSON-safe copy: NaN/inf floats become None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of one binary label: the probability that a positive scores above a negative (ties
    count half; the Mann-Whitney statistic over average ranks). NaN when only one class is present."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be equal-length vectors, got {scores.shape} and {labels.shape}")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # Average rank (1-based) within each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multilabel_auc(probs, labels, names: Sequence[str]) -> dict:
    """Per-label ROC AUC (``auc_per_class``, NaN where a label has one class only) and their mean over the defined
    ones (``mean_auc``), from (N, K) scores and (N, K) 0/1 labels."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.shape != labels.shape or probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"probs and labels must both be (N, {len(names)}), got {probs.shape} and {labels.shape}")
    per_class = {name: roc_auc(probs[:, k], labels[:, k]) for k, name in enumerate(names)}
    return {"mean_auc": _nanmean(per_class.values()), "auc_per_class": per_class}
