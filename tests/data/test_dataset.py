"""PretrainDataset: item layout, value ranges, determinism in (seed, epoch, i), DataLoader workers, real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pcrlv2_fast.data import CropConfig, PretrainDataset, draw_sample_boxes, load_scan
from pcrlv2_fast.data.augment import z_normalize
from pcrlv2_fast.data.dataset import cut_and_resize
from tests import requirements

VIEW_KEYS = ("x1", "x2", "gt", "locals")


def assert_items_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_item_layout(phantom_volumes):
    ds = PretrainDataset(phantom_volumes, seed=1, pairs_per_volume=3)
    assert len(ds) == 3 * len(phantom_volumes)
    item = ds[3]
    assert item["volume_index"] == 3 % len(phantom_volumes)
    for key in ("x1", "x2", "gt"):
        assert item[key].shape == (1, 64, 64, 32) and item[key].dtype == torch.float32
    assert item["locals"].shape == (6, 1, 16, 16, 16) and item["locals"].dtype == torch.float32
    assert item["global_boxes"].shape == (2, 6) and item["global_boxes"].dtype == torch.int64
    assert item["local_boxes"].shape == (6, 6) and item["local_boxes"].dtype == torch.int64
    assert 0.0 <= item["gt"].min() and item["gt"].max() <= 1.0 + 1e-6
    for view in (item["x1"], item["x2"], *item["locals"]):
        assert torch.isfinite(view).all()
        assert abs(float(view.mean())) < 1e-4 and abs(float(view.std()) - 1.0) < 1e-3  # ZNormalization last
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_boxes_follow_the_geometry(phantom_volumes):
    ds = PretrainDataset(phantom_volumes, seed=4, pairs_per_volume=2)
    ds.set_epoch(3)
    item = ds[1]
    volume = phantom_volumes[1]
    expected = draw_sample_boxes(volume.array.shape, np.random.default_rng([4, 3, 1]), CropConfig())
    np.testing.assert_array_equal(item["global_boxes"].numpy(), expected.global_boxes)
    np.testing.assert_array_equal(item["local_boxes"].numpy(), expected.local_boxes)


def test_no_augment_is_crop_resize_and_znorm(phantom_volumes):
    ds = PretrainDataset(phantom_volumes, seed=2, pairs_per_volume=2, augment=False)
    item = ds[0]
    array = torch.from_numpy(phantom_volumes[0].array)
    g0, g1 = item["global_boxes"]
    assert torch.equal(item["gt"], cut_and_resize(array, g0, (64, 64, 32)))
    assert torch.equal(item["x1"], z_normalize(item["gt"]))
    assert torch.equal(item["x2"], z_normalize(cut_and_resize(array, g1, (64, 64, 32))))
    for view, box in zip(item["locals"], item["local_boxes"], strict=True):
        assert torch.equal(view, z_normalize(cut_and_resize(array, box, (16, 16, 16))))


def test_cut_and_resize():
    array = torch.arange(40 * 30 * 20, dtype=torch.float32).view(40, 30, 20)
    crop = cut_and_resize(array, (3, 4, 5, 16, 16, 8), (16, 16, 8))
    assert torch.equal(crop[0], array[3:19, 4:20, 5:13])  # same size: exact copy
    halved = cut_and_resize(array, (0, 0, 0, 32, 16, 16), (16, 16, 8))
    # Linear data, align_corners=False: output voxel j samples input position 2j + 0.5.
    expected = array[0:32:2, 0:16, 0:16:2] + (0.5 * 30 * 20 + 0.5)
    torch.testing.assert_close(halved[0], expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="inside the volume"):
        cut_and_resize(array, (30, 0, 0, 16, 16, 8), (16, 16, 8))


def test_deterministic_in_seed_epoch_index(phantom_volumes):
    a = PretrainDataset(phantom_volumes, seed=7, pairs_per_volume=2)
    b = PretrainDataset(phantom_volumes, seed=7, pairs_per_volume=2)
    for ds in (a, b):
        ds.set_epoch(2)
    _ = b[0]  # access order must not matter
    assert_items_equal(a[1], b[1])
    assert_items_equal(a[1], a[1])
    a.set_epoch(3)
    other_epoch = a[1]
    assert not torch.equal(other_epoch["x1"], b[1]["x1"])
    assert not torch.equal(other_epoch["global_boxes"], b[1]["global_boxes"])
    other_seed = PretrainDataset(phantom_volumes, seed=8, pairs_per_volume=2)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[1]["x1"], b[1]["x1"])


def test_dataloader_workers_match_main_process(phantom_volumes):
    ds = PretrainDataset(phantom_volumes, seed=3, pairs_per_volume=2)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=2)))
    assert batch["x1"].shape == (4, 1, 64, 64, 32)
    assert batch["locals"].shape == (4, 6, 1, 16, 16, 16)
    assert batch["global_boxes"].shape == (4, 2, 6) and batch["local_boxes"].shape == (4, 6, 6)
    assert batch["volume_index"].tolist() == [0, 1, 0, 1]
    for i in range(4):
        item = ds[i]
        for key in ("global_boxes", "local_boxes"):
            assert torch.equal(batch[key][i], item[key]), key
        for key in VIEW_KEYS:
            # Workers run single-threaded: reductions may round differently from the main process.
            torch.testing.assert_close(batch[key][i], item[key], atol=1e-6, rtol=0, msg=key)


def test_invalid_arguments(phantom_volumes):
    with pytest.raises(ValueError, match="at least one volume"):
        PretrainDataset([])
    with pytest.raises(ValueError, match="seed"):
        PretrainDataset(phantom_volumes, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        PretrainDataset(phantom_volumes).set_epoch(-1)


def test_real_ct_example(shared_data):
    path = shared_data / "totalseg-examples" / "example_ct.nii.gz"
    if not path.exists():
        requirements.skip("shared-data", f"{path} not present")
    volume = load_scan(path)
    assert volume.modality == "ct" and volume.array.shape == (366, 303, 336)  # 122 x 101 x 112 at 3 mm
    assert volume.array.min() >= 0 and volume.array.max() <= 1
    item = PretrainDataset([volume], seed=0, pairs_per_volume=1)[0]
    assert item["x1"].shape == (1, 64, 64, 32) and item["locals"].shape == (6, 1, 16, 16, 16)
    assert 0 <= item["gt"].min() and item["gt"].max() <= 1 + 1e-6 and item["gt"].std() > 0.01


def test_real_mr_example_is_detected(shared_data):
    path = shared_data / "totalseg-examples" / "example_mr_sm.nii.gz"
    if not path.exists():
        requirements.skip("shared-data", f"{path} not present")
    volume = load_scan(path)
    assert volume.modality == "mr" and volume.array.shape == (351, 273, 60)
    assert volume.array.min() == 0 and volume.array.max() == 1
