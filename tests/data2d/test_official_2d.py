"""Faithfulness: the engine's 2D views against the official chain (PIL/torchvision semantics, benchmarks/official_2d.py)
on the same parameters and real chest X-rays. They differ only by PIL's antialiasing, its 8-bit steps and its blur
approximation, so the views agree to a few thousandths; a wrong rotation direction, centre, crop or jitter order
would put them far apart."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pcrlv2_fast.data.views2d import ViewConfig2D, draw_view, normalize, reference_view

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from official_2d import official_item, official_view  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def xray(shared_data):
    return np.array(Image.open(sorted((shared_data / "nih-chestxray-1000").glob("*.png"))[0]))


@pytest.mark.parametrize("is_global", [True, False])
def test_views_match_the_official_chain(xray, is_global):
    rgb = Image.fromarray(xray).convert("RGB")
    image = torch.from_numpy(xray.astype(np.float32) / 255)
    rng = np.random.default_rng(0)
    cfg = ViewConfig2D()
    size = cfg.global_size if is_global else cfg.local_size
    for _ in range(6):
        p = draw_view(rng, *xray.shape, cfg, is_global)
        target_official, x_official = official_view(rgb, p, size)
        spatial, x = reference_view(image, p, size)
        for ours, theirs in ((normalize(spatial[None])[0], target_official), (x, x_official)):
            diff = np.abs(ours.numpy() - theirs) * 0.229  # back to the [0, 1] intensity scale
            assert diff.mean() < 0.01 and np.percentile(diff, 99) < 0.06, (p, diff.mean())
    # The same comparison fails for a view rotated the other way.
    p = {**draw_view(rng, *xray.shape, cfg, is_global), "angle": 8.0, "sigma": 0.0}
    wrong = reference_view(image, {**p, "angle": -8.0}, size)[0]
    diff = np.abs(normalize(wrong[None])[0].numpy() - official_view(rgb, p, size)[0]) * 0.229
    assert diff.mean() > 0.02


def test_official_item_shapes(xray):
    item = official_item(Image.fromarray(xray).convert("RGB"), np.random.default_rng(1))
    assert item["x1"].shape == (3, 224, 224) and item["locals"].shape == (6, 3, 96, 96)
