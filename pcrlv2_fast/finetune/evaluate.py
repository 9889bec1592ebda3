"""Evaluate a fine-tuned network: whole-volume predictions, metrics JSON and an overlay picture.

Segmentation predicts each volume with MONAI's sliding-window inference (windows of the training patch size,
Gaussian blending) and scores it with :func:`~pcrlv2_fast.finetune.metrics.segmentation_metrics`; classification
feeds each whole volume resized to the training input size. :func:`evaluate_checkpoint` is the ``pcrlv2-fast
evaluate`` command: it rebuilds the network, preprocessing and split from the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from tqdm import tqdm

from ..checkpoint import CheckpointError, check_state_dict, extract_state_dict, read_checkpoint
from ..data.io import ScanError
from ..utils.device import resolve_device
from ..utils.io import atomic_write
from .data import LoadedCase, Preprocessing, finalize_labels, find_cases, load_cases, resize_volume
from .metrics import classification_metrics, nan_to_none, segmentation_metrics, summarize_segmentation
from .model import model_from_arch
from .options import SPLITS

__all__ = ["predict_segmentation", "evaluate_loaded", "evaluate_checkpoint", "overlay_figure",
           "load_finetuned"]

# Slices per case and cases shown in the overlay picture.
_SLICES, _FIGURE_CASES = 3, 3


@torch.no_grad()
def predict_segmentation(model: torch.nn.Module, image: np.ndarray, roi_size: Sequence[int], device: torch.device,
                         overlap: float = 0.25, sw_batch_size: int = 2) -> np.ndarray:
    """Class-index map (X, Y, Z) of one (C, X, Y, Z) volume by sliding-window inference.

    A volume smaller than the window is first padded at the far end with each channel's minimum, as the training
    patches are (:class:`~pcrlv2_fast.finetune.data.PatchSampler`): MONAI's own padding would fill in 0, which in
    z-normalised CT is soft tissue rather than the air the network saw around small volumes.
    """
    from monai.inferers import sliding_window_inference

    roi = tuple(int(s) for s in roi_size)
    shape = image.shape[1:]
    widths = [(0, 0)] + [(0, max(r - n, 0)) for r, n in zip(roi, shape)]
    if any(w[1] for w in widths):
        image = np.stack([np.pad(ch, widths[1:], constant_values=float(ch.min())) for ch in image])
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    logits = sliding_window_inference(x, roi_size=roi, sw_batch_size=sw_batch_size, predictor=model,
                                      overlap=overlap, mode="gaussian")
    index = torch.as_tensor(logits).argmax(dim=1)[0, : shape[0], : shape[1], : shape[2]]
    return index.to(torch.uint8 if logits.shape[1] <= 256 else torch.int64).cpu().numpy()


@torch.no_grad()
def predict_classes(model: torch.nn.Module, inputs: np.ndarray, device: torch.device, batch_size: int = 4
                    ) -> np.ndarray:
    """Softmax probabilities (N, K) of resized volumes (N, C, X, Y, Z)."""
    probs = []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size])).to(device)
        probs.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(probs).numpy()


def evaluate_loaded(
    model: torch.nn.Module,
    cases: Sequence[LoadedCase],
    task: str,
    num_classes: int,
    patch_size: Sequence[int],
    class_names: Sequence[str],
    device: torch.device,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    hd95: bool = False,
    progress: bool = False,
    keep_predictions: bool = False,
) -> tuple[dict, list]:
    """Metrics of ``model`` on loaded cases, and the predictions (when ``keep_predictions``: class maps for
    segmentation, probability rows for classification)."""
    was_training = model.training
    model.eval()
    try:
        if task == "cls":
            inputs = np.stack([resize_volume(lc.image, patch_size) for lc in cases])
            probs = predict_classes(model, inputs, device)
            labels = [int(lc.label) for lc in cases]
            result = classification_metrics(probs, labels)
            result["per_case"] = [{"case": lc.case_id, "label": y, "pred": int(p.argmax()), "probs": p.tolist()}
                                  for lc, y, p in zip(cases, labels, probs)]
            result["n_cases"] = len(cases)
            return result, list(probs) if keep_predictions else []
        rows, predictions = [], []
        for lc in tqdm(cases, desc="predicting", unit="case", leave=False, disable=not progress):
            pred = predict_segmentation(model, lc.image, patch_size, device, overlap, sw_batch_size)
            row = segmentation_metrics(pred, lc.label, num_classes, spacing=lc.spacing, hd95=hd95)
            rows.append({"case": lc.case_id, **row})
            if keep_predictions:
                predictions.append(pred)
        result = summarize_segmentation(rows, class_names)
        result["per_case"] = rows
        result["n_cases"] = len(cases)
        return result, predictions
    finally:
        model.train(was_training)


def _foreground_slices(label: np.ndarray, n: int) -> list[int]:
    """Axial slices spread over the foreground's z-range (the whole volume when there is none)."""
    zs = np.nonzero(label.reshape(-1, label.shape[2]).any(axis=0))[0]
    lo, hi = (int(zs.min()), int(zs.max())) if zs.size else (0, label.shape[2] - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]})


