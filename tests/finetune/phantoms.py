"""Synthetic labelled volumes for the fine-tuning tests: bright spheres to segment in a noisy CT-like body."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING = (1.5, 1.5, 2.0)


def write_volume(array: np.ndarray, path: Path, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    """Write an (x, y, z) array as a scan file (format from the suffix)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def sphere_phantom(shape=(40, 40, 24), seed: int = 0, n_spheres: int = 2, classes: int = 1):
    """(image in HU int16, label uint8): air border, soft-tissue body with noise, bright spheres labelled 1..classes
    (sphere i gets class 1 + i % classes; class 2 spheres are brighter)."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0)
    hu[2:-2, 2:-2, 1:-1] = 0.0
    label = np.zeros(shape, dtype=np.uint8)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float32)
    for i in range(n_spheres):
        radius = rng.uniform(0.18, 0.25) * min(shape)
        centre = [rng.uniform(radius + 2, n - radius - 2) for n in shape]
        inside = ((grid - np.array(centre)) ** 2).sum(-1) < radius**2
        cls = 1 + i % classes
        hu[inside] = 250.0 * (1 + cls)
        label[inside] = cls
    hu += rng.normal(0.0, 60.0, size=shape)
    return np.clip(hu, -1024, 3000).astype(np.int16), label


def write_pairs(folder: Path, n: int = 6, shape=(40, 40, 24), classes: int = 1, seed: int = 0,
                suffix: str = ".nii.gz") -> Path:
    """``<case>_image`` / ``<case>_label`` pairs ``case000...`` in ``folder``."""
    for i in range(n):
        image, label = sphere_phantom(shape, seed=seed + i, classes=classes)
        write_volume(image, folder / f"case{i:03d}_image{suffix}")
        write_volume(label, folder / f"case{i:03d}_label{suffix}")
    return folder
