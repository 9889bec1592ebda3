"""Crop-box geometry: the official rules as invariants over many seeded draws."""

from __future__ import annotations

import numpy as np
import pytest

from pcrlv2_fast.data import CropConfig, SampleBoxes, box_iou, draw_sample_boxes
from pcrlv2_fast.data.geometry import start_bounds

CFG = CropConfig()


def test_box_iou_known_values():
    a = (0, 0, 0, 10, 10, 10)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, (10, 0, 0, 10, 10, 10)) == 0.0  # touching faces
    assert box_iou(a, (5, 0, 0, 10, 10, 10)) == pytest.approx(500 / 1500)
    assert box_iou(a, (2, 2, 2, 4, 4, 4)) == pytest.approx(64 / 1000)
    assert box_iou((0, 0, 0, 4, 6, 8), (1, 2, 3, 9, 9, 9)) == box_iou((1, 2, 3, 9, 9, 9), (0, 0, 0, 4, 6, 8))


def _check_sample(boxes: SampleBoxes, shape, cfg: CropConfig):
    shape = np.asarray(shape)
    g, loc = boxes.global_boxes, boxes.local_boxes
    assert g.shape == (2, 6) and loc.shape == (cfg.n_local, 6)
    assert g.dtype == np.int64 and loc.dtype == np.int64
    assert box_iou(g[0], g[1]) > cfg.min_iou
    for box in g:
        assert tuple(box[3:]) in cfg.global_sizes
    for box in loc:
        assert tuple(box[3:]) in cfg.local_sizes
    for box in np.concatenate([g, loc]):
        assert np.all(box[:3] >= 0) and np.all(box[:3] + box[3:] <= shape)
    union_lo = g[:, :3].min(axis=0)
    union_hi = (g[:, :3] + g[:, 3:]).max(axis=0)
    lo = np.maximum(union_lo - cfg.local_jitter, 0)
    hi = np.minimum(union_hi + cfg.local_jitter, shape)
    for box in loc:
        # Start inside the jittered union, unless clipped back so the box ends at the volume's far edge.
        clipped = box[:3] + box[3:] == shape
        assert np.all(box[:3] >= lo)
        assert np.all((box[:3] < hi) | clipped)


def test_invariants_large_volume():
    shape = (330, 300, 240)
    seen_sizes = set()
    for seed in range(200):
        boxes = draw_sample_boxes(shape, np.random.default_rng(seed), CFG)
        _check_sample(boxes, shape, CFG)
        g = boxes.global_boxes
        # Official start bounds: [border, size - crop - 1 - border] in x/y; z also keeps len_depth spare.
        assert np.all(g[:, :2] >= CFG.border_xy)
        assert np.all(g[:, :2] <= np.asarray(shape[:2]) - g[:, 3:5] - 1 - CFG.border_xy)
        assert np.all(g[:, 2] >= CFG.border_z)
        assert np.all(g[:, 2] <= shape[2] - g[:, 5] - CFG.len_depth - 1 - CFG.border_z)
        seen_sizes.update(tuple(b[3:]) for b in g)
    # IoU > 0.3 rules out some size pairs but each size appears in some accepted pair.
    assert seen_sizes == set(CFG.global_sizes)


@pytest.mark.parametrize("shape", [(135, 120, 104), (64, 64, 32), (70, 66, 40), (100, 200, 33), (200, 90, 70)])
def test_invariants_small_volumes(shape):
    for seed in range(50):
        _check_sample(draw_sample_boxes(shape, np.random.default_rng(seed), CFG), shape, CFG)


def test_sizes_that_do_not_fit_are_excluded():
    shape = (100, 100, 70)  # only (64, 64, 32) and (96, 96, 64) fit
    sizes = {
        tuple(b[3:]) for s in range(100) for b in draw_sample_boxes(shape, np.random.default_rng(s), CFG).global_boxes
    }
    assert sizes == {(64, 64, 32), (96, 96, 64)}