def _label_cmap(num_classes: int) -> ListedColormap:
    from matplotlib import colormaps

    base = colormaps["tab10" if num_classes <= 11 else "tab20"]
    return ListedColormap([base(i % base.N) for i in range(max(num_classes - 1, 1))])


def overlay_figure(cases: Sequence[LoadedCase], predictions: Sequence, task: str, num_classes: int,
                   class_names: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Image / truth / prediction for a few axial slices of the first cases (segmentation), or the middle slice
    with truth and predicted class (classification)."""
    cases, predictions = list(cases)[:_FIGURE_CASES], list(predictions)[:_FIGURE_CASES]
    if task == "cls":
        fig = Figure(figsize=(3.0 * max(len(cases), 1), 3.4), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, max(len(cases), 1), squeeze=False)[0]
        names = class_names or [str(i) for i in range(num_classes)]
        for ax, lc, probs in zip(axes, cases, predictions):
            image = lc.image[0]
            ax.imshow(image[:, :, image.shape[2] // 2].T, cmap="gray", interpolation="nearest")
            pred = int(np.argmax(probs))
            ax.set_title(f"{lc.case_id}\ntruth {names[int(lc.label)]} / pred {names[pred]} ({probs[pred]:.2f})",
                         fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        if title:
            fig.suptitle(title)
        return fig
    panels = [(lc, pred, z) for lc, pred in zip(cases, predictions) for z in _foreground_slices(lc.label, _SLICES)]
    fig = Figure(figsize=(9.0, 3.0 * max(len(panels), 1) + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(panels), 1), 3, squeeze=False)
    cmap = _label_cmap(num_classes)
    for row, (lc, pred, z) in enumerate(panels):
        image = lc.image[0][:, :, z].T
        lo, hi = np.percentile(lc.image[0], [0.5, 99.5])
        for col, (name, overlay) in enumerate((("image", None), ("truth", lc.label), ("prediction", pred))):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if overlay is not None:
                mask = np.ma.masked_equal(overlay[:, :, z].T.astype(np.int64), 0)
                # Class k (1..K-1) takes the colormap's colour k-1.
                ax.imshow(mask - 1, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=0.5, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{lc.case_id} z={z}", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def write_results(out: Path, split: str, result: dict, meta: dict, cases: Sequence[LoadedCase], predictions,
                  task: str, num_classes: int, class_names: Sequence[str]) -> dict[str, Path]:
    """``<split>_metrics.json`` and ``<split>_overlays.png`` in ``out``, both written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, png_path = out / f"{split}_metrics.json", out / f"{split}_overlays.png"
    with atomic_write(metrics_path, "w") as fh:
        json.dump(nan_to_none({**meta, "split": split, **result}), fh, indent=2)
        fh.write("\n")
    headline = _headline(result, task)
    fig = overlay_figure(cases, predictions, task, num_classes, class_names, title=f"{split}: {headline}")
    with atomic_write(png_path, "wb") as fh:
        fig.savefig(fh, format="png")
    return {"metrics": metrics_path, "overlays": png_path}


def _headline(result: dict, task: str) -> str:
    n = result["n_cases"]
    cases = f"({n} case{'' if n == 1 else 's'})"
    if task == "cls":
        return f"AUC {_fmt(result.get('auc'))}, accuracy {_fmt(result.get('accuracy'))} {cases}"
    text = f"mean Dice {_fmt(result.get('mean_dice'))}"
    if "mean_hd95" in result:
        text += f", mean HD95 {_fmt(result['mean_hd95'])} mm"
    return f"{text} {cases}"


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def load_finetuned(path: str | os.PathLike, map_location="cpu", trusted: bool = False
                   ) -> tuple[torch.nn.Module, dict]:
    """The network of a fine-tuning checkpoint (weights loaded strictly) and its ``finetune`` record."""
    ckpt = read_checkpoint(path, map_location=map_location, trusted=trusted)
    meta = ckpt.get("finetune")
    if not isinstance(meta, dict) or "arch" not in meta:
        raise CheckpointError(f"{path}: not a fine-tuning checkpoint (no 'finetune' record); pass the best.pt "
                              "written by `pcrlv2-fast finetune`")
    model = model_from_arch(meta["arch"])
    state = extract_state_dict(ckpt, path)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model, meta


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "test",
    device: str = "auto",
    hd95: bool | None = None,
    progress: bool = True,
    trusted: bool = False,
) -> dict:
    """Evaluate a fine-tuning checkpoint on ``data``: the ``split`` recorded in the checkpoint (test, val, train)
    or every case (all). Writes ``<split>_metrics.json`` and ``<split>_overlays.png`` into ``out``; returns the
    metrics with a ``files`` entry."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dev = resolve_device(device)
    model, meta = load_finetuned(checkpoint, trusted=trusted)
    model.to(dev)
    task, arch = meta["task"], meta["arch"]
    cases, _ = find_cases(data, task)
    if split != "all":
        wanted = set(meta["split"][split])
        found = {c.case_id for c in cases}
        missing = sorted(wanted - found)
        if missing:
            raise ScanError(f"{data}: {len(missing)} of the checkpoint's {len(wanted)} {split} cases are not in this "
                            f"data (e.g. {missing[:3]}); pass the data it was fine-tuned on, or --split all to "
                            "evaluate every case here")
        cases = [c for c in cases if c.case_id in wanted]
    prep = Preprocessing.from_dict(meta["preprocessing"])
    if prep.keep_labels is None:
        prep = replace(prep, num_classes=arch["num_classes"])
    loaded = load_cases(cases, prep, task, progress=progress)
    num_classes = finalize_labels(loaded, prep, task, source=str(data))
    if num_classes != arch["num_classes"]:
        raise ScanError(f"{data}: labels give {num_classes} classes but {checkpoint} predicts {arch['num_classes']}")
    use_hd95 = meta.get("hd95", False) if hd95 is None else hd95
    result, predictions = evaluate_loaded(
        model, loaded, task, arch["num_classes"], meta["patch_size"], meta["class_names"], dev,
        overlap=meta.get("sw_overlap", 0.25), hd95=use_hd95, progress=progress, keep_predictions=True)
    record = {"checkpoint": str(checkpoint), "data": str(data), "task": task, "init": meta.get("init"),
              "mode": meta.get("mode"), "label_fraction": meta.get("label_fraction")}
    files = write_results(Path(out), split, result, record, loaded, predictions, task, arch["num_classes"],
                          meta["class_names"])
    return {**result, "files": {k: str(v) for k, v in files.items()}}
