"""Batch-level loaders: whole batches of PCRLv2 samples in one pass, equal to the per-sample dataset.

``PretrainDataset`` builds a sample at a time (cut, resize, augment each view separately); a
:class:`BatchLoader` produces the same batches from the same ``(seed, epoch, index)``:

1. per sample, the boxes and the generator come from :meth:`PretrainDataset.sample_geometry` (the
   dataset's own code), and ``augment.draw_sample_params`` draws the augmentation parameters from that
   generator: the very function the dataset draws with (noise seeds included), so every parameter and every
   noise value is the one the dataset uses;
2. all global crops of the batch, then all local crops, are cut and resized in one go: backend ``torch``
   with :class:`~pcrlv2_fast.data.batched.VolumeBank` (on any device), backend ``native`` with the C++
   ``native.crop_resize`` per volume, straight from the (memory-mapped) arrays into a preallocated buffer;
3. the batched ops of :mod:`~pcrlv2_fast.data.batched` augment the stacked global and local views. Backend
   ``native`` with augmentation instead runs the whole chain per view in C++ (``native.views``: crop +
   resize, flip + affine, blur + noise + gamma + swap + z-normalisation), so each view's intermediates stay
   in the core's cache; only the views and the targets are written to memory.

The native backend writes a batch's tensors into output buffers it keeps and reuses once nothing references a
batch any more (``BatchLoader._buffer``): multi-MB tensors allocated fresh for every batch cost a page fault per
4 KiB (a fifth of the loader's time at batch 32). A batch the caller still holds, or any tensor or view of it,
is never written again.

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

from . import native
from .augment import draw_sample_params
from .batched import VolumeBank, intensity_batch, spatial_batch, z_normalize_batch
from .dataset import PretrainDataset

__all__ = ["LOADERS", "BatchLoader", "bank_bytes", "default_loader", "draw_sample_params", "gpu_cache_choice",
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
    if name == "dali":
        from .dali import dali_load_error  # dali.py imports this module

        if (error := dali_load_error()) is not None:
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


def _unreferenced(t: torch.Tensor) -> bool:
    """True when ``t``'s storage is referenced by ``t`` alone (and is not in shared memory): its memory may be
    written again. False when that cannot be read (torch without the storage use count)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or t.is_shared():
        return False
    # Two references: t itself and the temporary storage object made to ask.
    return use_count(t.untyped_storage()._cdata) == 2


def _cat(params: list[dict]) -> dict:
    """Per-sample parameter dicts concatenated along the view axis (sample-major)."""
    return {k: (torch.cat([p[k] for p in params]) if isinstance(params[0][k], torch.Tensor) else params[0][k])
            for k in params[0]}


