"""The ``native`` CPU backend's kernels: C++/OpenMP ops of the optional extension ``pcrlv2_fast._C``.

``crop_resize`` cuts many boxes out of one (memory-mapped) volume and resizes each trilinearly into a
float32 or bfloat16 batch, reading the int16 / float16 / float32 source in place. Its semantics are
:func:`pcrlv2_fast.reference.crop_resize.reference_crop_resize`. ``affine`` resamples a float32 batch with
per-sample source-index maps (:func:`affine_maps`: ``augment.flip`` then ``augment.affine`` per view, in one
pass). ``intensity`` runs blur, noise, gamma, patch swap and z-normalisation of every view in one fused pass
per view (``augment.apply_intensity``), and ``normal_field`` expands noise seeds (``augment.normal_field``).
``views`` chains the three per view (crop, spatial, intensity) so a view's intermediates stay in the core's
cache: the native loader's path. The extension is built by ``setup.py`` when a C++ compiler and torch are
present at install time; without it :func:`available` is False, :func:`load_error` says why and every op
raises a RuntimeError with that message.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["available", "load_error", "crop_resize", "affine", "affine_maps", "intensity", "normal_field", "views"]

INPUT_DTYPES = (np.dtype(np.int16), np.dtype(np.float16), np.dtype(np.float32))
OUTPUT_DTYPES = (torch.float32, torch.bfloat16)


def _load():
    # torch is imported first, so the extension binds to torch's own libgomp (one OpenMP runtime).
    try:
        from pcrlv2_fast import _C
    except ImportError as exc:
        if exc.name in ("pcrlv2_fast", "pcrlv2_fast._C"):  # no compiled module at all
            reason = ("no compiled module next to pcrlv2_fast/__init__.py (the build was skipped or failed: a "
                      "plain `pip install` builds without torch in an isolated environment, or the compiler "
                      "failed; `pip install -v` shows why)")
        else:  # present but not loadable, e.g. built against another torch
            reason = f"{type(exc).__name__}: {exc}"
        return None, (f"C++ extension pcrlv2_fast._C was not built: {reason}; install a C++ compiler (g++) and "
                      "reinstall (pip install --no-build-isolation .), or use --loader torch")
    return _C, None


_C, _LOAD_ERROR = _load()


def available() -> bool:
    """True when the compiled extension ``pcrlv2_fast._C`` is importable."""
    return _C is not None


def load_error() -> str | None:
    """Why the extension is unavailable (None when it is available)."""
    return _LOAD_ERROR


@contextlib.contextmanager
def portable_simd():
    """Within this block the kernels skip their AVX-512 paths (where the CPU has them) and run the portable
    code, which computes the same float32 values (tests check both paths on one machine)."""
    ext = _require()
    previous = ext.set_wide_simd(False)
    try:
        yield
    finally:
        ext.set_wide_simd(previous)


def has_wide_simd() -> bool:
    """Whether this CPU runs the kernels' AVX-512 paths."""
    return bool(_require().has_wide_simd())


def _require():
    if _C is None:
        raise RuntimeError(_LOAD_ERROR)
    return _C


