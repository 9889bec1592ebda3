"""The ``dali`` data backend: PCRLv2 batches built by NVIDIA DALI pipelines, on the CPU or a CUDA GPU.

:class:`DaliLoader` gives the batches of :class:`~pcrlv2_fast.data.loader.BatchLoader` (same dict, keys, shapes,
dtypes) for the same dataset, seed and epoch. The geometry and every augmentation parameter come from the draws
the other loaders use: :meth:`PretrainDataset.sample_geometry` (boxes and the sample's generator) and
:func:`~pcrlv2_fast.data.loader.draw_sample_params` (``augment.draw_sample_params``). The host cuts the raw
crops out of the (memory-mapped) arrays in numpy, in their storage dtype (int16 HU, float16 or float32), and
hands them with the per-view parameters to the pipelines through ``fn.external_source``, batch by batch in the
sampler's order. Two pipelines are built once per loader and reused (global views, local views); per view:

1. the intensity window ``clip((v - lo) / (hi - lo), 0, 1)`` as DALI arithmetic (after ``fn.cast`` to float32
   for float16, which DALI arithmetic does not take); when no volume has a window other than (0, 1) the window
   is the identity and only the cast to float32 remains (none for float32 volumes);
2. ``fn.resize``, trilinear with ``antialias=False``: the sample positions of ``F.interpolate(mode="trilinear",
   align_corners=False)``;
3. with augmentation: ``fn.flip``, then ``fn.warp_affine`` (linear, edge-clamped) with the view's matrix; the
   voxels outside SimpleITK's half-voxel band take the view's minimum (``fn.reductions.min``), blended by
   DALI arithmetic with the band mask (see below);
4. blur as three 1D ``fn.filter`` passes (x, y, z; the view reshaped so that the axis is an image axis) with
   the kernel of ``augment.blur`` and ``border="reflect_1001"``, scipy's 'reflect';
5. noise ``x + field * std``, then gamma ``sign(x) * |x| ** g``, DALI arithmetic;
6. local views, and global views without augmentation: ``fn.normalize(ddof=1)``.

Two steps run in torch on the output device:

- The band mask is computed as ``batched.affine_batch`` computes it (the same float32 grid and exact
  thresholds) and fed to the pipeline with the noise fields (``augment.normal_field`` of the drawn seeds). A
  mask from DALI's own coordinates (a nearest-neighbour ``fn.warp_affine`` with a -inf fill, whose test
  ``floor(s + 0.5) in [0, n - 1]`` is ``s in [-0.5, n - 0.5)``) was measured to disagree with the reference for
  about one voxel in a million (its coordinates are ~4e-5 voxel off), and the blur spreads such a voxel over
  its neighbourhood (errors up to 0.35 in a z-normalised view).
- The patch swap of global views, and their z-normalisation after it: DALI has no op for a sequence of
  data-dependent patch swaps; ``batched.swap_batch`` (bit-exact) and ``batched.z_normalize_batch`` run on the
  pipeline's output.

On CUDA (``device="cuda"``) the crops and per-view parameters are fed from the host and moved with ``.gpu()``
right after their sources, the torch-computed mask and fields are fed as CUDA tensors, and every op runs on
the GPU (``device_id`` = the CUDA index); on the CPU the pipelines run with ``device_id=None``.

Deviations from the torch reference (``augment.py``, ``dataset.py``), with the maxima the tests measured on
the phantoms:

- ``fn.warp_affine`` computes source coordinates in its own float32 arithmetic, up to ~4e-5 voxel from the
  exact value (the ``affine_grid`` path: ~1.5e-5), so resampled values differ by up to the local gradient
  times ~5e-5: ``gt`` within 2.4e-5, augmented views within 2.4e-4 after z-normalisation.
- Blur uses ``fn.filter``, not ``fn.gaussian_blur``: the latter pads with ``reflect_101`` (scipy's 'mirror') and
  sizes its window as ``2 ceil(3 sigma) + 1`` where the reference truncates at ``int(4 sigma + 0.5)`` with
  scipy's 'reflect'. The CPU passes equal ``augment.blur`` bit for bit. The y pass treats z as channels, so
  on the CPU the output's z extent must be at most 512 (OpenCV's channel limit).
- ``fn.normalize`` (local views; global views without augmentation) takes float32 statistics where
  ``augment.z_normalize`` uses float64: up to 4e-5 on low-contrast 16^3 views; a constant view gives zeros in
  both.
- ``fn.resize`` and the window match ``F.interpolate`` and ``cut_and_resize`` to 1.2e-7. The window follows the
  dataset (a (0, 1) window is not clipped), where the ``torch`` batch loader clips mixed windows.
- Gamma uses DALI's ``pow``, and the sign factor of a zero is -1 (times a zero power: -0, equal to 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from . import native
from .augment import gaussian_taps, normal_field
from .batch import batch_dict, cat_params, draw_batch
from .batched import affine_theta, inside_bounds, swap_batch, z_normalize_batch
from .dataset import PretrainDataset

__all__ = ["DaliLoader", "dali_available", "dali_load_error", "INSTALL_HINT"]

INSTALL_HINT = "--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda120"

# Storage dtypes the pipelines read as they are; crops of other dtypes (or of mixed-dtype volume sets) are
# converted to float32 on the host, which is the reference's first step too.
_RAW_DTYPES = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.float16),
               np.dtype(np.float32))


@functools.cache
def _load():
    """``(modules, None)`` with the DALI modules this backend uses, or ``(None, reason)``."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as exc:  # also raised for a DALI wheel whose native libraries fail to load
        return None, f"{type(exc).__name__}: {exc}"
    return {"fn": fn, "math": dmath, "types": types, "Pipeline": Pipeline, "feed_ndarray": feed_ndarray}, None