class BatchLoader:
    """Batches of ``dataset``'s items (same seed, epoch, crops and augmentations), built a batch at a time.

    ``backend``: ``"torch"`` (a :class:`VolumeBank` on ``device``; the volumes are copied into it once) or
    ``"native"`` (CPU, the C++ extension reading the arrays in place; ``num_threads`` OpenMP threads, default
    torch's; ``pin_memory`` puts its output buffers in page-locked memory). ``loader.batches(batch_indices)``
    yields, for each list of item indices, the dict a
    ``DataLoader(dataset, batch_sampler=batch_indices)`` yields: float32 ``x1``, ``x2``, ``gt`` (B, 1, *global
    out), ``locals`` (B, n_local, 1, *local out), int64 ``global_boxes`` (B, 2, 6), ``local_boxes``
    (B, n_local, 6) and ``volume_index`` (B,). Call ``dataset.set_epoch`` first, as for the DataLoader.
    """

    def __init__(self, dataset: PretrainDataset, backend: str = "torch", device: str | torch.device = "cpu",
                 num_threads: int | None = None, pin_memory: bool = False):
        if backend not in ("torch", "native"):
            raise ValueError(f"BatchLoader backend must be 'torch' or 'native', got {backend!r}")
        resolve_loader(backend)
        self.dataset = dataset
        self.backend = backend
        self.device = torch.device(device)
        self.num_threads = num_threads
        # Native output buffers in page-locked memory: their host-to-device copies can run asynchronously.
        self.pin_memory = pin_memory
        if backend == "native":
            if self.device.type != "cpu":
                raise ValueError(f"the native loader runs on the CPU, got device {self.device}")
            for v in dataset.volumes:
                if np.asarray(v.array).dtype not in native.INPUT_DTYPES:
                    raise ValueError(f"{v.name}: the native loader reads int16, float16 or float32 volumes, "
                                     f"got {v.array.dtype}; use --loader torch")
            self.bank = None
            # Torch views of the (memory-mapped) arrays, made once: no copies, the pages stay the maps'.
            self._tensors = [native._volume_tensor(v.array) for v in dataset.volumes]
            # Output buffers handed out before, reused once nothing references them any more (see _buffer).
            self._pool: list[torch.Tensor] = []
            self._pool_lock = threading.Lock()
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

    _POOL_SIZE = 12

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor of ``shape`` for a batch's output: one returned earlier whose storage nothing
        references any more (no tensor, view or numpy array of the caller's; never one moved to shared memory,
        as DataLoader workers do), else a new one. Fresh multi-MB tensors are page-faulted in on every batch
        (at batch 32 that was a fifth of the native loader's time); reused ones are already mapped."""
        # The caller gets an alias (its own tensor object on the same storage), so the storage's use count sees
        # every reference the caller keeps; the pool's tensor alone is never handed out. Check and claim happen
        # under a lock, so two threads never get the same buffer.
        with self._pool_lock:
            for t in self._pool:
                if tuple(t.shape) == shape and _unreferenced(t):
                    return t.view(shape)
            t = torch.empty(shape, dtype=torch.float32, pin_memory=self.pin_memory)
            if _unreferenced(t):  # the storage use count is readable: keep it for later batches
                self._pool.append(t)
                if len(self._pool) > self._POOL_SIZE:
                    self._pool.pop(0)
            return t.view(shape)

    def _views(self, volume_index: np.ndarray, boxes: np.ndarray, out_size, params: dict, keep: int = 0,
               order=None):
        """``native.views`` of the batch's views (only the volumes they use are passed): (views, the spatial
        result of the first ``keep`` views or None)."""
        used, local = np.unique(volume_index, return_inverse=True)
        used = used.tolist()
        spatial = self._buffer((keep, 1, *out_size)) if keep else None
        out = native.views([self._tensors[k] for k in used], [self.dataset.volumes[k].window for k in used], local,
                           boxes, out_size, params, spatial_out=spatial, out=self._buffer((len(boxes), 1, *out_size)),
                           order=order, num_threads=self.num_threads)
        return out, spatial

    # ------------------------------------------------------------------------------------- batches
    def batch(self, indices: Sequence[int]) -> dict:
        """The batch of items ``indices`` (the dataset's current epoch)."""
        ds, crop = self.dataset, self.dataset.crop
        volume_index, g_boxes, l_boxes, g_params, l_params = draw_batch(ds, indices)
        b, n_global, n_local = len(indices), g_boxes.shape[1], l_boxes.shape[1]
        # Global views view-major (all first views, then all second views): x1, x2 and gt are then contiguous
        # slices of one buffer. Local views sample-major, as the batch's (B, n_local) layout.
        g_volumes, g_flat = np.tile(volume_index, n_global), g_boxes.transpose(1, 0, 2).reshape(-1, 6)
        l_volumes, l_flat = np.repeat(volume_index, n_local), l_boxes.reshape(-1, 6)
        if ds.augment:
            view_major = torch.from_numpy(np.arange(b * n_global).reshape(b, n_global).T.reshape(-1))
            gp = {k: (v[view_major] if isinstance(v, torch.Tensor) else v) for k, v in _cat(g_params).items()}
            lp = _cat(l_params) if n_local else None
        empty_locals = torch.empty((0, 1, *crop.local_out), dtype=torch.float32, device=self.device)
        if ds.augment and self.bank is None:
            # Native: crop, flip + affine and intensity fused per view (native.views), the target kept on the
            # way; each sample's two global views processed back to back (their boxes overlap: IoU > min_iou).
            sample_major = np.arange(b * n_global).reshape(n_global, b).T.reshape(-1)
            x, gt = self._views(g_volumes, g_flat, tuple(crop.global_out), gp, keep=b, order=sample_major)
            loc = self._views(l_volumes, l_flat, tuple(crop.local_out), lp)[0] if n_local else empty_locals
            return batch_dict(x[:b], x[b:2 * b], gt, loc, volume_index, g_boxes, l_boxes)
        g = self._crop(g_volumes, g_flat, tuple(crop.global_out))
        loc = self._crop(l_volumes, l_flat, tuple(crop.local_out)) if n_local else empty_locals
        if ds.augment:  # the torch backend: batched ops on the bank's device
            spatial = spatial_batch(g, gp)
            gt = spatial[:b]
            x = intensity_batch(spatial, gp)
            if n_local:
                loc = intensity_batch(spatial_batch(loc, lp), lp)
        else:
            gt = g[:b]
            x = z_normalize_batch(g)
            loc = z_normalize_batch(loc) if n_local else loc
        return batch_dict(x[:b], x[b:2 * b], gt, loc, volume_index, g_boxes, l_boxes)

    def batches(self, batch_indices: Iterable[Sequence[int]]) -> Iterator[dict]:
        """One batch per list of item indices, lazily."""
        for indices in batch_indices:
            yield self.batch(indices)