def _check_boxes(boxes, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(boxes)
    if arr.ndim != 2 or arr.shape[1] != 6 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"boxes must be an integer array of shape (N, 6) = x0, y0, z0, sx, sy, sz; "
                         f"got shape {arr.shape} dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    start, size = arr[:, :3], arr[:, 3:]
    bad = np.flatnonzero(((start < 0) | (size < 1) | (start + size > np.asarray(shape))).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"box {i} (x0, y0, z0, sx, sy, sz) = {tuple(arr[i].tolist())} does not lie inside the "
                         f"volume of shape {tuple(shape)} ({bad.size} of {len(arr)} boxes invalid)")
    return arr


def volume_tensor(volume: np.ndarray) -> torch.Tensor:
    """A torch view of ``volume`` without copying it (works for read-only memory maps)."""
    array = np.asarray(volume)  # an np.memmap becomes a plain ndarray view of the same pages
    if array.ndim != 3:
        raise ValueError(f"volume must be 3D (X, Y, Z), got shape {array.shape}")
    if array.dtype not in INPUT_DTYPES:
        raise ValueError(f"volume dtype must be int16, float16 or float32 (native byte order), got {array.dtype}")
    if any(s < 0 for s in array.strides):
        raise ValueError("volume has negative strides (a flipped view); pass np.ascontiguousarray(volume)")
    with warnings.catch_warnings():
        # Read-only memory maps give non-writable arrays; torch warns about that, but the kernel only reads.
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(array)


def crop_resize(
    volume: np.ndarray,
    boxes,
    out_size: Sequence[int],
    window: tuple[float, float],
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Cut ``boxes`` out of ``volume``, window and resize each trilinearly to ``out_size``.

    volume: (X, Y, Z) int16 / float16 / float32 array, C-order or any positive strides (np.memmap fine,
        read in place). boxes: (N, 6) integers x0, y0, z0, sx, sy, sz, each inside the volume.
    window: (lo, hi); a voxel v becomes clip((v - lo) / (hi - lo), 0, 1) before interpolation.
    out_dtype: torch.float32 (default) or torch.bfloat16; out: optional contiguous (N, 1, *out_size) CPU
        tensor to write into; num_threads: OpenMP threads (default torch.get_num_threads()).
    Returns (N, 1, *out_size), equal to the reference up to float rounding (max abs error < 1e-5).
    """
    ext = _require()
    vol = volume_tensor(volume)
    box_arr = _check_boxes(boxes, tuple(vol.shape))
    out_size = tuple(int(s) for s in out_size)
    if len(out_size) != 3 or min(out_size) < 1:
        raise ValueError(f"out_size must be three positive integers, got {out_size}")
    lo, hi = (float(w) for w in window)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"window must be finite (lo, hi) with hi > lo, got {window}")
    shape = (len(box_arr), 1, *out_size)
    if out is None:
        out_dtype = torch.float32 if out_dtype is None else out_dtype
        if out_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
        out = torch.empty(shape, dtype=out_dtype)
    else:
        if tuple(out.shape) != shape or out.dtype not in OUTPUT_DTYPES or out.device.type != "cpu" \
                or not out.is_contiguous() or (out_dtype is not None and out.dtype != out_dtype):
            raise ValueError(f"out must be a contiguous CPU float32/bfloat16 tensor of shape {shape}"
                             f"{'' if out_dtype is None else f' and dtype {out_dtype}'}, got {tuple(out.shape)} "
                             f"{out.dtype} on {out.device} (contiguous={out.is_contiguous()})")
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    ext.crop_resize_out(vol, torch.from_numpy(box_arr), out, lo, hi, threads)
    return out


def _check_views(x) -> None:
    """ValueError unless ``x`` is a float32 CPU batch of views (N, 1, X, Y, Z)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 1 or x.dtype != torch.float32 \
            or x.device.type != "cpu":
        raise ValueError(f"x must be a float32 CPU tensor of shape (N, 1, X, Y, Z), got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")


def affine_maps(scales, degrees, shape) -> torch.Tensor:
    """(N, 3, 4) float64 source-index maps of ``augment.affine(scales, degrees)`` (each (N, 3)) on views of
    spatial ``shape``: source = M[:, :3] @ i + M[:, 3] = c + inverse @ (i - c), with c = (n - 1) / 2 and
    ``inverse = R^T diag(1 / scales)``, R = Rz @ Rx @ Ry as ``augment.affine`` builds it (float64 numpy: the
    per-call cost of torch ops on 3x3 matrices dominates otherwise)."""
    scales = np.asarray(scales.cpu() if isinstance(scales, torch.Tensor) else scales, dtype=np.float64)
    degrees = np.asarray(degrees.cpu() if isinstance(degrees, torch.Tensor) else degrees, dtype=np.float64)
    n = len(scales)
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    rx, ry, rz = (np.zeros((n, 3, 3)) for _ in range(3))
    rx[:, 0, 0] = 1
    rx[:, 1, 1], rx[:, 1, 2], rx[:, 2, 1], rx[:, 2, 2] = c[:, 0], -s[:, 0], s[:, 0], c[:, 0]
    ry[:, 1, 1] = 1
    ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = c[:, 1], s[:, 1], -s[:, 1], c[:, 1]
    rz[:, 2, 2] = 1
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1] = c[:, 2], -s[:, 2], s[:, 2], c[:, 2]
    inverse = np.transpose(rz @ rx @ ry, (0, 2, 1)) / scales[:, None, :]
    centre = (np.asarray(tuple(shape), dtype=np.float64) - 1) / 2
    maps = np.empty((n, 3, 4))
    maps[:, :, :3] = inverse
    maps[:, :, 3] = centre - inverse @ centre
    return torch.from_numpy(maps)


def affine(x: torch.Tensor, maps: torch.Tensor, out: torch.Tensor | None = None, flips: torch.Tensor | None = None,
           num_threads: int | None = None) -> torch.Tensor:
    """``augment.affine(augment.flip(view, axes), ...)`` of every view of the float32 batch ``x`` (N, 1, X, Y, Z).

    maps: (N, 3, 4) float64 view maps (:func:`affine_maps`): output voxel i reads the flipped view at
    s = maps[n, :, :3] @ i + maps[n, :, 3], trilinear with s clamped to [0, n - 1] when s lies in
    [-0.5, n - 0.5) on every axis, otherwise the minimum of the sample's input. flips: optional (N, 3) bool,
    the axes each sample is flipped along first. out: optional contiguous float32 tensor of x's shape (not x);
    num_threads: OpenMP threads (default torch.get_num_threads()). The point is interpolated in float64; the
    inside decision is the reference's float32 one. Max abs difference to the per-view ops < 1e-5 on [0, 1]
    views (their own float32 rounding).
    """
    ext = _require()
    _check_views(x)
    n = x.shape[0]
    maps = torch.as_tensor(maps)
    if tuple(maps.shape) != (n, 3, 4):
        raise ValueError(f"maps must have shape ({n}, 3, 4), got {tuple(maps.shape)}")
    maps = maps.to("cpu", torch.float64).contiguous()
    flips = torch.zeros(n, 3, dtype=torch.bool) if flips is None else torch.as_tensor(flips)
    if tuple(flips.shape) != (n, 3):
        raise ValueError(f"flips must have shape ({n}, 3), got {tuple(flips.shape)}")
    flips = flips.to("cpu").bool().long().contiguous()
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif tuple(out.shape) != tuple(x.shape) or out.dtype != torch.float32 or out.device.type != "cpu" \
            or not out.is_contiguous() or (out.numel() and out.data_ptr() == x.data_ptr()):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {tuple(x.shape)}, distinct from x")
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    ext.affine_out(x, maps, flips, out, threads)
    return out


def _threads(num_threads: int | None) -> int:
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return threads


def normal_field(seeds, shape, num_threads: int | None = None) -> torch.Tensor:
    """``augment.normal_field(seeds, shape, impl="torch")`` computed by the C++ kernel: (len(seeds), *shape)
    float32."""
    ext = _require()
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).contiguous()
    out = torch.empty((len(seeds), *(int(s) for s in shape)), dtype=torch.float32)
    ext.normal_field_out(seeds, out, _threads(num_threads))
    return out


