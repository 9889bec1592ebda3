"""PCRLv2 pretraining samples drawn on the fly: two augmented global views, their target and six local views.

The official pipeline generated 16 crop pairs per volume offline and augmented them online with torchio;
here every item cuts fresh crops, so each epoch sees new crops. Deviation: crops are resized with
trilinear interpolation (``F.interpolate``, align_corners=False, the same sample positions as skimage's
``resize``) without skimage's Gaussian anti-aliasing when shrinking, which keeps slightly more
high-frequency detail in the larger crops.

Volumes may store raw values with a window (int16 HU or float16 MR z-scores memory-mapped from a
preprocessing cache): only the voxels of each crop are read, converted to float32 and mapped to [0, 1] by
the window *before* the resize, as the official code clipped and scaled the whole volume before cutting.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .augment import AugmentConfig, apply_intensity, apply_spatial, draw_sample_views, z_normalize
from .geometry import CropConfig, draw_sample_boxes
from .io import Volume

__all__ = ["PretrainDataset", "cut_and_resize"]


def cut_and_resize(array, box, out_size, window: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Cut ``box`` (x0, y0, z0, sx, sy, sz) from ``array`` (X, Y, Z) and resize it trilinearly to (1, *out_size).

    ``array`` is a tensor or a numpy array (a memory map reads only the crop's voxels). The crop is converted to
    float32 and, unless ``window`` is (0, 1), mapped to [0, 1] by ``clip((v - lo) / (hi - lo), 0, 1)`` before
    the resize.
    """
    x0, y0, z0, sx, sy, sz = (int(v) for v in box)
    crop = array[x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz]
    if tuple(crop.shape) != (sx, sy, sz):
        raise ValueError(f"box {tuple(box)} does not lie inside the volume of shape {tuple(array.shape)}")
    if isinstance(crop, np.ndarray):
        crop = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))
    else:
        crop = crop.to(torch.float32).contiguous()
    lo, hi = (float(v) for v in window)
    if (lo, hi) != (0.0, 1.0):
        crop = crop.sub(lo).div_(hi - lo).clamp_(0.0, 1.0)
    return F.interpolate(crop[None, None], size=tuple(out_size), mode="trilinear", align_corners=False)[0]


def _dense_crop_config(crop: CropConfig, window: tuple[float, float]) -> CropConfig:
    """The crop config whose dense-voxel threshold, given on the [0, 1] scale, applies to a volume's raw values."""
    lo, hi = window
    if not crop.dense_filter or (lo, hi) == (0.0, 1.0):
        return crop
    t = crop.dense_threshold
    # clip((v - lo) / (hi - lo), 0, 1) >= t  <=>  v >= lo + t (hi - lo), for 0 < t <= 1.
    raw = -np.inf if t <= 0 else (np.inf if t > 1 else lo + t * (hi - lo))
    return replace(crop, dense_threshold=raw)


class PretrainDataset(Dataset):
    """Map-style dataset of PCRLv2 samples; item ``i`` uses volume ``i % len(volumes)``.

    An item is a pure function of ``(seed, epoch, i)``: boxes, then the augmentation parameters, come from
    ``np.random.default_rng([seed, epoch, i])``, so it does not depend on
    worker count or order. ``set_epoch`` must be called before the DataLoader iterator is created (worker
    processes copy the dataset then; with ``persistent_workers`` they would keep the old epoch).

    Items are dicts of float32 ``x1``, ``x2`` (1, 64, 64, 32) network inputs, ``gt`` (1, 64, 64, 32) = view 1
    after the spatial transforms only (values in [0, 1]), ``locals`` (n_local, 1, 16, 16, 16), int64
    ``global_boxes`` (2, 6) and ``local_boxes`` (n_local, 6), and the int ``volume_index``. With
    ``augment=False`` views are only cut, resized and (inputs) z-normalised.
    """

    def __init__(
        self,
        volumes: list[Volume],
        crop: CropConfig | None = None,
        seed: int = 0,
        pairs_per_volume: int = 16,
        augment: bool = True,
        augment_cfg: AugmentConfig | None = None,
    ):
        if not volumes:
            raise ValueError("PretrainDataset needs at least one volume")
        if seed < 0 or pairs_per_volume < 1:
            raise ValueError(f"seed must be >= 0 and pairs_per_volume >= 1, got {seed} and {pairs_per_volume}")
        for volume in volumes:
            if volume.array.ndim != 3 or volume.array.dtype.kind not in "iuf":
                raise ValueError(
                    f"{volume.name}: expected a 3D integer or float array, got {volume.array.dtype} "
                    f"{volume.array.shape}"
                )
            lo, hi = volume.window
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"{volume.name}: window must be (low, high) with low < high, got {volume.window}")
        self.crop = crop if crop is not None else CropConfig()
        for volume in volumes:
            self.crop.check_fits(volume.array.shape, volume.name)
        self.volumes = list(volumes)
        self.seed = int(seed)
        self.pairs_per_volume = int(pairs_per_volume)
        self.augment = augment
        self.augment_cfg = augment_cfg if augment_cfg is not None else AugmentConfig()
        self.epoch = 0

    def __len__(self) -> int:
        return self.pairs_per_volume * len(self.volumes)

    def set_epoch(self, epoch: int) -> None:
        """Select the crops and augmentations of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def sample_geometry(self, index: int):
        """``(volume_index, boxes, generator)`` of item ``index`` in the current epoch: its crop boxes and the
        numpy ``Generator`` its augmentation parameters are drawn from (the stream the boxes were drawn from,
        seeded by (seed, epoch, index); shared with the batch loaders)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        volume_index = index % len(self.volumes)
        volume = self.volumes[volume_index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        boxes = draw_sample_boxes(
            volume.array.shape, rng, _dense_crop_config(self.crop, volume.window), volume=volume.array
        )
        return volume_index, boxes, rng

    def __getitem__(self, index: int) -> dict:
        volume_index, boxes, generator = self.sample_geometry(index)
        volume = self.volumes[volume_index]

        # Crops are cut straight from the (possibly memory-mapped) array: no whole-volume copy per item.
        crops = [cut_and_resize(volume.array, box, self.crop.global_out, volume.window) for box in boxes.global_boxes]
        local_crops = [
            cut_and_resize(volume.array, box, self.crop.local_out, volume.window) for box in boxes.local_boxes
        ]
        cfg = self.augment_cfg
        if self.augment:
            g_params, l_params = draw_sample_views(generator, cfg, self.crop.global_out, self.crop.local_out,
                                                   len(local_crops))
            spatial = [apply_spatial(crop, p) for crop, p in zip(crops, g_params)]
            gt = spatial[0]
            x1, x2 = (apply_intensity(view, p, cfg) for view, p in zip(spatial, g_params))
            local_views = [apply_intensity(apply_spatial(crop, p), p, cfg) for crop, p in zip(local_crops, l_params)]
        else:
            gt = crops[0]
            x1, x2 = (z_normalize(crop) for crop in crops)
            local_views = [z_normalize(crop) for crop in local_crops]
        locals_ = (
            torch.stack(local_views) if local_views else torch.empty((0, 1, *self.crop.local_out), dtype=torch.float32)
        )
        return {
            "x1": x1,
            "x2": x2,
            "gt": gt,
            "locals": locals_,
            "global_boxes": torch.from_numpy(boxes.global_boxes.astype(np.int64)),
            "local_boxes": torch.from_numpy(boxes.local_boxes.astype(np.int64)),
            "volume_index": volume_index,
        }
