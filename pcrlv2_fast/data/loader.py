"""Batch-level loaders: whole batches of PCRLv2 samples in one pass, equal to the per-sample dataset.

``PretrainDataset`` builds a sample at a time (cut, resize, augment each view separately); a
:class:`BatchLoader` produces the same batches from the same ``(seed, epoch, index)``:

1. per sample, the boxes and the generator come from :meth:`PretrainDataset.sample_geometry` (the
   dataset's own code), and ``augment.draw_sample_params`` draws the augmentation parameters from that
   generator: the very function the dataset draws with (noise seeds included), so every parameter and every
   noise value is the one the dataset uses;
2. all global crops of the batch, then all local crops, are cut and resized in one go: loader ``torch``
   with :class:`~pcrlv2_fast.data.batched.VolumeBank` (on any device), loader ``native`` with the C++
   ``native.crop_resize`` per volume, straight from the (memory-mapped) arrays into a preallocated buffer;
3. the batched ops of :mod:`~pcrlv2_fast.data.batched` augment the stacked global and local views. Backend
   ``native`` with augmentation instead runs the whole chain per view in C++ (``native.views``: crop +
   resize, flip + affine, blur + noise + gamma + swap + z-normalisation), so each view's intermediates stay
   in the core's cache; only the views and the targets are written to memory.

The native loader writes a batch's tensors into output buffers leased from a :class:`BufferPool`: the caller
returns them with ``batch.release()`` once it reads the batch no more (the trainer does after the step that used
it), and later batches reuse them instead of page-faulting fresh multi-MB tensors in. A batch that was not
released is never written again.

The outputs equal the dataset's element-wise up to float rounding (the tests bound it by 1e-4). One
difference: a volume whose window is (0, 1) is used as is by the dataset, while the crop kernels here clip
it to [0, 1] when other volumes of the run have a real window (``torch``) or always (``native``); volumes
loaded by :mod:`pcrlv2_fast.data.io` or a cache are either all windowed or already in [0, 1].
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from . import dali, native
from .batch import batch_dict, cat_params, draw_batch
from .batched import VolumeBank, augment_batch, z_normalize_batch
from .dataset import PretrainDataset

__all__ = ["LOADERS", "Batch", "BatchLoader", "BufferPool", "bank_bytes", "default_loader", "gpu_cache_choice",
           "resolve_loader"]

LOADERS = ("dataset", "torch", "native", "dali")


def default_loader() -> str:
    """The loader ``auto`` picks: ``native`` when the C++ extension is built, else ``torch`` (both give the
    dataset's samples, see the module docstring)."""
    return "native" if native.available() else "torch"


def resolve_loader(name: str) -> str:
    """``name`` checked against :data:`LOADERS`; ``native`` without the compiled extension, or ``dali``
    without NVIDIA DALI, is a ValueError that says why it is missing."""
    if name not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {name!r}")
    if name == "native" and not native.available():
        raise ValueError(f"--loader native needs the C++ extension: {native.load_error()}")
    if name == "dali" and (error := dali.dali_load_error()) is not None:
        raise ValueError(error)
    return name


def bank_bytes(volumes: Sequence) -> int:
    """Bytes a :class:`VolumeBank` of ``volumes`` holds on its device: every voxel in their common dtype (float32
    when the dtypes differ), as the torch loader stores them."""
    itemsize = VolumeBank.storage_dtype([v.array for v in volumes]).itemsize
    return sum(int(np.prod(np.shape(v.array))) for v in volumes) * itemsize


def gpu_cache_choice(need: int, budget: float, native_ok: bool) -> tuple[str, str]:
    """(loader, message) for ``--loader torch`` on a GPU: the torch loader keeps every volume in GPU memory, so it
    runs only when that fits ``budget`` bytes; above it the native loader builds the batches on the CPU (into
    pinned buffers, copied ahead of the step). Without the C++ extension that is an error naming the fixes."""
    gib = 2.0**30
    if need <= budget:
        return "torch", (f"torch loader: the volumes take {need / gib:.2f} GiB on the GPU "
                         f"(budget {budget / gib:.2f} GiB)")
    if not native_ok:
        raise ValueError(f"the volumes need {need / gib:.2f} GiB of GPU memory for --loader torch, above the GPU cache "
                         f"budget of {budget / gib:.2f} GiB; raise --gpu-cache-gb or build the C++ extension for the "
                         "native loader")
    return "native", (f"the volumes need {need / gib:.2f} GiB, above the GPU cache budget of {budget / gib:.2f} GiB "
                      "(--gpu-cache-gb): the native loader builds the batches on the CPU into pinned buffers instead")


class BufferPool:
    """Output buffers of released batches, handed out again for later batches of the same shape.

    Fresh multi-MB tensors are page-faulted in on every batch; reused ones are already mapped
    (``benchmarks/results`` has the measurement). A buffer is in the pool only between its batch's
    :meth:`Batch.release` and its next use, so a batch that was not released is never written again; one released
    with ``after`` (a ``torch.cuda.Event``, anything with ``query()``) waits until that has completed, e.g. the
    asynchronous host-to-device copy that reads it. At most ``size`` buffers wait; older ones are dropped.
    """

    def __init__(self, pin_memory: bool = False, size: int = 12):
        self.pin_memory = pin_memory
        self.size = size
        self.reused = 0  # buffers handed out again (for tests and profiling)
        self._free: list[tuple[torch.Tensor, object]] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor of ``shape``: a released one whose ``after`` has completed, else a new one."""
        with self._lock:
            for i, (t, after) in enumerate(self._free):
                if tuple(t.shape) == shape and (after is None or after.query()):
                    del self._free[i]
                    self.reused += 1
                    return t
        return torch.empty(shape, dtype=torch.float32, pin_memory=self.pin_memory)

    def give_back(self, tensors: Sequence[torch.Tensor], after=None) -> None:
        with self._lock:
            self._free.extend((t, after) for t in tensors)
            del self._free[:max(0, len(self._free) - self.size)]


class Batch(dict):
    """A batch dict (see :class:`BatchLoader`) that may hold leased output buffers: :meth:`release` returns them
    to the loader's pool once the caller reads none of the batch's tensors any more (no tensor or view of it is
    used afterwards). Not releasing a batch is always safe: its buffers are then simply not reused."""

    def __init__(self, data: dict, pool: BufferPool | None = None, buffers: Sequence[torch.Tensor] = ()):
        super().__init__(data)
        self._pool, self._buffers = pool, list(buffers)

    def release(self, after=None) -> None:
        """Return the buffers (once; later calls do nothing), reusable when ``after`` (if given) has completed."""
        if self._pool is not None and self._buffers:
            self._pool.give_back(self._buffers, after)
        self._buffers = []


class BatchLoader:
    """Batches of ``dataset``'s items (same seed, epoch, crops and augmentations), built a batch at a time.

    ``loader``: ``"torch"`` (a :class:`VolumeBank` on ``device``; the volumes are copied into it once) or
    ``"native"`` (CPU, the C++ extension reading the arrays in place; ``num_threads`` OpenMP threads, default
    torch's; ``pin_memory`` puts its output buffers in page-locked memory). ``loader.batches(batch_indices)``
    yields, for each list of item indices, the dict a
    ``DataLoader(dataset, batch_sampler=batch_indices)`` yields: float32 ``x1``, ``x2``, ``gt`` (B, 1, *global
    out), ``locals`` (B, n_local, 1, *local out), int64 ``global_boxes`` (B, 2, 6), ``local_boxes``
    (B, n_local, 6) and ``volume_index`` (B,). Call ``dataset.set_epoch`` first, as for the DataLoader.
    """

    def __init__(self, dataset: PretrainDataset, loader: str = "torch", device: str | torch.device = "cpu",
                 num_threads: int | None = None, pin_memory: bool = False):
        if loader not in ("torch", "native"):
            raise ValueError(f"BatchLoader's loader must be 'torch' or 'native', got {loader!r}")
        resolve_loader(loader)
        self.dataset = dataset
        self.loader_name = loader
        self.device = torch.device(device)
        self.num_threads = num_threads
        # Native output buffers in page-locked memory: their host-to-device copies can run asynchronously.
        self.pin_memory = pin_memory
        self.pool = BufferPool(pin_memory)  # the native loader's output buffers
        if loader == "native":
            if self.device.type != "cpu":
                raise ValueError(f"the native loader runs on the CPU, got device {self.device}")
            for v in dataset.volumes:
                if np.asarray(v.array).dtype not in native.INPUT_DTYPES:
                    raise ValueError(f"{v.name}: the native loader reads int16, float16 or float32 volumes, "
                                     f"got {v.array.dtype}; use --loader torch")
            self.bank = None
            # Torch views of the (memory-mapped) arrays, made once: no copies, the pages stay the maps'.
            self._tensors = [native.volume_tensor(v.array) for v in dataset.volumes]
        else:
            windows = [tuple(float(w) for w in v.window) for v in dataset.volumes]
            plain = all(w == (0.0, 1.0) for w in windows)
            self.bank = VolumeBank([v.array for v in dataset.volumes], None if plain else windows, self.device)

    # --------------------------------------------------------------------------------------- crops
    def _crop(self, volume_index: np.ndarray, boxes: np.ndarray, out_size) -> torch.Tensor:
        if self.bank is not None:
            return self.bank.crop_resize(torch.from_numpy(volume_index), torch.from_numpy(boxes), out_size)
        # Each run of consecutive boxes from one volume is written by one call into its slice of the buffer.
        buffer = torch.empty((len(boxes), 1, *out_size), dtype=torch.float32)
        if len(boxes) == 0:
            return buffer
        starts = np.flatnonzero(np.r_[True, volume_index[1:] != volume_index[:-1]]).tolist()
        for start, stop in zip(starts, [*starts[1:], len(boxes)], strict=True):
            volume = self.dataset.volumes[int(volume_index[start])]
            native.crop_resize(volume.array, boxes[start:stop], out_size, volume.window, out=buffer[start:stop],
                               num_threads=self.num_threads)
        return buffer

    def _lease(self, leased: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """An output buffer from the pool, noted in ``leased`` (the batch's buffers, returned when it is released)."""
        leased.append(self.pool.take(shape))
        return leased[-1]

    def _views(self, volume_index: np.ndarray, boxes: np.ndarray, out_size, params: dict, leased: list,
               keep: int = 0, order=None):
        """``native.views`` of the batch's views (only the volumes they use are passed): (views, the spatial
        result of the first ``keep`` views or None)."""
        used, local = np.unique(volume_index, return_inverse=True)
        used = used.tolist()
        spatial = self._lease(leased, (keep, 1, *out_size)) if keep else None
        out = native.views([self._tensors[k] for k in used], [self.dataset.volumes[k].window for k in used], local,
                           boxes, out_size, params, spatial_out=spatial,
                           out=self._lease(leased, (len(boxes), 1, *out_size)),
                           order=order, num_threads=self.num_threads)
        return out, spatial

    # ------------------------------------------------------------------------------------- batches
    def batch(self, indices: Sequence[int]) -> Batch:
        """The batch of items ``indices`` (the dataset's current epoch); release it (:meth:`Batch.release`) when
        done with it so that the native loader can reuse its buffers."""
        ds, crop = self.dataset, self.dataset.crop
        volume_index, g_boxes, l_boxes, g_params, l_params = draw_batch(ds, indices)
        b, n_global, n_local = len(indices), g_boxes.shape[1], l_boxes.shape[1]
        # Global views view-major (all first views, then all second views): x1, x2 and gt are then contiguous
        # slices of one buffer. Local views sample-major, as the batch's (B, n_local) layout.
        g_volumes, g_flat = np.tile(volume_index, n_global), g_boxes.transpose(1, 0, 2).reshape(-1, 6)
        l_volumes, l_flat = np.repeat(volume_index, n_local), l_boxes.reshape(-1, 6)
        if ds.augment:
            view_major = torch.from_numpy(np.arange(b * n_global).reshape(b, n_global).T.reshape(-1))
            gp = {k: (v[view_major] if isinstance(v, torch.Tensor) else v) for k, v in cat_params(g_params).items()}
            lp = cat_params(l_params) if n_local else None
        empty_locals = torch.empty((0, 1, *crop.local_out), dtype=torch.float32, device=self.device)
        if ds.augment and self.bank is None:
            # Native: crop, flip + affine and intensity fused per view (native.views), the target kept on the
            # way; each sample's two global views processed back to back (their boxes overlap: IoU > min_iou).
            sample_major = np.arange(b * n_global).reshape(n_global, b).T.reshape(-1)
            leased: list[torch.Tensor] = []
            x, gt = self._views(g_volumes, g_flat, tuple(crop.global_out), gp, leased, keep=b, order=sample_major)
            loc = self._views(l_volumes, l_flat, tuple(crop.local_out), lp, leased)[0] if n_local else empty_locals
            return Batch(batch_dict(x[:b], x[b:2 * b], gt, loc, volume_index, g_boxes, l_boxes), self.pool, leased)
        g = self._crop(g_volumes, g_flat, tuple(crop.global_out))
        loc = self._crop(l_volumes, l_flat, tuple(crop.local_out)) if n_local else empty_locals
        if ds.augment:  # the torch loader: batched ops on the bank's device
            spatial, x = augment_batch(g, gp)
            gt = spatial[:b]
            if n_local:
                loc = augment_batch(loc, lp)[1]
        else:
            gt = g[:b]
            x = z_normalize_batch(g)
            loc = z_normalize_batch(loc) if n_local else loc
        return Batch(batch_dict(x[:b], x[b:2 * b], gt, loc, volume_index, g_boxes, l_boxes))

    def batches(self, batch_indices: Iterable[Sequence[int]]) -> Iterator[Batch]:
        """One batch per list of item indices, lazily."""
        for indices in batch_indices:
            yield self.batch(indices)