def _per_view(params: dict, key: str, n: int, dtype: torch.dtype, cols: int | None = None) -> torch.Tensor:
    value = torch.as_tensor(params[key]).to("cpu", dtype).contiguous()
    shape = (n,) if cols is None else (n, cols)
    if tuple(value.shape) != shape:
        raise ValueError(f"params[{key!r}] must have shape {shape}, got {tuple(value.shape)}")
    return value


def _swap_params(params: dict, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """(swap (N, T, 2, 3) int64 or an empty tensor, patch size) of ``params``, checked against view ``shape``."""
    if "swap" not in params:
        return torch.empty(0, dtype=torch.int64), [1, 1, 1]
    swap = torch.as_tensor(params["swap"]).to("cpu", torch.int64).contiguous()
    patch = [int(p) for p in params["swap_patch"]]
    if swap.dim() != 4 or swap.shape[0] != n or tuple(swap.shape[2:]) != (2, 3):
        raise ValueError(f"params['swap'] must have shape ({n}, T, 2, 3), got {tuple(swap.shape)}")
    limit = np.asarray(shape) - np.asarray(patch)
    starts = swap.numpy()
    if (limit < 0).any() or (starts.size and (starts.min() < 0 or (starts > limit).any())):
        raise ValueError(f"swap patches {tuple(patch)} at the given starts do not fit views of {shape}")
    return swap, patch


def intensity(x: torch.Tensor, params: dict, out: torch.Tensor | None = None,
              num_threads: int | None = None) -> torch.Tensor:
    """``augment.apply_intensity`` of every view of the float32 batch ``x`` (N, 1, X, Y, Z), fused per view.

    params (the layout of ``loader.draw_sample_params``): ``sigmas`` (N, 3), ``noise_std`` (N,), ``noise_seed``
    (N,) int64, ``gamma`` (N,) and optionally ``swap`` (N, T, 2, 3) patch starts with ``swap_patch``. out:
    optional contiguous float32 tensor of x's shape (may be x itself). Blur sums in float32 and log / exp /
    cos are float32 polynomials, so the result differs from the torch ops by float32 rounding (the tests
    bound it by 2e-5 after normalisation).
    """
    ext = _require()
    _check_views(x)
    n = x.shape[0]
    sigmas = _per_view(params, "sigmas", n, torch.float64, 3)
    noise_std = _per_view(params, "noise_std", n, torch.float64)
    seeds = _per_view(params, "noise_seed", n, torch.int64)
    gamma = _per_view(params, "gamma", n, torch.float64)
    swap, patch = _swap_params(params, n, tuple(x.shape[2:]))
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif tuple(out.shape) != tuple(x.shape) or out.dtype != torch.float32 or out.device.type != "cpu" \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {tuple(x.shape)}")
    ext.intensity_out(x, sigmas, noise_std, seeds, gamma, swap, patch, out, _threads(num_threads))
    return out


def views(volumes: Sequence[np.ndarray], windows, volume_index, boxes, out_size: Sequence[int], params: dict,
          spatial_out: torch.Tensor | None = None, out: torch.Tensor | None = None, order=None,
          num_threads: int | None = None) -> torch.Tensor:
    """Augmented views cut straight from the volumes: per view v, ``intensity(affine(crop_resize(...)))`` of
    ``volumes[volume_index[v]]`` (windowed with ``windows[volume_index[v]]``), ``boxes[v]`` resized to
    ``out_size``, fused per view (csrc/pipeline.cpp): a view's intermediates stay in the core's cache.

    Equal to :func:`crop_resize` -> :func:`affine` (``params["scales"]``, ``["degrees"]``, ``["flip"]``) ->
    :func:`intensity` view by view, bit for bit. volumes: int16 / float16 / float32 (X, Y, Z) arrays (memory
    maps are read in place) or CPU tensors of those dtypes; windows: (V, 2); volume_index (N,), boxes (N, 6)
    integers. spatial_out: optional contiguous float32 (K, 1, *out_size) tensor, K <= N, that receives the
    spatial (flip + affine) result of the first K views (the PCRLv2 target). order: optional permutation of
    the N views, the order they are processed in (results are unchanged): views with overlapping boxes next
    to each other share cached source voxels. Returns out (N, 1, *out_size) float32.
    """
    ext = _require()
    # CPU tensors of a supported dtype are used as they are (a caller can convert its volumes once).
    vols = [v if isinstance(v, torch.Tensor) and v.dim() == 3 and v.device.type == "cpu"
            and v.dtype in (torch.int16, torch.float16, torch.float32) else volume_tensor(v) for v in volumes]
    window_arr = np.asarray(windows, dtype=np.float64).reshape(len(vols), 2)
    if not (np.isfinite(window_arr).all() and (window_arr[:, 1] > window_arr[:, 0]).all()):
        raise ValueError(f"windows must be finite (lo, hi) pairs with hi > lo, got {window_arr.tolist()}")
    window_t = torch.from_numpy(np.ascontiguousarray(window_arr))
    index = np.ascontiguousarray(np.asarray(volume_index), dtype=np.int64).reshape(-1)
    n = len(index)
    if n and (index.min() < 0 or index.max() >= len(vols)):
        raise ValueError(f"volume_index must lie in [0, {len(vols)}), got {index.min()}..{index.max()}")
    box_arr = np.asarray(boxes, dtype=np.int64).reshape(-1, 6)
    if len(box_arr) != n:
        raise ValueError(f"boxes must have shape ({n}, 6), got {np.asarray(boxes).shape}")
    for k in np.unique(index).tolist():
        _check_boxes(box_arr[index == k], tuple(vols[k].shape))
    out_size = tuple(int(s) for s in out_size)
    if len(out_size) != 3 or min(out_size) < 1:
        raise ValueError(f"out_size must be three positive integers, got {out_size}")
    maps = affine_maps(_per_view(params, "scales", n, torch.float64, 3), _per_view(params, "degrees", n,
                       torch.float64, 3), out_size)
    flips = _per_view(params, "flip", n, torch.bool, 3).long().contiguous()
    sigmas = _per_view(params, "sigmas", n, torch.float64, 3)
    noise_std = _per_view(params, "noise_std", n, torch.float64)
    seeds = _per_view(params, "noise_seed", n, torch.int64)
    gamma = _per_view(params, "gamma", n, torch.float64)
    swap, patch = _swap_params(params, n, out_size)
    shape = (n, 1, *out_size)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device.type != "cpu" \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {shape}")
    if spatial_out is None:
        spatial_out = torch.empty(0, dtype=torch.float32)
    elif spatial_out.dim() != 5 or tuple(spatial_out.shape[1:]) != shape[1:] or spatial_out.shape[0] > n \
            or spatial_out.dtype != torch.float32 or spatial_out.device.type != "cpu" \
            or not spatial_out.is_contiguous():
        raise ValueError(f"spatial_out must be a contiguous float32 CPU tensor of shape (K <= {n}, 1, *{out_size})")
    if order is None:
        order_t = torch.empty(0, dtype=torch.int64)
    else:
        order_t = torch.as_tensor(np.asarray(order, dtype=np.int64).reshape(-1)).contiguous()
        if not np.array_equal(np.sort(order_t.numpy()), np.arange(n)):
            raise ValueError(f"order must be a permutation of 0..{n - 1}")
    ext.views_out(vols, window_t, torch.from_numpy(index), torch.from_numpy(np.ascontiguousarray(box_arr)), maps,
                  flips, sigmas, noise_std, seeds, gamma, swap, patch, spatial_out, out, order_t, _threads(num_threads))
    return out
