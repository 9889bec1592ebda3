"""A frozen-encoder probe: how well an encoder's features separate the classes of a few labelled volumes, measured
in seconds, so that a pretraining run shows its representation improving, or not (``pretrain --probe DATA``).

The probe is a per-voxel linear classifier on the encoder's feature pyramid (every stage upsampled to full
resolution and concatenated): linear discriminant analysis, fit in closed form (class means and a shrunk shared
covariance from voxels drawn equally per class, priors from the classes' shares of the volumes). It is fit on the
first half of the probe cases (voxels drawn with a seed) and scored by Dice on every voxel of the other half.
Deterministic for a seed: fixed cases, fixed voxel draws, a float64 solve, no SGD.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders import PCRLv2Encoder3D, pad_to_divisor
from .data import LoadedCase, Preprocessing, finalize_labels, find_cases, load_cases
from .metrics import segmentation_metrics

__all__ = ["ProbeSet", "load_probe_set", "VoxelProbe"]


@dataclass
class ProbeSet:
    """Labelled volumes of a probe: ``fit`` cases train the classifier, ``score`` cases are scored."""

    fit: list[LoadedCase]
    score: list[LoadedCase]
    num_classes: int
    source: str


def _crop_around_foreground(case: LoadedCase, max_shape: Sequence[int]) -> LoadedCase:
    """The case cut to at most ``max_shape`` voxels, centred on its foreground's bounding box (bounds the cost)."""
    shape = np.asarray(case.label.shape)
    size = np.minimum(shape, max_shape)
    found = np.argwhere(case.label > 0)
    centre = (found.min(axis=0) + found.max(axis=0)) // 2 if len(found) else shape // 2
    start = np.clip(centre - size // 2, 0, shape - size)
    box = tuple(slice(int(a), int(a + s)) for a, s in zip(start, size, strict=True))
    case.image = np.ascontiguousarray(case.image[(slice(None), *box)])
    case.label = np.ascontiguousarray(case.label[box])
    return case


def load_probe_set(data: str | os.PathLike, max_cases: int = 8, spacing: tuple[float, float, float] | None = None,
                   modality: str = "auto", max_shape: Sequence[int] = (96, 96, 64)) -> ProbeSet:
    """The first ``max_cases`` labelled cases of ``data`` (sorted by case id; any layout :func:`find_cases` reads),
    loaded as fine-tuning loads them, each cut to at most ``max_shape`` voxels around its foreground; half fit the
    probe and half score it."""
    cases, _ = find_cases(data, "seg")
    if len(cases) < 2 or max_cases < 2:
        raise ValueError(f"{data}: the probe needs at least 2 labelled cases (half to fit it, half to score it); "
                         f"found {len(cases)}, max_cases {max_cases}")
    cases = sorted(cases, key=lambda c: c.case_id)[:max_cases]
    prep = Preprocessing(spacing=spacing, modality=modality)
    loaded = load_cases(cases, prep, "seg", progress=False)
    if loaded[0].image.shape[0] != 1:
        raise ValueError(f"{data}: probe cases have {loaded[0].image.shape[0]} input channels; pretraining is on "
                         "one channel, so the probe needs single-channel images")
    num_classes = finalize_labels(loaded, prep, "seg", source=str(data))
    loaded = [_crop_around_foreground(case, max_shape) for case in loaded]
    half = len(loaded) // 2
    return ProbeSet(loaded[:half], loaded[half:], num_classes, str(data))


class VoxelProbe:
    """``probe(state_dict)`` -> {"probe_dice": mean foreground Dice, "probe_dice_per_class": [...]} for the encoder in
    a model's state_dict (any key prefix; e.g. the pretraining network's ``state_dict()``)."""

    def __init__(self, probe_set: ProbeSet, voxels_per_class: int = 2000, ridge: float = 1e-2, seed: int = 0,
                 norm: str | None = None, act: str | None = None):
        if voxels_per_class < 1 or ridge <= 0:
            raise ValueError(f"voxels_per_class must be >= 1 and ridge > 0, got {voxels_per_class}, {ridge}")
        self.set, self.ridge, self.norm, self.act = probe_set, ridge, norm, act
        rng = np.random.default_rng(seed)
        # The voxels the classifier is fit on, drawn once: every evaluation of the run uses the same ones.
        self.samples = [self._draw(case.label, voxels_per_class, rng) for case in probe_set.fit]
        counts = np.bincount(np.concatenate([c.label.reshape(-1) for c in probe_set.fit]),
                             minlength=probe_set.num_classes)
        self.prior = torch.from_numpy(counts / counts.sum())

    def _draw(self, label: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
        """Flat indices of up to ``per_class`` voxels of each class present in ``label``."""
        flat = label.reshape(-1)
        picks = []
        for k in range(self.set.num_classes):
            where = np.flatnonzero(flat == k)
            if len(where):
                picks.append(rng.choice(where, size=min(per_class, len(where)), replace=False))
        return np.sort(np.concatenate(picks))

    @torch.no_grad()
    def _features(self, encoder: PCRLv2Encoder3D, image: np.ndarray) -> torch.Tensor:
        """(voxels, channels) float64: every stage's features upsampled to the image's grid."""
        x, sizes = pad_to_divisor(torch.from_numpy(image)[None].float())
        pyramid = encoder(x)
        full = [pyramid[0]] + [F.interpolate(f, size=x.shape[2:], mode="trilinear", align_corners=False)
                               for f in pyramid[1:]]
        feats = torch.cat(full, dim=1)[0, :, : sizes[0], : sizes[1], : sizes[2]]
        return feats.reshape(feats.shape[0], -1).T.double()

    def __call__(self, state: Mapping[str, torch.Tensor]) -> dict:
        cpu_state = {k: v.detach().float().cpu() for k, v in state.items()}
        encoder = PCRLv2Encoder3D.from_state_dict(cpu_state, "the network being probed", norm=self.norm,
                                                  act=self.act).eval()
        rows = [self._features(encoder, case.image)[index] for case, index in
                zip(self.set.fit, self.samples, strict=True)]
        labels = np.concatenate([case.label.reshape(-1)[index] for case, index in
                                 zip(self.set.fit, self.samples, strict=True)])
        x = torch.cat(rows)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - mean) / std
        y = torch.from_numpy(labels.astype(np.int64))
        # Linear discriminant analysis: class means, one shared (shrunk) covariance, the classes' shares of the
        # fit volumes as priors, so rare classes are neither lost nor over-predicted.
        present = [k for k in range(self.set.num_classes) if bool((y == k).any())]
        means = torch.stack([x[y == k].mean(0) for k in present])
        centred = x - means[torch.searchsorted(torch.tensor(present), y)]
        cov = centred.T @ centred / len(x) + self.ridge * torch.eye(x.shape[1], dtype=x.dtype)
        w = torch.linalg.solve(cov, means.T)  # (channels, classes)
        b = -0.5 * (means * w.T).sum(1) + torch.log(self.prior[present].clamp_min(1e-12))
        classes = torch.tensor(present)
        dice = []
        for case in self.set.score:
            z = (self._features(encoder, case.image) - mean) / std
            predicted = classes[(z @ w + b).argmax(1)].numpy().reshape(case.label.shape)
            dice.append(segmentation_metrics(predicted, case.label, self.set.num_classes)["dice"])
        per_class = np.nanmean(np.array(dice), axis=0)
        return {"probe_dice": float(np.nanmean(per_class)), "probe_dice_per_class": [float(v) for v in per_class]}

