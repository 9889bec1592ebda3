"""Crop-box geometry of PCRLv2 sub-crops: pure numpy, no pixels touched (except the optional dense filter).

A box is 6 integers ``(x0, y0, z0, sx, sy, sz)``: start voxel and size along the volume axes (x, y, z).

The rules are those of the official ``luna_preprocess.crop_pair``, drawn fresh per sample instead of 16
pairs per volume generated offline. Deviations, all for volumes the official code mishandled:

- Start bounds: the official start range per axis is ``[border, size - crop - 1 - border]`` (z also
  subtracts ``len_depth`` = 3). When a volume is too small for that range, the official code padded z
  with zeros and shrank x/y crops by 32 voxels; here the spare tail (1, or 1 + len_depth in z) and then
  the margins shrink symmetrically instead (see :func:`start_bounds`), and crop sizes that do not fit
  the volume at all are never drawn.
- Depth look-ahead: the official crop took ``len_depth`` extra slices in z, resized them with the crop
  and dropped them afterwards, so resized crops covered a slightly shorter z range than drawn; here a
  box covers exactly its size.
- Local crops: the official local start was drawn inside the union of the global boxes +- 3 voxels and
  the crop was cut by numpy slicing, which silently returned a smaller crop near the volume's far
  edge; here the start is clipped so the whole box lies inside the volume.
- Dense filter (official lung heuristic, off by default): the official test summed a depth-weighted
  "dense within the next 3 slices" map of the resized crop and compared it with 15% of crop 1's
  *original* voxel count (for both crops), which made the effective limit depend on the crop size; here
  a crop is rejected when more than ``dense_max_fraction`` of its voxels are >= ``dense_threshold``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["CropConfig", "SampleBoxes", "draw_sample_boxes", "box_iou", "start_bounds"]

# Candidate pairs drawn per vectorised batch while searching for one with IoU > min_iou: the first batch is
# small (most volumes accept one candidate in 2-15), later ones double up to the largest.
_FIRST_BATCH = 32
_BATCH = 512


@dataclass(frozen=True)
class CropConfig:
    """Every constant of the official sub-crop geometry; sizes are (x, y, z) in voxels."""

    global_sizes: tuple[tuple[int, int, int], ...] = ((96, 96, 64), (96, 96, 96), (112, 112, 64), (64, 64, 32))
    global_out: tuple[int, int, int] = (64, 64, 32)
    local_sizes: tuple[tuple[int, int, int], ...] = ((32, 32, 16), (16, 16, 16), (32, 32, 32), (8, 8, 8))
    local_out: tuple[int, int, int] = (16, 16, 16)
    n_local: int = 6
    border_xy: int = 70
    border_z: int = 15
    len_depth: int = 3  # official extra z slices kept spare at the far end of the start range
    min_iou: float = 0.3
    local_jitter: int = 3
    dense_filter: bool = False
    dense_threshold: float = 0.425  # -150 HU on the [-1000, 1000] -> [0, 1] scale
    dense_max_fraction: float = 0.15
    max_tries: int = 100_000  # candidate pairs before giving up

    def __post_init__(self):
        for name in ("global_sizes", "local_sizes"):
            sizes = getattr(self, name)
            if not sizes or any(len(s) != 3 or min(s) < 1 for s in sizes):
                raise ValueError(f"{name} must be a non-empty list of positive (x, y, z) sizes, got {sizes}")
        if self.n_local < 0 or self.max_tries < 1 or min(self.border_xy, self.border_z, self.len_depth) < 0:
            raise ValueError(f"invalid CropConfig: {self}")

    def scaled(self, scale: float) -> CropConfig:
        """Every crop size, the views' output sizes, the margins and the local jitter times ``scale``: the official
        geometry for volumes smaller than its crops (e.g. 0.4 for ~35 x 50 x 36 voxel hippocampus MR crops).

        Crop sizes round to whole voxels (at least 1); output sizes round to a multiple of 8 (at least 8), since
        the network halves them three times. The rules (IoU > min_iou, local starts near the global pair) are
        unchanged. A departure from the official geometry, which has only scale 1."""
        if not 0 < scale <= 1:
            raise ValueError(f"crop scale must be in (0, 1], got {scale}")
        if scale == 1:
            return self

        def voxels(size):
            return tuple(max(1, round(v * scale)) for v in size)

        def out(size):
            return tuple(max(8, 8 * round(v * scale / 8)) for v in size)

        return replace(self, global_sizes=tuple(voxels(s) for s in self.global_sizes), global_out=out(self.global_out),
                       local_sizes=tuple(voxels(s) for s in self.local_sizes), local_out=out(self.local_out),
                       border_xy=round(self.border_xy * scale), border_z=round(self.border_z * scale),
                       len_depth=round(self.len_depth * scale), local_jitter=round(self.local_jitter * scale))

    @property
    def min_volume(self) -> tuple[int, int, int]:
        """Per axis, the smallest global crop size: volumes below it in any axis are rejected by preprocessing."""
        return tuple(int(v) for v in np.min(np.asarray(self.global_sizes), axis=0))

    def check_fits(self, shape, name: str) -> None:
        """A ValueError naming the volume when no global crop size fits it (drawing would fail mid-run)."""
        if not any(all(s <= n for s, n in zip(size, shape, strict=True)) for size in self.global_sizes):
            raise ValueError(
                f"{name}: shape {tuple(int(n) for n in shape)} (x, y, z) is smaller than every global crop size "
                f"{self.global_sizes}; pretrain small volumes with a smaller --crop-scale (each crop and view size "
                f"times it) or leave this volume out")

    @classmethod
    def from_name(cls, name: str) -> CropConfig:
        """Named presets: ``default`` (any anatomy) and ``lung`` (official LUNA setting, dense filter on)."""
        presets = {"default": cls(), "lung": replace(cls(), dense_filter=True)}
        if name not in presets:
            raise ValueError(f"unknown crop preset {name!r}; choose from {sorted(presets)}")
        return presets[name]


@dataclass
class SampleBoxes:
    """The boxes of one sample: two global crops and ``n_local`` local crops."""

    global_boxes: np.ndarray  # (2, 6) int64: x0, y0, z0, sx, sy, sz
    local_boxes: np.ndarray  # (n_local, 6) int64


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (..., 6), broadcast."""
    lo = np.maximum(a[..., :3], b[..., :3])
    hi = np.minimum(a[..., :3] + a[..., 3:], b[..., :3] + b[..., 3:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1).astype(np.float64)
    union = np.prod(a[..., 3:], axis=-1) + np.prod(b[..., 3:], axis=-1) - inter
    return inter / union


def box_iou(a, b) -> float:
    """Intersection over union of two (6,) boxes ``(x0, y0, z0, sx, sy, sz)``."""
    return float(_iou(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))


def start_bounds(
    shape: np.ndarray, sizes: np.ndarray, border: np.ndarray, tail: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inclusive start bounds ``(lo, hi)`` per size and axis, and which sizes fit the volume.

    ``shape`` (3,), ``sizes`` (S, 3), ``border`` (3,) margins, ``tail`` (3,) extra spare voxels at the far end
    (official: 0 in x/y, len_depth in z). The official range is ``[border, shape - size - 1 - tail - border]``.
    When it is empty, the spare ``1 + tail`` voxels shrink first (down to what is free), then the margin
    shrinks to the largest value that keeps the range non-empty, symmetric at both ends.
    """
    free = shape - sizes  # largest start that keeps the box inside
    fits = np.all(free >= 0, axis=-1)
    spare = np.clip(np.minimum(1 + tail, free), 0, None)
    margin = np.clip(np.minimum(border, (free - spare) // 2), 0, None)
    return margin, free - spare - margin, fits


def _too_dense(volume: np.ndarray, box: np.ndarray, cfg: CropConfig) -> bool:
    x0, y0, z0, sx, sy, sz = box
    crop = volume[x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz]
    return np.count_nonzero(crop >= cfg.dense_threshold) > cfg.dense_max_fraction * crop.size


@functools.lru_cache(maxsize=1024)
def _global_candidates(shape: tuple[int, int, int], cfg: CropConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes, lo, hi) of the global crop sizes that fit a volume of ``shape`` (see :func:`start_bounds`)."""
    sizes = np.asarray(cfg.global_sizes, dtype=np.int64)
    border = np.array([cfg.border_xy, cfg.border_xy, cfg.border_z], dtype=np.int64)
    tail = np.array([0, 0, cfg.len_depth], dtype=np.int64)
    lo, hi, fits = start_bounds(np.asarray(shape, dtype=np.int64), sizes, border, tail)
    if not fits.any():
        raise ValueError(f"volume shape {shape} is smaller than every global crop size {cfg.global_sizes}")
    return sizes[fits], lo[fits], hi[fits]


@functools.lru_cache(maxsize=1024)
def _local_sizes(shape: tuple[int, int, int], cfg: CropConfig) -> np.ndarray:
    sizes = np.asarray(cfg.local_sizes, dtype=np.int64)
    sizes = sizes[np.all(sizes <= np.asarray(shape), axis=-1)]
    if len(sizes) == 0:
        raise ValueError(f"volume shape {shape} is smaller than every local crop size {cfg.local_sizes}")
    return sizes


def _draw_global_pair(shape: np.ndarray, rng: np.random.Generator, cfg: CropConfig, volume) -> np.ndarray:
    sizes, lo, hi = _global_candidates(tuple(int(s) for s in shape), cfg)
    tried, batch = 0, _FIRST_BATCH
    while tried < cfg.max_tries:
        # Rejection sampling in vectorised batches: the first accepted candidate of an i.i.d. stream has the
        # same distribution as the official draw-until-accepted loop.
        n = min(batch, cfg.max_tries - tried)
        tried += n
        batch = min(2 * batch, _BATCH)
        index = rng.integers(0, len(sizes), size=(n, 2))
        starts = rng.integers(lo[index], hi[index], endpoint=True)
        boxes = np.concatenate([starts, sizes[index]], axis=-1)  # (n, 2, 6)
        for j in np.flatnonzero(_iou(boxes[:, 0], boxes[:, 1]) > cfg.min_iou):
            if cfg.dense_filter and (_too_dense(volume, boxes[j, 0], cfg) or _too_dense(volume, boxes[j, 1], cfg)):
                continue
            return boxes[j]
    filter_note = " and the dense-voxel filter" if cfg.dense_filter else ""
    raise RuntimeError(
        f"no pair of global crops with IoU > {cfg.min_iou}{filter_note} found in {cfg.max_tries} tries for a volume "
        f"of shape {tuple(shape.tolist())}; relax min_iou/dense_max_fraction or raise max_tries"
    )


def _draw_locals(shape: np.ndarray, pair: np.ndarray, rng: np.random.Generator, cfg: CropConfig) -> np.ndarray:
    sizes = _local_sizes(tuple(int(s) for s in shape), cfg)
    union_lo = pair[:, :3].min(axis=0)
    union_hi = (pair[:, :3] + pair[:, 3:]).max(axis=0)
    lo = np.maximum(union_lo - cfg.local_jitter, 0)
    hi = np.minimum(union_hi + cfg.local_jitter, shape)  # exclusive, as the official np.random.randint
    starts = rng.integers(lo, hi, size=(cfg.n_local, 3))
    local_sizes = sizes[rng.integers(0, len(sizes), size=cfg.n_local)]
    starts = np.minimum(starts, shape - local_sizes)  # keep the whole box inside the volume
    return np.concatenate([starts, local_sizes], axis=-1)


def draw_sample_boxes(shape_xyz, rng: np.random.Generator, cfg: CropConfig, volume=None) -> SampleBoxes:
    """Draw two global boxes (IoU > ``cfg.min_iou``) and ``cfg.n_local`` local boxes for a volume.

    ``volume`` (the [0, 1] array, axes x, y, z) is needed only when ``cfg.dense_filter`` is on.
    Raises ValueError when no crop size fits ``shape_xyz`` and RuntimeError when no acceptable pair is
    found within ``cfg.max_tries`` candidates.
    """
    shape = np.asarray(shape_xyz, dtype=np.int64)
    if shape.shape != (3,):
        raise ValueError(f"shape_xyz must have 3 entries, got {shape_xyz}")
    if cfg.dense_filter:
        if volume is None:
            raise ValueError("cfg.dense_filter needs the volume array")
        if tuple(volume.shape) != tuple(shape):
            raise ValueError(f"volume shape {volume.shape} differs from shape_xyz {tuple(shape.tolist())}")
    pair = _draw_global_pair(shape, rng, cfg, volume)
    return SampleBoxes(global_boxes=pair, local_boxes=_draw_locals(shape, pair, rng, cfg))
