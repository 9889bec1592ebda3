"""Small synthetic chest-X-ray-like PNGs for the 2D tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def xray_like(height: int, width: int, seed: int) -> np.ndarray:
    """An 8-bit image with a bright body, two dark lungs and noise (structure for crops to differ on)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.5) / 0.5) ** 2 < 1
    lungs = sum(((x - cx) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1 for cx in (0.3, 0.7)) > 0
    image = 20 + 160 * body - 110 * lungs + rng.normal(0, 12, (height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def xray_dir(tmp_path_factory) -> Path:
    """Six 8-bit PNGs of two sizes (96 x 128 and 128 x 112), in a nested folder."""
    folder = tmp_path_factory.mktemp("xrays")
    (folder / "sub").mkdir()
    for k in range(6):
        h, w = (96, 128) if k % 2 else (128, 112)
        Image.fromarray(xray_like(h, w, k)).save(folder / ("sub" if k > 3 else ".") / f"img{k}.png")
    return folder