def test_start_bounds_shrink_margins():
    sizes = np.array([[64, 64, 32], [96, 96, 96]])
    border, tail = np.array([70, 70, 15]), np.array([0, 0, 3])
    lo, hi, fits = start_bounds(np.array([400, 400, 200]), sizes, border, tail)
    assert fits.all()
    np.testing.assert_array_equal(lo, [[70, 70, 15], [70, 70, 15]])
    np.testing.assert_array_equal(hi, [[400 - 64 - 1 - 70, 265, 200 - 32 - 3 - 1 - 15], [233, 233, 85]])
    lo, hi, fits = start_bounds(np.array([70, 64, 40]), sizes, border, tail)
    assert fits.tolist() == [True, False]
    # x: 6 free voxels, 1 spare, margin (6 - 1) // 2 = 2 -> [2, 3]; y: no room -> [0, 0]; z: 8 free, 4 spare -> [2, 2].
    np.testing.assert_array_equal(lo[0], [2, 0, 2])
    np.testing.assert_array_equal(hi[0], [3, 0, 2])


def test_reproducible_and_seed_dependent():
    shape = (200, 180, 150)
    a = draw_sample_boxes(shape, np.random.default_rng([3, 1, 7]), CFG)
    b = draw_sample_boxes(shape, np.random.default_rng([3, 1, 7]), CFG)
    c = draw_sample_boxes(shape, np.random.default_rng([3, 2, 7]), CFG)
    np.testing.assert_array_equal(a.global_boxes, b.global_boxes)
    np.testing.assert_array_equal(a.local_boxes, b.local_boxes)
    assert not np.array_equal(a.global_boxes, c.global_boxes)


def test_too_small_volume_raises():
    with pytest.raises(ValueError, match="smaller than every global crop"):
        draw_sample_boxes((63, 200, 200), np.random.default_rng(0), CFG)


def test_impossible_iou_raises():
    cfg = CropConfig(global_sizes=((64, 64, 32),), min_iou=0.99, max_tries=600)
    with pytest.raises(RuntimeError, match="600 tries"):
        draw_sample_boxes((300, 300, 300), np.random.default_rng(0), cfg)


def test_dense_filter():
    shape = (400, 200, 120)
    volume = np.zeros(shape, np.float32)
    volume[:200] = 1.0  # the lower x half is dense
    cfg = CropConfig.from_name("lung")
    assert cfg.dense_filter and not CropConfig.from_name("default").dense_filter
    for seed in range(20):
        boxes = draw_sample_boxes(shape, np.random.default_rng(seed), cfg, volume=volume)
        for x0, _, _, sx, _, _ in boxes.global_boxes:
            assert np.count_nonzero(np.arange(x0, x0 + sx) < 200) <= cfg.dense_max_fraction * sx
    with pytest.raises(ValueError, match="needs the volume"):
        draw_sample_boxes(shape, np.random.default_rng(0), cfg)
    with pytest.raises(ValueError, match="unknown crop preset"):
        CropConfig.from_name("brain")


def test_config_validation():
    with pytest.raises(ValueError, match="global_sizes"):
        CropConfig(global_sizes=())
    with pytest.raises(ValueError, match="local_sizes"):
        CropConfig(local_sizes=((8, 8),))


def test_scaled_geometry_for_small_volumes():
    official = CropConfig()
    assert official.scaled(1) is official and official.min_volume == (64, 64, 32)
    small = official.scaled(0.4)
    assert small.global_sizes == ((38, 38, 26), (38, 38, 38), (45, 45, 26), (26, 26, 13))
    assert small.local_sizes == ((13, 13, 6), (6, 6, 6), (13, 13, 13), (3, 3, 3))
    # Output views stay divisible by 8 (the network halves them three times); the rules are unchanged.
    assert small.global_out == (24, 24, 16) and small.local_out == (8, 8, 8)
    assert small.min_volume == (26, 26, 13) and (small.min_iou, small.n_local) == (official.min_iou, official.n_local)
    # A hippocampus-sized volume: every draw keeps the official rules (IoU, boxes inside the volume).
    shape = np.array([35, 50, 36])
    for seed in range(20):
        boxes = draw_sample_boxes(shape, np.random.default_rng(seed), small)
        assert box_iou(*boxes.global_boxes) > small.min_iou
        for box in np.concatenate([boxes.global_boxes, boxes.local_boxes]):
            assert np.all(box[:3] >= 0) and np.all(box[:3] + box[3:] <= shape)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="crop scale"):
            official.scaled(bad)


def test_check_fits_names_the_volume_and_the_fix():
    CropConfig().check_fits((64, 64, 32), "big enough")
    with pytest.raises(ValueError, match=r"case_7: shape \(35, 50, 36\).*--crop-scale"):
        CropConfig().check_fits((35, 50, 36), "case_7")
