"""Batched sub-crop extraction and augmentation for the ``torch`` loader (CPU and CUDA alike).

Every op here takes a whole batch ``x`` of shape (N, C, X, Y, Z) and per-sample parameter tensors, and gives
element-wise the result of the per-view op of :mod:`pcrlv2_fast.data.augment` with the same parameters
(float32 rounding aside), in a fixed number of launches independent of N. The loader draws the parameters per
sample as the dataset does (``augment.draw_sample_params``); :func:`stack_view_params` stacks augment.py's
per-view samplers into the same layout, for the tests and benchmarks that compare the batched ops with the
per-view ones.

Implementation choices, and how close each op comes to the per-view one (measured maxima in the tests):

- :class:`VolumeBank` keeps the volumes in their storage dtype (int16 HU for CT caches, float16/float32
  otherwise) in one flat tensor on the device; an intensity window (clip to [lo, hi], scale to [0, 1], the
  formula of ``io._scale``) is applied to the cut voxels before resizing, so a crop equals ``cut_and_resize``
  on the windowed float32 volume bit for bit, at half the device memory for int16.
- Crops are cut as rows along z (one ``index_select`` on an overlapping-window view of the bank) and resized
  with ``F.interpolate`` (trilinear, align_corners=False) once per distinct crop size: bit-exact. The
  official geometry has four sizes per view kind, so a batch takes at most four gathers and four resizes.
  An 8-corner gather per output voxel with per-axis weight tables, in plain torch, is slower on CPU
  (benchmarks/README.md): its index tensors and random reads cost more than the interpolation (a fused GPU
  kernel would not materialise them).
- ``affine_batch`` builds the sampling grid from the per-sample matrices by broadcasting (affine_grid's
  batched matmul with K = 4 is slower on CPU) and folds the flip into the matrix, so flip +
  affine is one ``grid_sample``. Grid values differ from affine_grid's by an ulp, which the unnormalisation
  multiplies by (n - 1) / 2: up to ~5e-6 on [0, 1] views of 64 voxels. The inside test is augment.affine's
  float rule, turned into exact thresholds on the grid (``inside_bounds``).
- ``blur_batch`` applies each axis' Gaussian as a per-sample (L, L) matrix with scipy's reflected border
  folded in (batched matmuls), so different sigmas and radii need no padding to a common kernel (~2e-7).
- ``noise_batch`` draws one field for the batch; ``gamma_batch`` equals ``augment.gamma`` (~6e-8).
- ``swap_batch`` applies the sequential patch swaps of all samples at once, one gather and one scatter per
  iteration for the whole batch (overlapping pairs resolved as augment.swap does): bit-exact.
- ``z_normalize_batch`` takes per-sample statistics in float64 and normalises in float64, like the per-view
  op (bit-exact in the tests).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augment import (
    AugmentConfig,
    gaussian_taps,
    normal_field,
    sample_affine,
    sample_blur,
    sample_flip,
    sample_gamma,
    sample_noise,
    sample_swap,
)

__all__ = [
    "VolumeBank",
    "affine_batch",
    "blur_batch",
    "blur_dtype",
    "noise_batch",
    "gamma_batch",
    "swap_batch",
    "z_normalize_batch",
    "stack_view_params",
    "spatial_batch",
    "intensity_batch",
    "augment_batch",
]

# Voxels cut per gather in VolumeBank.crop_resize (64 MiB of float32): bounds the temporary crop stack.
_CUT_CHUNK = 1 << 24


# ------------------------------------------------------------------------------------------ volume bank


class VolumeBank:
    """All volumes of a run in one flat tensor on ``device``, cut and resized in batches.

    ``arrays``: 3D arrays (numpy, memory maps included, or tensors) with axes (x, y, z). They are stored in
    their common dtype (float32 when they differ). ``windows``: ``None`` to use the stored values as they
    are, one ``(lo, hi)`` pair for all volumes, or one pair per volume; a window clips to [lo, hi] and
    scales to [0, 1] at extraction time (so int16 HU volumes need no float32 copy on the device).
    """

    @staticmethod
    def storage_dtype(arrays: Sequence) -> torch.dtype:
        """The dtype the bank stores ``arrays`` in: their common dtype, float32 when they differ."""
        dtypes = {a.dtype if isinstance(a, torch.Tensor) else torch.from_numpy(np.empty(0, a.dtype)).dtype
                  for a in arrays}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def __init__(self, arrays: Sequence, windows=None, device: str | torch.device = "cpu"):
        if len(arrays) == 0:
            raise ValueError("VolumeBank needs at least one volume")
        shapes = [tuple(int(n) for n in a.shape) for a in arrays]
        for i, shape in enumerate(shapes):
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"volume {i}: expected a non-empty 3D array, got shape {shape}")
        self.dtype = self.storage_dtype(arrays)
        if windows is None and not self.dtype.is_floating_point:
            raise ValueError(f"volumes of dtype {self.dtype} need an intensity window to map them to [0, 1]")
        self.device = torch.device(device)
        self.shapes = torch.tensor(shapes, dtype=torch.int64)  # (V, 3), host
        sizes = self.shapes.prod(dim=1)
        self.offsets = torch.cumsum(sizes, 0) - sizes  # (V,) start of each volume in the flat bank, host
        self.data = torch.empty(int(sizes.sum()), dtype=self.dtype, device=self.device)
        for a, start, n in zip(arrays, self.offsets.tolist(), sizes.tolist(), strict=True):
            # One volume at a time, so at most one volume is ever copied on the host (read-only memory maps
            # cannot be wrapped by torch.from_numpy without a copy).
            if not isinstance(a, torch.Tensor):
                a = np.asarray(a)
                a = torch.from_numpy(a if a.flags.c_contiguous and a.flags.writeable else np.array(a, order="C"))
            self.data[start : start + n].copy_(a.reshape(-1))
        self.windows = None
        if windows is not None:
            w = torch.as_tensor(windows, dtype=torch.float32)
            w = w.expand(len(arrays), 2) if w.shape == (2,) else w
            if w.shape != (len(arrays), 2) or not bool((w[:, 1] > w[:, 0]).all()):
                raise ValueError(f"windows must be one (lo, hi) pair with lo < hi or one per volume, got {windows}")
            self.windows = w  # (V, 2) float32, host

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def _check(self, volume_index: torch.Tensor, boxes: torch.Tensor) -> None:
        if volume_index.ndim != 1 or boxes.shape != (len(volume_index), 6):
            raise ValueError(
                f"expected volume_index (N,) and boxes (N, 6), got {tuple(volume_index.shape)} and {tuple(boxes.shape)}"
            )
        if len(volume_index) and not bool(((volume_index >= 0) & (volume_index < len(self))).all()):
            raise IndexError(f"volume index out of range for a bank of {len(self)} volumes: {volume_index.tolist()}")
        shapes = self.shapes[volume_index]
        bad = (boxes[:, :3] < 0) | (boxes[:, 3:] < 1) | (boxes[:, :3] + boxes[:, 3:] > shapes)
        if bad.any():
            i = int(bad.any(dim=1).nonzero()[0])
            raise ValueError(
                f"box {boxes[i].tolist()} does not lie inside volume {int(volume_index[i])} of shape "
                f"{tuple(shapes[i].tolist())}"
            )

    def _cut(self, volume_index: torch.Tensor, starts: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Crops (G, sx, sy, sz) of one size as float32 (windowed), from host index tensors."""
        sx, sy, sz = size
        shapes = self.shapes[volume_index]
        stride_x = shapes[:, 1] * shapes[:, 2]
        first = self.offsets[volume_index] + starts[:, 0] * stride_x + starts[:, 1] * shapes[:, 2] + starts[:, 2]
        # Row start of every (x, y) of every crop, built on the device from per-crop scalars (small transfers).
        dev = self.device
        first, stride_x, stride_y = (t.to(dev, non_blocking=True) for t in (first, stride_x, shapes[:, 2]))
        ax = torch.arange(sx, device=dev)[None, :, None] * stride_x[:, None, None]
        ay = torch.arange(sy, device=dev)[None, None, :] * stride_y[:, None, None]
        rows = first[:, None, None] + ax + ay  # (G, sx, sy)
        # unfold: an overlapping-window view (numel - sz + 1, sz) of the bank; each gathered row is a z-run.
        crops = self.data.unfold(0, sz, 1).index_select(0, rows.reshape(-1)).view(-1, sx, sy, sz)
        if self.windows is None:
            return crops.float()
        w = self.windows[volume_index].to(dev, non_blocking=True).view(-1, 2, 1, 1, 1)
        lo, hi = w[:, 0], w[:, 1]
        return (torch.minimum(torch.maximum(crops.float(), lo), hi) - lo) / (hi - lo)

    def crop_resize(self, volume_index, boxes, out_size) -> torch.Tensor:
        """Cut ``boxes`` (N, 6) ``(x0, y0, z0, sx, sy, sz)`` from volumes ``volume_index`` (N,) and resize each
        trilinearly (align_corners=False) to ``out_size``: (N, 1, *out_size) float32 on the bank's device,
        equal to :func:`~pcrlv2_fast.data.dataset.cut_and_resize` per box.

        The index tensors are read on the host (pass CPU tensors or arrays to avoid a device sync).
        """
        volume_index = torch.as_tensor(volume_index).to("cpu", torch.int64)
        boxes = torch.as_tensor(boxes).to("cpu", torch.int64)
        self._check(volume_index, boxes)
        out_size = tuple(int(s) for s in out_size)
        out = torch.empty((len(boxes), 1, *out_size), dtype=torch.float32, device=self.device)
        if len(boxes) == 0:
            return out
        sizes, group = torch.unique(boxes[:, 3:], dim=0, return_inverse=True)
        for g, size in enumerate(sizes.tolist()):
            members = (group == g).nonzero()[:, 0]
            for chunk in members.split(max(1, _CUT_CHUNK // math.prod(size))):
                crops = self._cut(volume_index[chunk], boxes[chunk, :3], tuple(size))
                resized = F.interpolate(crops[:, None], size=out_size, mode="trilinear", align_corners=False)
                out.index_copy_(0, chunk.to(self.device), resized)
        return out


# ---------------------------------------------------------------------------------------------- ops


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) parameters as (N, 1, 1, 1, 1) in x's dtype and device, for broadcasting over a batch."""
    return t.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _rotations(degrees: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) float64 ``Rz @ Rx @ Ry`` of ``augment._rotation`` for (N, 3) angles in degrees."""
    a = torch.deg2rad(degrees.double())
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a[:, 0]), torch.zeros_like(a[:, 0])

    def mat(*rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = mat((one, zero, zero), (zero, c[:, 0], -s[:, 0]), (zero, s[:, 0], c[:, 0]))
    ry = mat((c[:, 1], zero, s[:, 1]), (zero, one, zero), (-s[:, 1], zero, c[:, 1]))
    rz = mat((c[:, 2], -s[:, 2], zero), (s[:, 2], c[:, 2], zero), (zero, zero, one))
    return rz @ rx @ ry


def affine_theta(scales: torch.Tensor, degrees: torch.Tensor, shape) -> torch.Tensor:
    """(N, 3, 3) float64 map from output to source in grid_sample's normalised coordinates, rows and columns
    in grid order (z, y, x), as built per view by ``augment.affine``."""
    half = (torch.as_tensor(shape, dtype=torch.float64, device=scales.device) - 1) / 2
    inverse = _rotations(degrees).transpose(1, 2) / scales.double()[:, None, :]  # R^T @ diag(1 / s)
    return (inverse * half[None, None, :] / half[None, :, None]).flip(1, 2)


def affine_batch(x: torch.Tensor, scales: torch.Tensor, degrees: torch.Tensor, flips: torch.Tensor | None = None):
    """``augment.affine`` per sample with (N, 3) ``scales`` and ``degrees``; with ``flips`` (N, 3) bool, the
    sample is first flipped along those axes (``augment.flip``), folded into the same resampling.

    A flip of axis a maps the source index s to n - 1 - s, i.e. negates that component of the normalised
    grid, so flipped samples use the grid with that row of the matrix negated: one grid, one grid_sample.
    """
    n, _, *shape = x.shape
    theta64 = affine_theta(scales, degrees, shape)
    flipped = torch.zeros(n, 3, dtype=torch.bool) if flips is None else flips.to("cpu", torch.bool)
    flipped = flipped.flip(1)  # per grid component (z, y, x)
    sign = torch.where(flipped, -1.0, 1.0).to(theta64.device, torch.float64)
    theta = (theta64 * sign[:, :, None]).to(x.device, x.dtype)
    # The grid, component c = sum_k theta[c, k] * base_k with base (z, y, x) = linspace(-1, 1) per axis, as
    # affine_grid with align_corners=True (whose batched matmul with K = 4 is slower on CPU).
    bases = [torch.linspace(-1, 1, s, dtype=x.dtype, device=x.device) for s in shape]  # x, y, z
    grid = torch.empty(n, *shape, 3, dtype=x.dtype, device=x.device)
    inside = None
    for c in range(3):
        tz = theta[:, c, 0, None] * bases[2]  # (N, Z)
        ty = theta[:, c, 1, None] * bases[1]  # (N, Y)
        tx = theta[:, c, 2, None] * bases[0]  # (N, X)
        # Written straight into the interleaved grid (a strided copy afterwards costs more than the sum).
        component = grid[..., c]  # (N, X, Y, Z) view
        torch.add(tz[:, None, None, :] + ty[:, None, :, None], tx[:, :, None, None], out=component)
        # The inside test of the (flipped) view on g = sign * component, as per-sample bounds on the component.
        lower, upper = _component_bounds(shape[2 - c], x.dtype, flipped[:, c])
        ok = component >= lower.to(x.device, non_blocking=True).view(n, 1, 1, 1)
        ok.logical_and_(component < upper.to(x.device, non_blocking=True).view(n, 1, 1, 1))
        inside = ok if inside is None else inside.logical_and_(ok)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    fill = x.amin(dim=(2, 3, 4), keepdim=True)
    return torch.where(inside[:, None], sampled, fill)


def _component_bounds(n: int, dtype: torch.dtype, flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (lower, upper) (N,) in ``dtype`` with ``lower <= v < upper`` exactly when g = +-v (minus where
    ``flipped``) passes the inside test of :func:`inside_bounds`: lo <= -v < hi is -hi < v <= -lo, i.e.
    v >= next(-hi) and v < next(-lo), next = the following representable number."""
    lo, hi = (torch.tensor(b, dtype=dtype) for b in inside_bounds(n, dtype))
    inf = torch.tensor(math.inf, dtype=dtype)
    lower = torch.where(flipped, torch.nextafter(-hi, inf), lo)
    upper = torch.where(flipped, torch.nextafter(-lo, inf), hi)
    return lower, upper


@functools.cache
def inside_bounds(n: int, dtype: torch.dtype) -> tuple[float, float]:
    """Bounds (lo, hi) with ``lo <= g < hi`` exactly when ``augment.affine``'s inside test on a normalised grid
    coordinate g holds: ``(g + 1) * half >= -0.5`` and ``< n - 0.5`` in ``dtype`` (half = (n - 1) / 2).

    That rounded expression is monotonic in g, so each condition is a threshold on g; the thresholds are
    found next to their exact values by stepping through the representable numbers. Comparing g with them
    costs two comparisons per voxel instead of the 3-component source index, bit for bit the same decision.
    """
    half = torch.tensor((n - 1) / 2, dtype=dtype)
    if half == 0:
        return -math.inf, math.inf

    def first_at_least(target: float) -> float:
        """Smallest g of ``dtype`` with (g + 1) * half >= target."""
        target = torch.tensor(target, dtype=dtype)
        down, up = torch.tensor(-math.inf, dtype=dtype), torch.tensor(math.inf, dtype=dtype)
        g = torch.tensor(float(target) / float(half) - 1, dtype=dtype)
        while (g + 1) * half >= target:
            g = torch.nextafter(g, down)
        while (g + 1) * half < target:
            g = torch.nextafter(g, up)
        return float(g)

    return first_at_least(-0.5), first_at_least(float(torch.tensor(n, dtype=dtype) - 0.5))


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Fold indices into [0, n) by scipy's 'reflect' extension (d c b a | a b c d | d c b a), any distance."""
    index = index % (2 * n)
    return torch.where(index < n, index, 2 * n - 1 - index)


def _blur_matrices(sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """(N, n, n) float64 matrices M with ``M @ v`` = the 1D Gaussian filter of ``augment.blur`` on v (per sample
    sigma (N,)): kernel truncated at int(4 sigma + 0.5), normalised, border reflected into the matrix."""
    _, kernel = gaussian_taps(sigmas.double())  # (N, K)
    r_max = (kernel.shape[-1] - 1) // 2
    taps = torch.arange(-r_max, r_max + 1, dtype=torch.float64, device=sigmas.device)
    source = _reflect(torch.arange(n, device=sigmas.device)[:, None] + taps.long(), n)  # (n, K)
    matrices = torch.zeros(len(sigmas), n, n, dtype=torch.float64, device=sigmas.device)
    return matrices.scatter_add_(2, source.expand(len(sigmas), n, -1), kernel[:, None, :].expand(-1, n, -1))


def blur_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype blur_batch multiplies in: float64 for float32 views on CUDA, where an fp32 matmul may run in TF32
    (10-bit mantissa: the trainer allows TF32 for bf16/tf32 runs, and the flag is process-wide, so it cannot be
    switched off for the loader's thread alone); the views' own dtype elsewhere. The blur matmuls are small."""
    return torch.float64 if x.is_cuda and x.dtype == torch.float32 else x.dtype


def blur_batch(x: torch.Tensor, sigmas: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``augment.blur`` per sample with per-axis sigmas (N, 3) in voxels: x, then y, then z, multiplied in
    ``dtype`` (default :func:`blur_dtype`) and returned in x's dtype."""
    n, c, sx, sy, sz = x.shape
    dtype = dtype or blur_dtype(x)
    mx, my, mz = (_blur_matrices(sigmas[:, a], s).to(x.device, dtype) for a, s in enumerate((sx, sy, sz)))
    out = torch.matmul(mx[:, None], x.to(dtype).reshape(n, c, sx, sy * sz)).view(n, c, sx, sy, sz)
    out = torch.matmul(my[:, None, None], out)
    out = torch.matmul(out.view(n, c, sx * sy, sz), mz.transpose(1, 2)[:, None]).view(n, c, sx, sy, sz)
    return out.to(x.dtype)


def noise_batch(
    x: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None, field: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + N(0, std[n]^2)`` per sample. The standard normal field is, in order of precedence: the fields of
    ``seeds`` (N,) (``augment.normal_field``, the per-view pipelines' noise), ``field`` (x's shape), or one
    ``torch.randn`` draw from ``generator`` (on x's device)."""
    if seeds is not None:
        field = normal_field(seeds, x.shape[1:], x.device).to(x.dtype)
    elif field is None:
        field = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        field = field.to(x.device, x.dtype, copy=True)
    return field.mul_(_per_sample(std, x)).add_(x)


def gamma_batch(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sign(x) * |x| ** g[n]`` per sample (``augment.gamma``)."""
    # copysign(|x|^g, x) is sign(x) |x|^g exactly (a zero keeps its sign bit, equal to 0 all the same).
    return x.abs().pow_(_per_sample(g, x)).copysign_(x)


def swap_batch(x: torch.Tensor, pairs: torch.Tensor, patch) -> torch.Tensor:
    """``augment.swap`` per sample: ``pairs`` (N, iterations, 2, 3) patch starts (a, b), swapped in order.

    All samples move their patches at once, one gather and one scatter per iteration (the voxels are copied,
    so the result is bit-exact). Per iteration augment.swap writes patch b from the old patch a, then patch
    a from the old patch b, so where the patches overlap a's write wins: those voxels of b are given a's
    value too, which makes the duplicate targets of the single scatter write equal values.
    """
    n, c, sx, sy, sz = x.shape
    dev = x.device
    px, py, pz = (int(p) for p in patch)
    ax, ay, az = (torch.arange(p, device=dev) for p in (px, py, pz))
    in_patch = (ax[:, None, None] * (sy * sz) + ay[None, :, None] * sz + az).view(-1)  # (P,) flat offsets

    def linear(index):  # (..., 3) voxel index -> flat index (integer matmul has no fast path on CPU)
        return index[..., 0] * (sy * sz) + index[..., 1] * sz + index[..., 2]

    pairs = pairs.to(dev)
    first, second = pairs[:, :, 0], pairs[:, :, 1]  # (N, T, 3)
    # Per iteration: targets (patch a, then patch b) and the voxels they are copied from, (N, T, 2, P).
    targets = torch.empty(*pairs.shape[:2], 2, len(in_patch), dtype=torch.int64, device=dev)
    sources = torch.empty_like(targets)
    lin_a, lin_b = targets[:, :, 0], targets[:, :, 1]
    torch.add(linear(first)[..., None], in_patch, out=lin_a)
    torch.add(linear(second)[..., None], in_patch, out=lin_b)
    sources[:, :, 0] = lin_b
    # Voxel b + o lies in patch a when d = (b - a) + o is inside the patch along every axis (a separable test);
    # a then writes old[b + d] there.
    delta = second - first
    inside = [(delta[..., k, None] + r >= 0) & (delta[..., k, None] + r < len(r)) for k, r in enumerate((ax, ay, az))]
    overlap = inside[0][..., :, None, None] & inside[1][..., None, :, None] & inside[2][..., None, None, :]
    torch.where(overlap.flatten(2), lin_b + linear(delta)[..., None], lin_a, out=sources[:, :, 1])
    targets = targets.flatten(2)[:, :, None].expand(-1, -1, c, -1)  # (N, T, C, 2P)
    sources = sources.flatten(2)[:, :, None].expand(-1, -1, c, -1)
    out = x.clone(memory_format=torch.contiguous_format).view(n, c, -1)
    for t in range(pairs.shape[1]):
        out.scatter_(2, targets[:, t], out.gather(2, sources[:, t]))
    return out.view(x.shape)


def z_normalize_batch(x: torch.Tensor) -> torch.Tensor:
    """``augment.z_normalize`` per sample: (x - mean) / unbiased std over (C, X, Y, Z) in float64; a constant
    sample becomes zeros.

    One float64 copy normalised in place (two-pass variance via the 2-norm of the deviations; torch's per-row
    Welford is slower on CPU). A float32 (or narrower) sample is constant exactly when the
    norm is 0: such values summed in float64 are exact when they are all equal, so the mean is then the
    value itself, and distinct values never subtract to 0. float64 samples are compared instead.
    """
    flat = x.reshape(len(x), -1)
    wide = flat.double()
    constant = (flat.amax(dim=1) == flat.amin(dim=1))[:, None] if wide is flat else None
    wide = wide.clone() if wide is flat else wide
    wide -= wide.mean(dim=1, keepdim=True)
    norm = torch.linalg.vector_norm(wide, dim=1, keepdim=True)
    out = wide.div_(norm / math.sqrt(wide.shape[1] - 1)).to(x.dtype)
    return out.masked_fill_(norm == 0 if constant is None else constant, 0.0).view(x.shape)


# ------------------------------------------------------------------------------------------ parameters


def stack_view_params(
    generator: torch.Generator, n: int, cfg: AugmentConfig, shape, with_swap: bool
) -> dict[str, torch.Tensor]:
    """The parameters augment.py's per-view samplers draw for ``n`` views, view after view (flip, affine,
    blur, noise std, gamma, swap), stacked as the batched ops take them: ``flip`` (n, 3) bool, ``scales``,
    ``degrees``, ``sigmas`` (n, 3) float64, ``noise_std``, ``gamma`` (n,) float64 and, with ``with_swap``,
    ``swap`` (n, iterations, 2, 3) int64 patch starts plus ``swap_patch`` (the patch size tuple)."""
    views = []
    for _ in range(n):
        axes = sample_flip(generator, cfg)
        scales, degrees = sample_affine(generator, cfg)
        view = {
            "flip": torch.tensor([a in axes for a in range(3)]),
            "scales": scales,
            "degrees": degrees,
            "sigmas": sample_blur(generator, cfg),
            "noise_std": torch.tensor(sample_noise(generator, cfg), dtype=torch.float64),
            "gamma": torch.tensor(sample_gamma(generator, cfg), dtype=torch.float64),
        }
        if with_swap:
            view["swap"] = sample_swap(generator, shape, cfg)
        views.append(view)
    params = {key: torch.stack([v[key] for v in views]) for key in views[0]} if views else {}
    if with_swap:
        params["swap_patch"] = tuple(cfg.swap_patch)
    return params


# ------------------------------------------------------------------------------------------- pipelines


def spatial_batch(x: torch.Tensor, params: dict) -> torch.Tensor:
    """Flip then affine per sample (``augment.spatial_augment`` with given parameters), one resampling."""
    return affine_batch(x, params["scales"], params["degrees"], params["flip"])


def intensity_batch(x: torch.Tensor, params: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Blur, noise, gamma, swap (when ``params`` has ``swap``), z-normalisation: ``augment.intensity_augment``.
    The noise fields are those of ``params["noise_seed"]`` (or ``params["noise_field"]``) when present, else
    drawn from ``generator``."""
    x = blur_batch(x, params["sigmas"])
    x = noise_batch(x, params["noise_std"], generator, params.get("noise_field"), params.get("noise_seed"))
    x = gamma_batch(x, params["gamma"])
    if "swap" in params:
        x = swap_batch(x, params["swap"], params["swap_patch"])
    return z_normalize_batch(x)


def augment_batch(
    x: torch.Tensor, params: dict, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial then intensity augmentation of a batch: returns ``(spatial, augmented)``; the spatial output is
    the restoration target of global view 1."""
    spatial = spatial_batch(x, params)
    return spatial, intensity_batch(spatial, params, generator)
