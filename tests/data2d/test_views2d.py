"""2D views: the batched implementation equals the op-by-op reference element-wise, each op does what the
official chain's op does, and the draws follow the official distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcrlv2_fast.data.dataset2d import BatchLoader2D, PretrainDataset2D
from pcrlv2_fast.data.images2d import ImageBank, load_images
from pcrlv2_fast.data.views2d import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewConfig2D,
    batched_views,
    draw_view,
    normalize,
    random_resized_box,
    reference_view,
    stack_params,
)
from tests.data2d.conftest import xray_like

SMALL = ViewConfig2D(global_size=64, local_size=32)


def plain(box, **changes) -> dict:
    """Parameters of a view that only crops and resizes."""
    p = {"box": np.array(box), "angle": 0.0, "flip": False, "sigma": 0.0, "brightness": 1.0, "contrast": 1.0,
         "contrast_first": False, "holes": np.zeros((0, 4), np.int64)}
    return {**p, **changes}


def spatial_of(image: np.ndarray, p: dict, size: int) -> torch.Tensor:
    return reference_view(torch.from_numpy(image), p, size)[0]


@pytest.mark.parametrize("dtype,gather,chunk", [(np.uint8, False, None), (np.uint8, True, None),
                                               (np.float16, False, 3), (np.float16, True, 7)])
def test_batched_equals_reference(dtype, gather, chunk):
    """Both ways of reading the crops (the GPU's gather, the CPU's per-view resize), in chunks or at once."""
    rng = np.random.default_rng(0)
    images = [xray_like(96, 128, 0), xray_like(128, 80, 1), xray_like(70, 70, 2)]
    if dtype == np.float16:
        images = [im.astype(np.float32) / 255 for im in images]
    bank = ImageBank.from_arrays(images, ["a", "b", "c"])
    for size, is_global in ((64, True), (32, False)):
        index = rng.integers(0, 3, 20)
        views = [draw_view(rng, *bank.sizes[i], SMALL, is_global) for i in index]
        assert any(v["sigma"] > 0 for v in views) and any(v["sigma"] == 0 for v in views)
        assert any(v["flip"] for v in views) and any(v["contrast_first"] for v in views)
        spatial, out = batched_views(torch.from_numpy(bank.pixels), bank.scale, torch.from_numpy(index),
                                     stack_params(views), size, gather=gather, chunk=chunk)
        for k, (i, p) in enumerate(zip(index, views, strict=True)):
            ref_spatial, ref_out = reference_view(torch.from_numpy(bank.image(i)), p, size)
            torch.testing.assert_close(spatial[k], ref_spatial, atol=2e-5, rtol=0)
            torch.testing.assert_close(out[k], ref_out, atol=1e-4, rtol=0)


def test_dataset_items_equal_loader_batches(xray_dir):
    ds = PretrainDataset2D(load_images(xray_dir, progress=False), SMALL, seed=3, samples_per_image=2)
    ds.set_epoch(1)
    batch = BatchLoader2D(ds).batch([4, 0, 11])
    items = [ds[i] for i in (4, 0, 11)]
    assert batch["x1"].shape == (3, 3, 64, 64) and batch["locals"].shape == (3, 6, 3, 32, 32)
    for key in ("x1", "x2", "gt", "locals", "global_boxes", "local_boxes"):
        torch.testing.assert_close(batch[key], torch.stack([it[key] for it in items]), atol=1e-4, rtol=0)
    assert batch["volume_index"].tolist() == [4 % 6, 0, 11 % 6]
    again = ds[4]
    assert torch.equal(again["x1"], items[0]["x1"])  # a pure function of (seed, epoch, index)
    ds.set_epoch(2)
    assert not torch.equal(ds[4]["x1"], items[0]["x1"])


def test_crop_resize_is_bilinear_of_the_box():
    image = xray_like(80, 100, 4).astype(np.float32) / 255
    whole = spatial_of(image, plain((0, 0, 80, 100)), 64)
    expected = F.interpolate(torch.from_numpy(image)[None, None], size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(whole, expected[0, 0])
    same = spatial_of(image, plain((10, 20, 64, 64)), 64)
    torch.testing.assert_close(same, torch.from_numpy(image[10:74, 20:84]))


def test_rotation_flip_direction_and_fill():
    image = xray_like(64, 64, 5).astype(np.float32) / 255
    t = torch.from_numpy(image)
    rotated = spatial_of(image, plain((0, 0, 64, 64), angle=90.0), 64)
    torch.testing.assert_close(rotated, torch.rot90(t, 1))  # positive angles turn the content counter-clockwise
    flipped = spatial_of(image, plain((0, 0, 64, 64), flip=True), 64)
    torch.testing.assert_close(flipped, t.flip(-1))
    # Flip after rotation, as the official chain orders them.
    both = spatial_of(image, plain((0, 0, 64, 64), angle=90.0, flip=True), 64)
    torch.testing.assert_close(both, torch.rot90(t, 1).flip(-1))
    tilted = spatial_of(np.ones((64, 64), np.float32), plain((0, 0, 64, 64), angle=10.0), 64)
    assert tilted[0, 0] == 0 and tilted[0, -1] == 0 and tilted[32, 32] == 1  # corners filled with 0


def test_appearance_ops():
    image = np.linspace(0.1, 0.9, 64 * 64, dtype=np.float32).reshape(64, 64)
    box = (0, 0, 64, 64)

    def net_input(**changes):
        x = reference_view(torch.from_numpy(image), plain(box, **changes), 64)[1]
        return x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to [0, 1] from the red channel

    torch.testing.assert_close(net_input(), torch.from_numpy(image), atol=1e-6, rtol=0)
    torch.testing.assert_close(net_input(brightness=1.5), torch.from_numpy(np.clip(image * 1.5, 0, 1)), atol=1e-6,
                               rtol=0)
    flat = net_input(contrast=0.0)
    torch.testing.assert_close(flat, torch.full_like(flat, float(image.mean())), atol=1e-6, rtol=0)
    # Order matters through the clamp: brightness 2 then contrast 0.5, or the other way round.
    b_then_c = net_input(brightness=2.0, contrast=0.5, contrast_first=False)
    c_then_b = net_input(brightness=2.0, contrast=0.5, contrast_first=True)
    bright = np.clip(image * 2, 0, 1)
    torch.testing.assert_close(b_then_c, torch.from_numpy(np.clip(0.5 * bright + 0.5 * bright.mean(), 0, 1)),
                               atol=1e-6, rtol=0)
    assert (b_then_c - c_then_b).abs().max() > 0.05
    # Blur: a Gaussian (truncated at 3 sigma) with replicated borders; a constant image stays constant.
    blurred = net_input(sigma=1.5)
    taps = torch.exp(-torch.arange(-5, 6.0) ** 2 / (2 * 1.5**2))
    taps /= taps.sum()
    padded = F.pad(torch.from_numpy(image)[None, None], (5, 5, 5, 5), mode="replicate")
    direct = F.conv2d(padded, (taps[:, None] * taps[None, :])[None, None])[0, 0]
    torch.testing.assert_close(blurred, direct, atol=1e-5, rtol=0)
    const = reference_view(torch.full((64, 64), 0.3), plain(box, sigma=2.0), 64)[1]
    torch.testing.assert_close(const, normalize(torch.full((1, 64, 64), 0.3))[0], atol=1e-6, rtol=0)


def test_cutout_and_normalisation():
    image = np.full((64, 64), 0.5, np.float32)
    holes = np.array([[0, 16, 0, 16], [40, 64, 50, 64]])
    spatial, x = reference_view(torch.from_numpy(image), plain((0, 0, 64, 64), holes=holes), 64)
    assert x.shape == (3, 64, 64)
    zero = torch.zeros(64, 64, dtype=torch.bool)
    zero[0:16, 0:16] = True
    zero[40:64, 50:64] = True
    assert torch.equal(x[0] == 0, zero)  # holes are 0 after normalisation, in every channel
    for c in range(3):
        assert torch.allclose(x[c][~zero], torch.tensor((0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))
    assert torch.all(spatial == 0.5)  # the target never has holes


def test_random_resized_box_follows_torchvision():
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_box(rng, 200, 300, (0.3, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        fractions.append(h * w / 60000)
        ratios.append(w / h)
    assert 0.29 < min(fractions) and max(fractions) <= 1.0
    assert 0.74 < min(ratios) and max(ratios) < 1.35
    # No box of the asked scale and ratio fits a 40 x 400 strip: the centre crop at the closest ratio.
    assert random_resized_box(rng, 40, 400, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 173, 40, 53)


def test_draws_follow_the_official_probabilities():
    rng = np.random.default_rng(1)
    cfg = ViewConfig2D()
    views = [draw_view(rng, 512, 512, cfg, is_global=True) for _ in range(3000)]
    flips = np.mean([v["flip"] for v in views])
    blurs = np.mean([v["sigma"] > 0 for v in views])
    assert abs(flips - 0.5) < 0.04 and abs(blurs - 0.5) < 0.04
    sigmas = [v["sigma"] for v in views if v["sigma"] > 0]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    angles = np.array([v["angle"] for v in views])
    assert -10 <= angles.min() < -9 and 9 < angles.max() <= 10
    b = np.array([v["brightness"] for v in views])
    assert 0.6 <= b.min() < 0.65 and 1.35 < b.max() <= 1.4
    assert abs(np.mean([v["contrast_first"] for v in views]) - 0.5) < 0.04
    assert all(len(v["holes"]) == 3 for v in views)
    sizes = np.array([[h[1] - h[0], h[3] - h[2]] for v in views for h in v["holes"]])
    assert sizes.max() == 32 and sizes.min() >= 16  # 32-pixel holes, clipped at the border
    local = draw_view(rng, 512, 512, cfg, is_global=False)
    assert len(local["holes"]) == 0 and local["box"][2] * local["box"][3] <= 0.3 * 512 * 512 * 1.02


def test_view_sizes_must_divide_by_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        ViewConfig2D(global_size=100)
