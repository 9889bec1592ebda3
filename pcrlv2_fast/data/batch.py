"""One batch of PCRLv2 samples as every batch loader builds it: the draws of its items (``draw_batch``, the
per-sample dataset's own draws), their augmentation parameters concatenated (``cat_params``) and the dict the
loaders return (``batch_dict``). The loaders (``loader.py``, ``dali.py``) differ only in how they cut and augment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .augment import draw_sample_params
from .dataset import PretrainDataset

__all__ = ["batch_dict", "cat_params", "draw_batch"]


def draw_batch(dataset: PretrainDataset, indices: Sequence[int]):
    """The draws of the items ``indices``, as the per-sample dataset makes them: ``(volume_index (B,), global
    boxes (B, 2, 6), local boxes (B, n_local, 6), global params, local params)`` (int64 arrays; per-sample
    ``augment.draw_sample_params`` dicts, empty lists without augmentation)."""
    if len(indices) == 0:
        raise ValueError("a batch needs at least one index")
    crop = dataset.crop
    volume_index, global_boxes, local_boxes, g_params, l_params = [], [], [], [], []
    for index in indices:
        v, boxes, generator = dataset.sample_geometry(int(index))
        volume_index.append(v)
        global_boxes.append(boxes.global_boxes.astype(np.int64))
        local_boxes.append(boxes.local_boxes.astype(np.int64).reshape(-1, 6))
        if dataset.augment:
            gp, lp = draw_sample_params(generator, dataset.augment_cfg, crop.global_out, crop.local_out,
                                        crop.n_local)
            g_params.append(gp)
            l_params.append(lp)
    return (np.asarray(volume_index, dtype=np.int64), np.stack(global_boxes), np.stack(local_boxes), g_params,
            l_params)


def batch_dict(x1: torch.Tensor, x2: torch.Tensor, gt: torch.Tensor, locals_: torch.Tensor, volume_index: np.ndarray,
               global_boxes: np.ndarray, local_boxes: np.ndarray) -> dict:
    """The batch dict every batch loader returns (see :class:`BatchLoader`); ``locals_`` (B * n_local, 1, ...)
    sample-major."""
    b, n_local = len(volume_index), local_boxes.shape[1]
    return {
        "x1": x1,
        "x2": x2,
        "gt": gt,
        "locals": locals_.view(b, n_local, *locals_.shape[1:]),
        "global_boxes": torch.from_numpy(global_boxes),
        "local_boxes": torch.from_numpy(local_boxes),
        "volume_index": torch.from_numpy(volume_index),
    }


def cat_params(params: list[dict]) -> dict:
    """Per-sample parameter dicts concatenated along the view axis (sample-major)."""
    return {k: (torch.cat([p[k] for p in params]) if isinstance(params[0][k], torch.Tensor) else params[0][k])
            for k in params[0]}
