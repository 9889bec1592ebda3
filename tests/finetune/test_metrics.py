"""Metrics equal hand-computed values on toy volumes."""

import math

import numpy as np
import pytest
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from pcrlv2_fast.finetune.metrics import (
    classification_metrics,
    nan_to_none,
    segmentation_metrics,
    summarize_segmentation,
)


def _toy():
    label = np.zeros((12, 10, 8), dtype=np.uint8)
    label[2:7, 2:7, 1:5] = 1
    label[8:11, 1:4, 4:7] = 2
    pred = np.zeros_like(label)
    pred[3:8, 2:7, 1:5] = 1  # shifted by one voxel along x
    pred[8:11, 1:4, 5:7] = 2  # one slice short
    pred[0, 9, 0] = 2  # a stray voxel
    return pred, label


def _hand_dice(pred, label, c):
    a, b = pred == c, label == c
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def _hand_hd95(pred, label, c, spacing):
    """Surface voxels (mask minus its erosion), all pairwise distances in mm, 95th percentile each way."""
    def surface(mask):
        return np.argwhere(mask & ~binary_erosion(mask)) * np.asarray(spacing)
    a, b = surface(pred == c), surface(label == c)
    d = cdist(a, b)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_dice_and_hd95_match_hand_values():
    pred, label = _toy()
    spacing = (1.0, 1.5, 2.0)
    m = segmentation_metrics(pred, label, num_classes=3, spacing=spacing, hd95=True)
    for c in (1, 2):
        assert m["dice"][c - 1] == pytest.approx(_hand_dice(pred, label, c), abs=1e-6)
        assert m["hd95"][c - 1] == pytest.approx(_hand_hd95(pred, label, c, spacing), abs=1e-4)


def test_absent_class_is_nan_and_left_out_of_means():
    pred, label = _toy()
    label2 = np.where(label == 2, 0, label)
    m = segmentation_metrics(pred, label2, num_classes=3)
    assert m["dice"][0] == pytest.approx(_hand_dice(pred, label2, 1)) and math.isnan(m["dice"][1])
    rows = [m, segmentation_metrics(pred, label, num_classes=3)]
    summary = summarize_segmentation(rows, ["a", "b"])
    assert summary["dice_per_class"]["b"] == pytest.approx(_hand_dice(pred, label, 2))
    assert summary["dice_per_class"]["a"] == pytest.approx(_hand_dice(pred, label, 1))
    assert summary["mean_dice"] == pytest.approx((_hand_dice(pred, label, 1) + _hand_dice(pred, label, 2)) / 2)
    assert nan_to_none({"x": [math.nan, 1.0]}) == {"x": [None, 1.0]}


def test_empty_prediction_scores_zero_dice_and_nan_hd95():
    _, label = _toy()
    m = segmentation_metrics(np.zeros_like(label), label, num_classes=3, hd95=True)
    assert m["dice"] == [0.0, 0.0] and all(math.isnan(v) for v in m["hd95"])


def _hand_auc(scores, labels):
    """Mann-Whitney: the share of (positive, negative) pairs ranked correctly, ties counting half."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_binary_auc_and_accuracy_match_hand_values():
    p1 = np.array([0.9, 0.3, 0.6, 0.2, 0.6, 0.8, 0.1])
    labels = [1, 0, 1, 0, 0, 1, 1]
    m = classification_metrics(np.stack([1 - p1, p1], axis=1), labels)
    assert m["auc"] == pytest.approx(_hand_auc(p1, labels))
    assert m["accuracy"] == pytest.approx(np.mean((p1 > 0.5) == np.array(labels)))


def test_multiclass_auc_is_macro_one_vs_rest_and_single_class_is_nan():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=12)
    labels = [0, 1, 2] * 4
    m = classification_metrics(probs, labels)
    expected = np.mean([_hand_auc(probs[:, k], [int(y == k) for y in labels]) for k in range(3)])
    assert m["auc"] == pytest.approx(expected)
    assert math.isnan(classification_metrics(probs[:3], [1, 1, 1])["auc"])