def dali_available() -> bool:
    """True when NVIDIA DALI (and its PyTorch plugin) can be imported."""
    return _load()[0] is not None


def dali_load_error() -> str | None:
    """Why DALI cannot be used (None when it can)."""
    error = _load()[1]
    return None if error is None else f"{INSTALL_HINT} ({error})"


def _dali():
    mods, error = _load()
    if mods is None:
        raise RuntimeError(f"{INSTALL_HINT} ({error})")
    return mods


# ------------------------------------------------------------------------------------------ parameters


def _blur_kernels(sigmas: torch.Tensor) -> list[list[np.ndarray]]:
    """Per view (N) and axis (x, y, z): the float32 1D kernel of ``augment.blur`` for (N, 3) sigmas, shaped for
    the filter passes of :class:`_ViewPipeline` ((k, 1) for x, (1, k) for y and z); [[1]] for a skipped axis."""
    radius, table = gaussian_taps(sigmas.to("cpu", torch.float64))  # table (N, 3, 2 R + 1)
    r_max = (table.shape[-1] - 1) // 2
    table = table.float().numpy()
    shapes = ((-1, 1), (1, -1), (1, -1))
    return [[np.ascontiguousarray(table[n, a, r_max - r : r_max + r + 1]).reshape(shapes[a])
             for a, r in enumerate(radius[n].tolist())] for n in range(len(sigmas))]


def _warp_matrices(params: dict, shape: Sequence[int]) -> np.ndarray:
    """(N, 3, 4) float32 ``fn.warp_affine`` matrices (destination -> source) of the views' affine maps.

    ``native.affine_maps`` gives s = A i + t in voxel indices (x, y, z); warp_affine works in pixel-corner
    coordinates (a voxel centre is i + 0.5) with its axes innermost first (W, H, D = z, y, x), so the
    matrix is A with both axes reversed and the offset t + (1 - A 1) / 2, reversed."""
    maps = native.affine_maps(params["scales"], params["degrees"], tuple(shape))
    a, t = maps[:, :, :3], maps[:, :, 3]
    t = t + 0.5 * (1.0 - a.sum(dim=2))
    return torch.cat([a.flip(1, 2), t.flip(1)[:, :, None]], dim=2).float().numpy()


