"""PCRLv2 2D pretraining samples (chest X-rays): the per-sample dataset and the batched loader, same items.

Item ``i`` uses image ``i % N``; its views' parameters come from ``np.random.default_rng([seed, epoch, i])``
(:func:`~pcrlv2_fast.data.views2d.draw_views`), so an item is a pure function of ``(seed, epoch, i)`` whichever
loader builds it. :class:`PretrainDataset2D` builds an item op after op (``views2d.reference_view``);
:class:`BatchLoader2D` builds whole batches with ``views2d.batched_views`` from a copy of the images on its device
(the GPU, or the CPU). Both return the dict the 3D loaders return, with 2D shapes: ``x1``, ``x2``, ``gt``
(B, 3, 224, 224), ``locals`` (B, 6, 3, 96, 96), ``global_boxes`` (B, 2, 4) and ``local_boxes`` (B, 6, 4) as
(top, left, height, width), ``volume_index`` (B,) (the image of each item).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .batch import batch_dict
from .images2d import ImageBank
from .loader import Batch
from .views2d import ViewConfig2D, batched_views, draw_views, normalize, reference_view, stack_params

__all__ = ["BatchLoader2D", "Draws2D", "PretrainDataset2D", "draw_batch_2d"]


class PretrainDataset2D(Dataset):
    """Map-style dataset of 2D PCRLv2 samples: ``samples_per_image`` items per image and epoch (the official
    dataset yields each image once per epoch)."""

    def __init__(self, bank: ImageBank, views: ViewConfig2D | None = None, seed: int = 0, samples_per_image: int = 1):
        if seed < 0 or samples_per_image < 1:
            raise ValueError(f"seed must be >= 0 and samples_per_image >= 1, got {seed} and {samples_per_image}")
        self.bank = bank
        self.views = views if views is not None else ViewConfig2D()
        self.seed = int(seed)
        self.samples_per_image = int(samples_per_image)
        self.epoch = 0

    def __len__(self) -> int:
        return self.samples_per_image * len(self.bank)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def sample_params(self, index: int) -> tuple[int, list[dict], list[dict]]:
        """``(image_index, global view parameters (2), local view parameters (n_local))`` of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        image_index = index % len(self.bank)
        h, w = (int(v) for v in self.bank.sizes[image_index])
        g, loc = draw_views(np.random.default_rng([self.seed, self.epoch, index]), h, w, self.views)
        return image_index, g, loc

    def __getitem__(self, index: int) -> dict:
        image_index, g, loc = self.sample_params(index)
        image = torch.from_numpy(self.bank.image(image_index))
        cfg = self.views
        (spatial, x1), (_, x2) = (reference_view(image, p, cfg.global_size) for p in g)
        local_views = [reference_view(image, p, cfg.local_size)[1] for p in loc]
        empty = torch.empty((0, 3, cfg.local_size, cfg.local_size))
        return {"x1": x1, "x2": x2, "gt": normalize(spatial[None])[0],
                "locals": torch.stack(local_views) if local_views else empty,
                "global_boxes": torch.from_numpy(np.stack([p["box"] for p in g])),
                "local_boxes": torch.from_numpy(np.stack([p["box"] for p in loc]) if loc
                                                else np.zeros((0, 4), np.int64)),
                "volume_index": image_index}


@dataclass
class Draws2D:
    """The draws of a batch's items, as every 2D batch loader uses them: ``image_index`` (B,), the global views'
    stacked parameters view-major (every first view, then every second: x1 and x2 are slices of one tensor), the
    local views' sample-major (None without local views), ``boxes`` (B, 2 + n_local, 4)."""

    image_index: np.ndarray
    global_params: dict
    local_params: dict | None
    boxes: np.ndarray

    def batch(self, spatial: torch.Tensor, x: torch.Tensor, loc: torch.Tensor) -> Batch:
        """The batch dict from the global views' spatial results and inputs (view-major) and the local inputs."""
        b = len(self.image_index)
        return Batch(batch_dict(x[:b], x[b:], normalize(spatial[:b]), loc, self.image_index, self.boxes[:, :2],
                                self.boxes[:, 2:]))


def draw_batch_2d(dataset: PretrainDataset2D, indices: Sequence[int]) -> Draws2D:
    if len(indices) == 0:
        raise ValueError("a batch needs at least one index")
    draws = [dataset.sample_params(int(i)) for i in indices]
    local = [p for d in draws for p in d[2]]
    return Draws2D(np.array([d[0] for d in draws], dtype=np.int64),
                   stack_params([d[1][k] for k in range(2) for d in draws]),
                   stack_params(local) if local else None,
                   np.stack([np.stack([p["box"] for p in (*d[1], *d[2])]) for d in draws]))


class BatchLoader2D:
    """Batches of ``dataset``'s items built at once on ``device`` (the images are copied there once)."""

    def __init__(self, dataset: PretrainDataset2D, device: str | torch.device = "cpu"):
        self.dataset = dataset
        self.device = torch.device(device)
        bank = dataset.bank
        self.pixels = torch.from_numpy(bank.pixels).to(self.device)
        self.scale = bank.scale

    def batch(self, indices: Sequence[int]) -> Batch:
        cfg = self.dataset.views
        d = draw_batch_2d(self.dataset, indices)
        image_index = torch.from_numpy(d.image_index)
        spatial, x = batched_views(self.pixels, self.scale, image_index.repeat(2), d.global_params, cfg.global_size)
        if cfg.n_local:
            loc = batched_views(self.pixels, self.scale, image_index.repeat_interleave(cfg.n_local), d.local_params,
                                cfg.local_size)[1]
        else:
            loc = torch.empty((0, 3, cfg.local_size, cfg.local_size), device=self.device)
        return d.batch(spatial, x, loc)

    def batches(self, batch_indices: Iterable[Sequence[int]]) -> Iterator[Batch]:
        for indices in batch_indices:
            yield self.batch(indices)
