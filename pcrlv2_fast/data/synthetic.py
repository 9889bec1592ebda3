"""Synthetic scans and X-rays for profiling and benchmarks: random data of a realistic size, no files needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import Volume

# Large enough for every official global crop (the crop geometry needs margins around 64 x 64 x 32).
SHAPES = ((136, 128, 104), (132, 124, 100))


def synthetic_volumes(seed: int = 0, shapes=SHAPES) -> list[Volume]:
    """int16 CT-like scans (HU, normal around -300 with 400 spread, clipped to [-1024, 3000]) at 1 mm, windowed
    as the preprocessing cache windows CT (-1000..1000)."""
    rng = np.random.default_rng(seed)
    volumes = []
    for i, shape in enumerate(shapes):
        hu = rng.normal(-300.0, 400.0, size=shape).clip(-1024, 3000).astype(np.int16)
        volumes.append(Volume(name=f"synthetic_{i}", source=Path(f"synthetic_{i}"), array=hu, spacing=(1.0, 1.0, 1.0),
                              modality="ct", window=(-1000.0, 1000.0)))
    return volumes


def synthetic_images(seed: int = 0, n: int = 16, size: int = 512):
    """An ImageBank of ``n`` random 8-bit ``size`` x ``size`` images (the NIH X-rays' stored size here)."""
    from .images2d import ImageBank

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]
    return ImageBank.from_arrays(images, [f"synthetic_{i}.png" for i in range(n)])
