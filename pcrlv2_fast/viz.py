"""Pictures of a pretraining run: one sample's restoration and the loss curves.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas instead of ``pyplot``, so drawing works
without a display, leaves pyplot's global figure list and backend alone, and is safe to call from a training loop.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .utils.io import atomic_write

_PANEL_TITLES = ("input", "target", "restoration", "deep sup. 1/4", "deep sup. 1/2", "deep sup. 1/1")


def _to_volume(name: str, value: Any) -> np.ndarray:
    """A (1, X, Y, Z) or (X, Y, Z) tensor or array as a float32 (X, Y, Z) numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor; duck-typed so this module does not import torch
        value = value.detach().float().cpu().numpy()
    array = np.asarray(value, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(
            f"{name} must be one sample shaped (1, X, Y, Z) or (X, Y, Z), got shape {tuple(array.shape)}; "
            "pass e.g. batch[0] rather than the whole batch"
        )
    return array


def _slices(volume: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    """The middle slice in each orientation, transposed for imshow (rows = vertical axis), with its origin."""
    x, y, z = volume.shape
    return [
        # Axial: x across, y down, as scans are usually shown.
        (f"axial z={z // 2}", volume[:, :, z // 2].T, "upper"),
        # Coronal and sagittal: z (the short axis) pointing up.
        (f"coronal y={y // 2}", volume[:, y // 2, :].T, "lower"),
        (f"sagittal x={x // 2}", volume[x // 2, :, :].T, "lower"),
    ]


def _display_range(volume: np.ndarray) -> tuple[float, float]:
    """Robust colour range for the z-normalised input: a few outlier voxels should not wash out the slice."""
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi)


def save_restoration_png(
    path: str | os.PathLike,
    x1: Any,
    gt: Any,
    restoration: Any,
    masks: Sequence[Any],
    title: str | None = None,
) -> Path:
    """Write :func:`restoration_figure` to ``path`` as a PNG, atomically; returns the path."""
    return save_figure(restoration_figure(x1, gt, restoration, masks, title), path)


def restoration_figure(x1: Any, gt: Any, restoration: Any, masks: Sequence[Any], title: str | None = None) -> Figure:
    """One sample's input, target, restoration and deep-supervision outputs: middle slice per orientation.

    Columns are "input", "target", "restoration", "deep sup. 1/4", "deep sup. 1/2", "deep sup. 1/1"; rows are the
    axial (z = Z // 2), coronal (y = Y // 2) and sagittal (x = X // 2) slices.

    Args:
        x1: the augmented, z-normalised network input; shown with its own colour range.
        gt: the restoration target in [0, 1].
        restoration: the network's restoration.
        masks: the three full-size deep-supervision outputs, scales 1/4, 1/2 and 1/1.
        title: optional figure title, e.g. the step.

    Every volume is shaped (1, X, Y, Z) or (X, Y, Z) and all must have the same shape. Target, restoration and
    deep-supervision outputs share the gray scale 0..1 so they can be compared by eye.
    """
    if len(masks) != 3:
        raise ValueError(f"masks must hold the 3 deep-supervision outputs (1/4, 1/2, 1/1), got {len(masks)}")
    volumes = [_to_volume("x1", x1), _to_volume("gt", gt), _to_volume("restoration", restoration)]
    volumes += [_to_volume(f"masks[{i}]", m) for i, m in enumerate(masks)]
    shape = volumes[1].shape
    for name, volume in zip(("x1", "gt", "restoration", "masks[0]", "masks[1]", "masks[2]"), volumes, strict=True):
        if volume.shape != shape:
            raise ValueError(f"{name} has shape {volume.shape} but gt has {shape}; all volumes must match")

    x, y, z = shape
    # Rows sized to their slices' aspect (axial x by y, coronal x by z, sagittal y by z) so little space is blank.
    panel_w = 2.0
    heights = [y / x, z / x, z / y]
    fig = Figure(figsize=(panel_w * 6, panel_w * sum(heights) + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 6, gridspec_kw={"height_ratios": heights}, squeeze=False)
    input_range = _display_range(volumes[0])
    for col, volume in enumerate(volumes):
        vmin, vmax = input_range if col == 0 else (0.0, 1.0)
        for row, (label, image, origin) in enumerate(_slices(volume)):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin=origin, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(_PANEL_TITLES[col], fontsize=10)
            if col == 0:
                ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def _read_metrics(metrics_jsonl: Path, key: str = "loss") -> list[dict[str, Any]]:
    """Rows of a metrics JSONL file that have numeric ``step`` and ``key``; later rows win for a repeated step."""
    if not metrics_jsonl.is_file():
        raise FileNotFoundError(f"metrics file not found: {metrics_jsonl}")
    lines = metrics_jsonl.read_text(encoding="utf-8").splitlines()
    by_step: dict[float, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                # A run that is still writing (or was killed mid-write) can leave a partial last line.
                warnings.warn(f"{metrics_jsonl}:{number}: skipping incomplete last line", stacklevel=3)
                continue
            raise ValueError(f"{metrics_jsonl}:{number}: not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or not _is_number(row.get("step")) or not _is_number(row.get(key)):
            continue  # e.g. a header, or a probe row when reading training rows
        # A resumed run logs the steps after its checkpoint again; the newer values replace the older ones.
        by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def save_loss_curve_png(metrics_jsonl: str | os.PathLike, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write :func:`loss_curve_figure` to ``path`` as a PNG, atomically; returns the path."""
    return save_figure(loss_curve_figure(metrics_jsonl, title), path)


def loss_curve_figure(metrics_jsonl: str | os.PathLike, title: str | None = None) -> Figure:
    """The total loss and each ``loss_*`` term against step, the learning rate below if it was logged, and the
    frozen-encoder probe's Dice (``pretrain --probe``) below that if there are probe rows.

    Rows without a numeric ``step`` and ``loss`` are ignored. The y axis is linear because the global and local
    cosine terms are negative.

    Raises:
        FileNotFoundError: ``metrics_jsonl`` does not exist.
        ValueError: it has no usable rows, or a line other than the last is not valid JSON.
    """
    rows = _read_metrics(Path(metrics_jsonl))
    if not rows:
        raise ValueError(f"{metrics_jsonl} has no rows with numeric 'step' and 'loss' to plot")
    probe = _read_metrics(Path(metrics_jsonl), "probe_dice")
    loss_keys = ["loss"] + sorted({k for row in rows for k in row if k.startswith("loss_") and _is_number(row[k])})
    has_lr = any(_is_number(row.get("lr")) for row in rows)

    ratios = [3] + [1] * has_lr + [1.5] * bool(probe)
    fig = Figure(figsize=(8, 4.5 + 2 * (len(ratios) - 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ratios), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios})
    ax = axes[0][0]
    for key in loss_keys:
        steps, values = _series(rows, key)
        ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
    ax.axhline(0.0, color="0.6", linewidth=0.6)
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    if has_lr:
        lr_ax = axes[1][0]
        lr_ax.plot(*_series(rows, "lr"), color="tab:gray")
        lr_ax.set_ylabel("lr")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        lr_ax.grid(alpha=0.3)
    if probe:
        probe_ax = axes[-1][0]
        probe_ax.plot(*_series(probe, "probe_dice"), marker="o", color="tab:green")
        probe_ax.set_ylabel("probe Dice")
        probe_ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return fig


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``key``; a row without it gives NaN, which leaves a gap instead of joining across it."""
    steps = [row["step"] for row in rows]
    values = [row[key] if _is_number(row.get(key)) else math.nan for row in rows]
    return steps, values


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG, atomically (a half-written picture never replaces a good one)."""
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path


def _to_image(name: str, value: Any) -> np.ndarray:
    """A (C, H, W) or (H, W) tensor or array as its first channel, float32 (H, W)."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    array = np.asarray(value, dtype=np.float32)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name} must be one image shaped (C, H, W) or (H, W), got shape {tuple(np.shape(value))}")
    return array


def save_restoration_png_2d(path: str | os.PathLike, x1: Any, gt: Any, restoration: Any, masks: Sequence[Any],
                            title: str | None = None) -> Path:
    """Write :func:`restoration_figure_2d` to ``path`` as a PNG, atomically; returns the path."""
    return save_figure(restoration_figure_2d(x1, gt, restoration, masks, title), path)


def restoration_figure_2d(x1: Any, gt: Any, restoration: Any, masks: Sequence[Any], title: str | None = None) -> Figure:
    """One 2D sample in a row: the network input, the target, the restoration and the deep-supervision outputs
    (coarsest first), first channel of each, all of one shape. Target, restoration and deep-supervision outputs
    share the target's colour range; the input (cutout holes and jitter) has its own."""
    images = [_to_image("x1", x1), _to_image("gt", gt), _to_image("restoration", restoration)]
    images += [_to_image(f"masks[{i}]", m) for i, m in enumerate(masks)]
    for name, image in zip(("x1", "restoration", *(f"masks[{i}]" for i in range(len(masks)))),
                           images[:1] + images[2:], strict=True):
        if image.shape != images[1].shape:
            raise ValueError(f"{name} has shape {image.shape} but gt has {images[1].shape}; all images must match")
    n = len(masks)
    titles = ["input", "target", "restoration", *(f"deep sup. 1/{2 ** (n - 1 - i)}" for i in range(n))]
    fig = Figure(figsize=(2.0 * len(images), 2.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    target_range = _display_range(images[1])
    for col, (image, label) in enumerate(zip(images, titles, strict=True)):
        vmin, vmax = _display_range(image) if col == 0 else target_range
        axes[col].imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[col].set_xticks([])
        axes[col].set_yticks([])
        axes[col].set_title(label, fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def roc_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every threshold, from (0, 0) to (1, 1)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # one point per distinct threshold
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(1, (~y).sum())], np.r_[0.0, tp / max(1, y.sum())]


def save_roc_png(path: str | os.PathLike, probs: Any, labels: Any, names: Sequence[str],
                 aucs: dict[str, float] | None = None, title: str | None = None) -> Path:
    """ROC curves of multi-label scores (N, K) against 0/1 labels (N, K), one line per label with its AUC."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    fig = Figure(figsize=(5.5, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for k, name in enumerate(names):
        if labels[:, k].min() == labels[:, k].max():
            continue  # one class only: no curve
        fpr, tpr = roc_curve_points(probs[:, k], labels[:, k])
        auc = (aucs or {}).get(name)
        ax.plot(fpr, tpr, linewidth=1.2, label=name if auc is None else f"{name} ({auc:.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "ROC (AUC in brackets)")
    return save_figure(fig, path)