def _inside_masks(params: dict, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """(N, *shape) bool: the voxels ``augment.affine`` interpolates (source index in [-0.5, n - 0.5) on every
    axis), decided as ``batched.affine_batch`` decides them: the same float32 grid (theta times linspace
    bases, summed z + y + x) compared with the exact thresholds of ``batched.inside_bounds``."""
    n = len(params["scales"])
    theta = affine_theta(params["scales"], params["degrees"], shape).to(device, torch.float32)
    bases = [torch.linspace(-1, 1, s, dtype=torch.float32, device=device) for s in shape]  # x, y, z
    grid = torch.empty((n, *shape), dtype=torch.float32, device=device)
    inside = torch.ones((n, *shape), dtype=torch.bool, device=device)
    ok = torch.empty_like(inside)
    for c in range(3):  # grid component c is axis z, y, x
        tz = theta[:, c, 0, None] * bases[2]
        ty = theta[:, c, 1, None] * bases[1]
        tx = theta[:, c, 2, None] * bases[0]
        torch.add(tz[:, None, None, :] + ty[:, None, :, None], tx[:, :, None, None], out=grid)
        lo, hi = inside_bounds(int(shape[2 - c]), torch.float32)
        inside.logical_and_(torch.ge(grid, lo, out=ok))
        inside.logical_and_(torch.lt(grid, hi, out=ok))
    return inside


# ------------------------------------------------------------------------------------------- pipelines


class _ViewPipeline:
    """One DALI pipeline for views of one kind (output size, augmentation, outputs), reused batch after batch.

    Inputs (``feed``): ``crop`` raw (sx, sy, sz, 1) crops in ``raw_dtype``; with ``windowed``, ``window`` (4,)
    float32 = lo, hi - lo, clip low, clip high; with ``augment`` also ``flip`` (3,) int32, ``matrix`` (3, 4)
    float32, ``kx``, ``ky``, ``kz`` float32 kernels, ``noise_gamma`` (2,) float32 = noise std, gamma, and the
    per-voxel ``inside`` (bool) and ``field`` (float32) of shape (*out_size, 1), CUDA tensors on the GPU.
    Outputs: the spatially transformed view (``keep_spatial``; the resized crop without augmentation) and the
    final view: normalised with ``normalize``, else after gamma.
    """

    def __init__(self, out_size, raw_dtype: np.dtype, windowed: bool, augment: bool, normalize: bool,
                 keep_spatial: bool, max_batch: int, num_threads: int, device_id: int | None):
        d = _dali()
        fn, dmath, types = d["fn"], d["math"], d["types"]
        self.out_size = tuple(int(s) for s in out_size)
        self.max_batch = int(max_batch)
        self.gpu = device_id is not None
        self.n_outputs = int(keep_spatial) + 1
        self._feed_ndarray = d["feed_ndarray"]
        device = "gpu" if self.gpu else "cpu"
        to_dev = (lambda node: node.gpu()) if self.gpu else (lambda node: node)  # noqa: E731
        raw_dtype = np.dtype(raw_dtype)
        raw_type = {np.dtype(np.uint8): types.UINT8, np.dtype(np.int16): types.INT16,
                    np.dtype(np.uint16): types.UINT16, np.dtype(np.float16): types.FLOAT16,
                    np.dtype(np.float32): types.FLOAT}[raw_dtype]
        self.pipe = d["Pipeline"](batch_size=self.max_batch, num_threads=num_threads, device_id=device_id,
                                  prefetch_queue_depth=1, exec_dynamic=True)
        with self.pipe:
            # The raw crop crosses to the GPU in its storage dtype (half the bytes of float32 for int16).
            x = to_dev(fn.external_source(name="crop", layout="DHWC", dtype=raw_type))
            # Integer crops become float32 in the window arithmetic; float16 needs a cast (DALI arithmetic takes
            # no float16 operands), and so does any non-float32 crop when there is no window.
            if raw_dtype == np.float16 or (not windowed and raw_dtype != np.float32):
                x = fn.cast(x, dtype=types.FLOAT)
            if windowed:
                window = to_dev(fn.external_source(name="window", dtype=types.FLOAT))
                x = dmath.clamp((x - window[0]) / window[1], window[2], window[3])
            x = fn.resize(x, size=list(self.out_size), antialias=False, interp_type=types.INTERP_LINEAR)
            spatial, x = self._augment(x, d, to_dev, device) if augment else (x, x)
            outputs = [fn.normalize(x, ddof=1) if normalize else x]
            self.pipe.set_outputs(*([spatial] if keep_spatial else []), *outputs)
        self.pipe.build()

    def _augment(self, x, d: dict, to_dev, device: str):
        """The augmentation graph on the resized crop ``x``: (spatial view, augmented view before normalisation)."""
        fn, dmath, types = d["fn"], d["math"], d["types"]
        x_n, y_n, z_n = self.out_size
        flip = fn.external_source(name="flip", dtype=types.INT32)
        matrix = fn.external_source(name="matrix", dtype=types.FLOAT)
        kernels = [to_dev(fn.external_source(name=k, dtype=types.FLOAT)) for k in ("kx", "ky", "kz")]
        noise_gamma = to_dev(fn.external_source(name="noise_gamma", dtype=types.FLOAT))
        # Computed by torch on the output device and read there (see _inside_masks).
        inside = fn.external_source(name="inside", layout="DHWC", dtype=types.BOOL, device=device)
        field = fn.external_source(name="field", layout="DHWC", dtype=types.FLOAT, device=device)
        # Flip (layout D, H, W = x, y, z), then the affine resampling with edge clamping; outside the
        # band the view's minimum (inside is 0/1: each voxel takes exactly one of the two terms).
        x = fn.flip(x, depthwise=flip[0], vertical=flip[1], horizontal=flip[2])
        sampled = fn.warp_affine(x, matrix=matrix, interp_type=types.INTERP_LINEAR)
        x = sampled * inside + fn.reductions.min(x) * (1 - inside)
        spatial = x
        # Separable blur: each pass makes its axis an image axis (reshapes are free).
        y = fn.reshape(x, shape=[x_n, y_n * z_n], layout="HW")
        y = fn.filter(y, kernels[0], border="reflect_1001")
        y = fn.reshape(y, shape=[x_n, y_n, z_n], layout="HWC")
        y = fn.filter(y, kernels[1], border="reflect_1001")
        y = fn.reshape(y, shape=[x_n * y_n, z_n], layout="HW")
        y = fn.filter(y, kernels[2], border="reflect_1001")
        y = fn.reshape(y, shape=[x_n, y_n, z_n, 1], layout="DHWC")
        y = y + field * noise_gamma[0]
        # sign(y) |y|^g: at y = 0 the power is 0, so the sign factor's -1 there gives -0 (equal to 0).
        x = dmath.pow(dmath.abs(y), noise_gamma[1]) * ((y > 0) * 2.0 - 1.0)
        return spatial, x

    def run(self, feeds: dict, device: torch.device) -> list[torch.Tensor]:
        """Feed one batch (every input: a list of per-view arrays or one stacked array) and return the outputs
        as (N, 1, *out_size) float32 tensors on ``device``."""
        n = len(feeds["crop"])
        for name, value in feeds.items():
            if isinstance(value, torch.Tensor):  # a CUDA tensor: DALI copies it on torch's current stream
                self.pipe.feed_input(name, value, cuda_stream=torch.cuda.current_stream(value.device).cuda_stream)
            else:
                self.pipe.feed_input(name, value)
        outputs = self.pipe.run()
        stream = torch.cuda.current_stream(device) if self.gpu else None
        tensors = []
        for out in outputs[: self.n_outputs]:
            t = torch.empty((n, *self.out_size, 1), dtype=torch.float32, device=device)
            self._feed_ndarray(out.as_tensor(), t, cuda_stream=stream)
            tensors.append(t.view(n, 1, *self.out_size))  # (N, X, Y, Z, 1) -> (N, 1, X, Y, Z), same memory
        return tensors


# ----------------------------------------------------------------------------------------------- loader


class DaliLoader:
    """Batches of ``dataset``'s items built by DALI pipelines: the dict of :meth:`BatchLoader.batch` (float32
    ``x1``, ``x2``, ``gt`` (B, 1, *global out), ``locals`` (B, n_local, 1, *local out), int64 ``global_boxes``,
    ``local_boxes``, ``volume_index``) for the same seed and epoch, on ``device``.

    ``device``: ``"cpu"`` (pipelines with ``device_id=None``) or ``"cuda"`` / ``"cuda:N"`` (GPU ops, device_id
    N). ``num_threads``: DALI worker threads (default ``torch.get_num_threads()``). ``batch_size``: the
    largest batch the pipelines are built for; a larger batch rebuilds them once for its size. Call
    ``dataset.set_epoch`` first, as for the other loaders.
    """

    def __init__(self, dataset: PretrainDataset, device: str | torch.device = "cpu", num_threads: int | None = None,
                 batch_size: int = 8):
        _dali()
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"DaliLoader device {self.device}: CUDA is not available")
            self.device = torch.device("cuda", torch.cuda.current_device() if self.device.index is None
                                       else self.device.index)
            self.device_id = self.device.index
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"DaliLoader runs on 'cpu' or 'cuda', got device {self.device}")
        self.num_threads = torch.get_num_threads() if num_threads is None else int(num_threads)
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        dtypes = {np.dtype(v.array.dtype) for v in dataset.volumes}
        self.raw_dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= set(_RAW_DTYPES) else np.dtype(np.float32)
        self.windows = []
        for v in dataset.volumes:
            lo, hi = (float(w) for w in v.window)
            # The dataset leaves a (0, 1) window unclipped (cut_and_resize); infinite clip bounds do the same.
            clip = (-math.inf, math.inf) if (lo, hi) == (0.0, 1.0) else (0.0, 1.0)
            self.windows.append(np.array([lo, hi - lo, *clip], dtype=np.float32))
        # Without a real window anywhere the window step is the identity and is left out of the pipelines.
        self.windowed = any((float(lo), float(hi)) != (0.0, 1.0) for lo, hi in (v.window for v in dataset.volumes))
        self.capacity = int(batch_size)
        self._pipelines: dict = {}

    # ------------------------------------------------------------------------------------- pipelines
    def _pipeline(self, kind: str, n_views: int, per_sample: int) -> _ViewPipeline:
        """The pipeline of ``kind`` (global / local), built for ``capacity`` samples or rebuilt for more."""
        if n_views > self.capacity * per_sample:
            self.capacity = -(-n_views // per_sample)
            self._pipelines.clear()
        if kind not in self._pipelines:
            crop, augment = self.dataset.crop, self.dataset.augment
            is_global = kind == "global"
            self._pipelines[kind] = _ViewPipeline(
                crop.global_out if is_global else crop.local_out, self.raw_dtype, self.windowed, augment,
                normalize=not (is_global and augment), keep_spatial=is_global,
                max_batch=self.capacity * per_sample, num_threads=self.num_threads, device_id=self.device_id,
            )
        return self._pipelines[kind]

    def _cut(self, volume_index: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
        """Raw (sx, sy, sz, 1) crops, read from the (memory-mapped) arrays."""
        crops = []
        for v, (x0, y0, z0, sx, sy, sz) in zip(volume_index.tolist(), boxes.tolist(), strict=True):
            array = self.dataset.volumes[v].array
            crop = np.ascontiguousarray(np.asarray(array[x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz]),
                                        dtype=self.raw_dtype)
            if crop.shape != (sx, sy, sz):
                raise ValueError(f"box {(x0, y0, z0, sx, sy, sz)} does not lie inside volume {v} of shape "
                                 f"{tuple(array.shape)}")
            crops.append(crop[..., None])
        return crops

    def _views(self, kind: str, volume_index: np.ndarray, boxes: np.ndarray, params: dict | None,
               per_sample: int) -> list[torch.Tensor]:
        pipe = self._pipeline(kind, len(boxes), per_sample)
        feeds = {"crop": self._cut(volume_index, boxes)}
        if self.windowed:
            feeds["window"] = np.stack([self.windows[v] for v in volume_index])
        if params is not None:
            feeds["flip"] = params["flip"].numpy().astype(np.int32)
            feeds["matrix"] = _warp_matrices(params, pipe.out_size)
            kernels = _blur_kernels(params["sigmas"])
            for axis, name in enumerate(("kx", "ky", "kz")):
                feeds[name] = [k[axis] for k in kernels]
            # Per-voxel inputs computed by torch where the pipeline reads them: the inside band and the noise
            # field of each view's seed.
            for name, value in (("inside", _inside_masks(params, pipe.out_size, self.device)),
                                ("field", normal_field(params["noise_seed"], pipe.out_size, self.device))):
                value = value.view(*value.shape, 1)
                feeds[name] = value if pipe.gpu else value.numpy()
            feeds["noise_gamma"] = torch.stack([params["noise_std"], params["gamma"]], dim=1).float().numpy()
        return pipe.run(feeds, self.device)

    # ------------------------------------------------------------------------------------- batches
    def batch(self, indices: Sequence[int]) -> dict:
        """The batch of items ``indices`` (the dataset's current epoch)."""
        ds, crop = self.dataset, self.dataset.crop
        volume_index, g_boxes, l_boxes, g_params, l_params = draw_batch(ds, indices)
        b, n_global, n_local = len(indices), g_boxes.shape[1], l_boxes.shape[1]
        gp = cat_params(g_params) if ds.augment else None
        spatial, x = self._views("global", np.repeat(volume_index, n_global), g_boxes.reshape(-1, 6), gp, n_global)
        gt = spatial[0::n_global]
        if ds.augment:
            # The patch swap has no DALI op; the z-normalisation must follow it.
            x = z_normalize_batch(swap_batch(x, gp["swap"], gp["swap_patch"]))
        if n_local:
            lp = cat_params(l_params) if ds.augment else None
            (loc,) = self._views("local", np.repeat(volume_index, n_local), l_boxes.reshape(-1, 6), lp, n_local)
        else:
            loc = torch.empty((0, 1, *crop.local_out), dtype=torch.float32, device=self.device)
        x = x.view(b, n_global, *x.shape[1:])
        return batch_dict(x[:, 0].contiguous(), x[:, 1].contiguous(), gt.contiguous(), loc, volume_index, g_boxes,
                          l_boxes)

    def batches(self, batch_indices: Iterable[Sequence[int]]) -> Iterator[dict]:
        """One batch per list of item indices, lazily: a PyTorch-style iterator over batch dicts."""
        for indices in batch_indices:
            yield self.batch(indices)
