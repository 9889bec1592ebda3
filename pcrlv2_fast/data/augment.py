"""The official PCRLv2 augmentations (torchio defaults) as plain torch ops with explicit parameters.

Every op takes one view ``x`` of shape (C, X, Y, Z) and returns a new tensor; samplers draw the op's
parameters from a generator with torchio's default ranges (the per-view samplers from a ``torch.Generator``,
:func:`draw_sample_params` from a numpy or torch one), so the whole pipeline is a pure function of the
generator's seed. The official code fed numpy crops to torchio, which wraps them with an
identity affine: spacing 1, so physical units (mm) are voxels here.

Deviations from torchio 1.2 (the semantics were read from its source):

- ``affine`` resamples with ``grid_sample`` (float32) instead of SimpleITK (float64 interpolation); the
  geometry, the half-voxel "inside" band and the fill value are those of SimpleITK's linear resampler.
- ``swap`` reads both patches before writing. torchio copies the first patch through a view that aliases
  the destination, so when two patches of one iteration partially overlap its result depends on the copy
  order; for non-overlapping patches both agree exactly.
- ``z_normalize`` returns zeros for a constant view where torchio raises.
- ``noise`` draws its field from the generator passed in, not from a per-call seed; generally all draws
  come from the caller's generator, so the distributions match torchio but not the values for a seed.
- The pipelines (:func:`draw_sample_params`) draw one 62-bit seed per view and expand it into the standard
  normal field with :func:`normal_field`, a counter-based generator (a 32-bit integer hash of the seed and
  the voxel index, then paired Box-Muller), instead of drawing the field from a torch generator. Every backend (this
  module, the batched torch ops on any device, the C++ kernels) computes the same field from the same seed
  without drawing it serially; it is Gaussian with mean 0 and variance 1 like torchio's ``torch.randn``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AugmentConfig",
    "flip",
    "affine",
    "blur",
    "noise",
    "normal_field",
    "gamma",
    "swap",
    "z_normalize",
    "sample_flip",
    "sample_affine",
    "sample_blur",
    "sample_noise",
    "sample_noise_seed",
    "sample_gamma",
    "sample_swap",
    "draw_spatial",
    "draw_intensity",
    "draw_sample_views",
    "draw_sample_params",
    "view_params",
    "apply_spatial",
    "apply_intensity",
    "spatial_augment",
    "intensity_augment",
    "gaussian_taps",
]

# scipy.ndimage.gaussian_filter skips axes whose sigma is at most this, and truncates kernels at 4 sigma.
_SIGMA_EPS = 1e-15
_TRUNCATE = 4.0


@dataclass(frozen=True)
class AugmentConfig:
    """Parameter ranges of the official transforms (all torchio defaults except the swap patch size)."""

    flip_axes: tuple[int, ...] = (0,)  # RandomFlip(): only the first spatial axis
    flip_probability: float = 0.5
    scales: tuple[float, float] = (0.9, 1.1)  # RandomAffine(): per axis
    degrees: tuple[float, float] = (-10.0, 10.0)  # per axis
    blur_std: tuple[float, float] = (0.0, 2.0)  # RandomBlur(): per axis, voxels
    noise_std: tuple[float, float] = (0.0, 0.25)  # RandomNoise(): mean 0
    log_gamma: tuple[float, float] = (-0.3, 0.3)  # RandomGamma()
    swap_patch: tuple[int, int, int] = (8, 4, 4)  # RandomSwap(patch_size=(8, 4, 4)) in the official code
    swap_iterations: int = 100


def _uniform(generator: torch.Generator, low: float, high: float, n: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- ops


def flip(x: torch.Tensor, axes) -> torch.Tensor:
    """Reverse ``x`` along the given spatial axes (0, 1, 2 = x, y, z)."""
    axes = [int(a) for a in axes]
    return torch.flip(x, dims=[a + 1 for a in axes]) if axes else x.clone()


def _rotation(degrees) -> torch.Tensor:
    """Rotation in voxel index space equivalent to torchio's Euler3DTransform on an identity-affine image.

    SimpleITK's Euler3D matrix is Rz @ Rx @ Ry; torchio negates the x and y angles to go from RAS to LPS,
    and the identity-affine image has LPS direction diag(-1, -1, 1), which negates them back.
    """
    ax, ay, az = (math.radians(float(d)) for d in degrees)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ rx @ ry


def affine(x: torch.Tensor, scales, degrees) -> torch.Tensor:
    """torchio ``Affine(scales, degrees, translation=0)`` about the image centre, linear interpolation.

    Forward map in voxel indices: ``i_out = c + S @ R @ (i_in - c)`` with ``c = (n - 1) / 2``; a scale of 1.1
    makes objects look 1.1 times larger. As in SimpleITK, an output voxel whose source index lies within
    [-0.5, n - 0.5) along every axis is interpolated with edge clamping, any other gets the channel minimum.
    The matrix is built in voxel units, so anisotropic views (64x64x32) rotate without shear.
    """
    shape = torch.tensor(x.shape[1:], dtype=torch.float64)
    half = (shape - 1) / 2
    inverse = _rotation(degrees).T @ torch.diag(1 / torch.as_tensor(scales, dtype=torch.float64))
    # In grid_sample's normalised coordinates (align_corners=True) u = (i - c) / half, and its grid lists the
    # axes last-first (z, y, x).
    normalised = inverse * half[None, :] / half[:, None]
    theta = torch.zeros(1, 3, 4, dtype=torch.float64)
    theta[0, :, :3] = normalised.flip(0, 1)
    grid = F.affine_grid(theta.to(x.dtype), [1, *x.shape], align_corners=True)
    sampled = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    source = (grid[0].flip(-1) + 1) * half.to(x.dtype)  # source index (x, y, z) of every output voxel
    inside = ((source >= -0.5) & (source < shape.to(x.dtype) - 0.5)).all(dim=-1)
    fill = x.amin(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    return torch.where(inside, sampled, fill)


def _reflect_index(n: int, radius: int) -> torch.Tensor:
    """Source indices for padding an axis of length n by ``radius`` in scipy's 'reflect' mode (d c b a | a b c d)."""
    index = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(index < n, index, 2 * n - 1 - index)


def gaussian_taps(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(radius, kernels)`` of ``scipy.ndimage.gaussian_filter`` for float64 ``sigmas`` of any shape: radius
    int(4 sigma + 0.5) (0 for a skipped axis, sigma ~ 0), kernels (*sigmas.shape, 2 R + 1) normalised over taps
    -R..R, R the largest radius, zero past each kernel's own radius. Every blur (per sample, batched, DALI)
    takes its kernels from here."""
    skip = sigmas <= _SIGMA_EPS
    radius = torch.where(skip, 0, torch.floor(_TRUNCATE * sigmas + 0.5)).long()
    r_max = int(radius.max()) if radius.numel() else 0
    taps = torch.arange(-r_max, r_max + 1, dtype=torch.float64, device=sigmas.device)
    safe = torch.where(skip, 1.0, sigmas)[..., None]
    kernels = torch.exp(-0.5 * taps**2 / safe**2) * (taps.abs() <= radius[..., None])
    return radius, kernels / kernels.sum(dim=-1, keepdim=True)


def blur(x: torch.Tensor, sigmas) -> torch.Tensor:
    """Separable Gaussian blur with per-axis ``sigmas`` (voxels), as ``scipy.ndimage.gaussian_filter``.

    Same kernel (truncated at 4 sigma, normalised), same 'reflect' border, axes with sigma ~ 0 skipped.
    """
    out = x
    for axis, sigma in enumerate(float(s) for s in sigmas):
        if sigma <= _SIGMA_EPS:
            continue
        r, kernel = gaussian_taps(torch.tensor([sigma], dtype=torch.float64))
        radius, kernel = int(r), kernel[0].to(x.dtype)
        moved = out.movedim(axis + 1, -1)
        n = moved.shape[-1]
        padded = moved.index_select(-1, _reflect_index(n, radius)).reshape(-1, 1, n + 2 * radius)
        filtered = F.conv1d(padded, kernel.view(1, 1, -1)).reshape(moved.shape)
        out = filtered.movedim(-1, axis + 1)
    return out.contiguous() if out is not x else x.clone()


_M32 = 0xFFFFFFFF
_HASH_MUL = (0x7FEB352D, 0x846CA68B)
_SEED_XOR = 0x9E3779B9  # second stream of a seed: key k1 ^ this constant
_TWO_PI = 6.2831854820251465  # float32(2 pi)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """Low 32 bits of h * c for int64 h in [0, 2^32), without int64 overflow (c split in 16-bit halves)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, _HASH_MUL[0])
    h = h ^ (h >> 15)
    h = _mul32(h, _HASH_MUL[1])
    return h ^ (h >> 16)


def _unit(h: torch.Tensor) -> torch.Tensor:
    """float32 in (0, 1) from a 32-bit hash: (2 * top 23 bits + 1) / 2^24, exact in float32, never 0 or 1."""
    return ((h >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def normal_field(seeds, shape, device: str | torch.device | None = None, impl: str = "auto") -> torch.Tensor:
    """Standard normal float32 fields, one per seed: shape (len(seeds), *shape), a pure function of the seeds.

    Paired Box-Muller over the C-order flat index: with n voxels, h = ceil(n / 2) and, for p < h,
    a = mix(p ^ k0) (seed s = k0 + 2^32 k1), ``u1 = unit(mix(a ^ k1))``, ``u2 = unit(mix(a ^ k1 ^ 0x9E3779B9))``
    and ``r = sqrt(-2 log u1)``, voxel p is ``r cos(2 pi u2)`` and voxel h + p (when < n) ``r sin(2 pi u2)``, in
    float32: two independent standard normals per hashed pair. ``impl="torch"`` evaluates it with torch
    integer ops on ``device`` (the reference); ``"auto"`` uses the C++ kernel (csrc/intensity.cpp: the same
    integers and formula, its own log/cos/sin within a few float32 ulps, and much faster) for CPU fields when
    the extension is built.
    """
    if impl not in ("auto", "torch"):
        raise ValueError(f"impl must be 'auto' or 'torch', got {impl!r}")
    if impl == "auto" and torch.device(device or "cpu").type == "cpu":
        from . import native

        if native.available():
            return native.normal_field(seeds, shape)
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1)
    n = math.prod(int(s) for s in shape)
    if n >= 2**31:
        raise ValueError(f"noise fields hold at most 2^31 - 1 voxels, got shape {tuple(shape)}")
    half = (n + 1) // 2
    k0 = (seeds & _M32)[:, None]
    k1 = ((seeds >> 32) & _M32)[:, None]
    a = _mix32(torch.arange(half, dtype=torch.int64, device=seeds.device)[None, :] ^ k0)
    u1 = _unit(_mix32(a ^ k1))
    u2 = _unit(_mix32(a ^ (k1 ^ _SEED_XOR)))
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = u2 * _TWO_PI
    field = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :n]
    return field.reshape(len(seeds), *(int(s) for s in shape))


def sample_noise_seed(generator: torch.Generator) -> int:
    """A 62-bit seed for :func:`normal_field`."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None, mean: float = 0.0) -> torch.Tensor:
    """Add Gaussian noise ``N(mean, std^2)`` drawn from ``generator``."""
    return x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * std + mean


def gamma(x: torch.Tensor, g: float) -> torch.Tensor:
    """``sign(x) * |x| ** g``: torchio's Gamma, which switches to this form when x has negative values
    (after noise it always has); for non-negative x it equals ``x ** g``."""
    return torch.sign(x) * x.abs() ** g


def swap(x: torch.Tensor, pairs, patch_size) -> torch.Tensor:
    """Swap patches of ``patch_size`` at the start indices ``pairs`` (n, 2, 3), in order (torchio Swap)."""
    out = x.clone()
    px, py, pz = (int(p) for p in patch_size)
    for (ax, ay, az), (bx, by, bz) in torch.as_tensor(pairs).tolist():
        first = out[:, ax : ax + px, ay : ay + py, az : az + pz].clone()
        second = out[:, bx : bx + px, by : by + py, bz : bz + pz].clone()
        out[:, bx : bx + px, by : by + py, bz : bz + pz] = first
        out[:, ax : ax + px, ay : ay + py, az : az + pz] = second
    return out


def z_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over the whole view, unbiased std (torchio ZNormalization).

    A constant view becomes all zeros: torchio raises when the std is exactly 0, and float rounding of
    the mean can leave a tiny non-zero std that would blow rounding noise up to +-1. The statistics are
    accumulated in float64, which also keeps them (almost always bit-) identical across thread counts.
    """
    if x.amax() == x.amin():
        return torch.zeros_like(x)
    wide = x.double()
    return ((wide - wide.mean()) / wide.std()).to(x.dtype)


# ------------------------------------------------------------------------------------------ samplers


def sample_flip(generator: torch.Generator, cfg: AugmentConfig) -> tuple[int, ...]:
    """Axes to flip: each of the 3 axes with probability ``flip_probability``, kept if in ``flip_axes``."""
    hits = torch.rand(3, generator=generator) < cfg.flip_probability
    return tuple(a for a in range(3) if hits[a] and a in cfg.flip_axes)


def sample_affine(generator: torch.Generator, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, degrees), each (3,) float64, uniform per axis."""
    return _uniform(generator, *cfg.scales, 3), _uniform(generator, *cfg.degrees, 3)


def sample_blur(generator: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Per-axis Gaussian sigmas (3,) in voxels."""
    return _uniform(generator, *cfg.blur_std, 3)


def sample_noise(generator: torch.Generator, cfg: AugmentConfig) -> float:
    """Noise standard deviation."""
    return float(_uniform(generator, *cfg.noise_std, 1))


def sample_gamma(generator: torch.Generator, cfg: AugmentConfig) -> float:
    """Gamma exponent ``exp(U(log_gamma))``."""
    return math.exp(float(_uniform(generator, *cfg.log_gamma, 1)))


def _patch_starts(generator: torch.Generator, limit: torch.Tensor, n: int) -> torch.Tensor:
    # torchio draws randint(shape - patch), which never picks the last valid start; 0 when the patch fills the axis.
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    return (u * limit).floor().long()


def swap_limit(shape, cfg: AugmentConfig) -> torch.Tensor:
    """Per-axis range of patch starts (float64, shape minus patch), checked to allow two distinct patches."""
    limit = torch.as_tensor(shape, dtype=torch.float64) - torch.as_tensor(cfg.swap_patch, dtype=torch.float64)
    if (limit < 0).any():
        raise ValueError(f"swap patch {cfg.swap_patch} is larger than the view {tuple(shape)}")
    if not (limit >= 2).any():
        # torchio would loop forever: its start draws randint(shape - patch) can then only produce one position.
        raise ValueError(
            f"swap patch {cfg.swap_patch} leaves fewer than two patch positions in the view {tuple(shape)}"
        )
    return limit


def sample_swap(generator: torch.Generator, shape, cfg: AugmentConfig) -> torch.Tensor:
    """Start indices (n, 2, 3) of the patch pairs; the second patch is redrawn while it equals the first
    (torchio's "overlap" test only rejects a second patch that lies inside the first, i.e. the same one)."""
    limit = swap_limit(shape, cfg)
    n = cfg.swap_iterations
    first = _patch_starts(generator, limit, n)
    second = _patch_starts(generator, limit, n)
    while (same := (first == second).all(dim=1)).any():
        second[same] = _patch_starts(generator, limit, int(same.sum()))
    return torch.stack([first, second], dim=1)


# ------------------------------------------------------------------------------------------- pipelines


def draw_spatial(generator: torch.Generator, cfg: AugmentConfig) -> dict:
    """RandomFlip then RandomAffine parameters of one view: ``flip`` axes, ``scales``, ``degrees``."""
    axes = sample_flip(generator, cfg)
    scales, degrees = sample_affine(generator, cfg)
    return {"flip": axes, "scales": scales, "degrees": degrees}


def draw_intensity(generator: torch.Generator, cfg: AugmentConfig, shape, with_swap: bool) -> dict:
    """Blur, noise (std and the :func:`normal_field` seed of its field), gamma and, with ``with_swap``, swap
    parameters of one view, drawn in the order the official chain applies them."""
    params = {"sigmas": sample_blur(generator, cfg), "noise_std": sample_noise(generator, cfg)}
    params["noise_seed"] = sample_noise_seed(generator)
    params["gamma"] = sample_gamma(generator, cfg)
    if with_swap:
        params["swap"] = sample_swap(generator, shape, cfg)
    return params


@functools.lru_cache(maxsize=64)
def _swap_limit_cached(shape: tuple[int, ...], cfg: AugmentConfig) -> torch.Tensor:
    return swap_limit(shape, cfg)


Generator = torch.Generator | np.random.Generator


def _uniform_array(generator: Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float64 uniforms in [0, 1) of ``shape`` from a numpy or a torch generator."""
    if isinstance(generator, np.random.Generator):
        return generator.random(shape)
    return torch.rand(*shape, generator=generator, dtype=torch.float64).numpy()


def _noise_seeds(generator: Generator, n: int) -> torch.Tensor:
    """``n`` 62-bit :func:`normal_field` seeds (int64) from a numpy or a torch generator."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.integers(0, 2**62, n, dtype=np.int64))
    return torch.randint(0, 2**62, (n,), generator=generator)


def _sample_swaps(generator: Generator, n: int, shape, cfg: AugmentConfig) -> torch.Tensor:
    """Patch-pair starts (n, iterations, 2, 3) of ``n`` views in one draw; a second patch equal to its first
    is redrawn (as :func:`sample_swap`). The arithmetic on the drawn uniforms runs in numpy (cheaper than torch
    ops on tensors this small)."""
    limit = _swap_limit_cached(tuple(int(s) for s in shape), cfg).numpy()
    starts = np.floor(_uniform_array(generator, (n, cfg.swap_iterations, 2, 3)) * limit).astype(np.int64)
    while (same := (starts[:, :, 0] == starts[:, :, 1]).all(axis=-1)).any():
        second = starts[:, :, 1]
        second[same] = np.floor(_uniform_array(generator, (int(same.sum()), 3)) * limit).astype(np.int64)
    return torch.from_numpy(starts)


def _draw_views(generator: Generator, cfg: AugmentConfig, n: int) -> dict:
    """Flip, affine, blur, noise and gamma parameters of ``n`` views from one uniform draw (n, 14) and one
    seed draw, with the per-view samplers' distributions (arithmetic in numpy, as in :func:`_sample_swaps`)."""
    u = _uniform_array(generator, (n, 14))
    seeds = _noise_seeds(generator, n)

    def scaled(cols, bounds):
        low, high = bounds
        return low + (high - low) * u[:, cols]

    allowed = np.array([a in cfg.flip_axes for a in range(3)])
    return {
        "flip": torch.from_numpy((u[:, 0:3] < cfg.flip_probability) & allowed),
        "scales": torch.from_numpy(scaled(slice(3, 6), cfg.scales)),
        "degrees": torch.from_numpy(scaled(slice(6, 9), cfg.degrees)),
        "sigmas": torch.from_numpy(scaled(slice(9, 12), cfg.blur_std)),
        "noise_std": torch.from_numpy(scaled(12, cfg.noise_std)),
        "noise_seed": seeds,
        "gamma": torch.from_numpy(np.exp(scaled(13, cfg.log_gamma))),
    }


def draw_sample_params(generator: Generator, cfg: AugmentConfig, global_shape, local_shape,
                       n_local: int) -> tuple[dict, dict]:
    """Every augmentation parameter of one PCRLv2 sample, stacked per view kind: ``(global_params,
    local_params)`` with 2 and ``n_local`` rows. Keys: ``flip`` (n, 3) bool, ``scales``, ``degrees``, ``sigmas``
    (n, 3) float64, ``noise_std``, ``gamma`` (n,) float64, ``noise_seed`` (n,) int64 (:func:`normal_field`)
    and, for the global views, ``swap`` (2, iterations, 2, 3) int64 patch starts and ``swap_patch``.

    ``generator``: a numpy ``Generator`` (what :meth:`PretrainDataset.sample_geometry` hands out: the
    sample's own stream, continued after its boxes; numpy draws cost a fraction of torch's on arrays this
    small) or a ``torch.Generator``; the distributions are the same, the values differ between the two.
    The draw order is fixed: the scalar parameters of all 2 + n_local views, their noise seeds, then the
    swaps of the global views. The per-sample dataset (view by view, :func:`view_params`) and the batch
    loaders (stacked) both use it, so they augment with identical parameters.
    """
    views = _draw_views(generator, cfg, 2 + n_local)
    global_params = {k: v[:2] for k, v in views.items()}
    local_params = {k: v[2:] for k, v in views.items()} if n_local else {}
    global_params["swap"] = _sample_swaps(generator, 2, tuple(global_shape), cfg)
    global_params["swap_patch"] = tuple(cfg.swap_patch)
    return global_params, local_params


def view_params(params: dict, i: int) -> dict:
    """View ``i`` of stacked parameters (:func:`draw_sample_params`) as the per-view dict :func:`apply_spatial`
    and :func:`apply_intensity` take."""
    view = {
        "flip": tuple(a for a in range(3) if bool(params["flip"][i, a])),
        "scales": params["scales"][i],
        "degrees": params["degrees"][i],
        "sigmas": params["sigmas"][i],
        "noise_std": float(params["noise_std"][i]),
        "noise_seed": int(params["noise_seed"][i]),
        "gamma": float(params["gamma"][i]),
    }
    if "swap" in params:
        view["swap"] = params["swap"][i]
    return view


def draw_sample_views(generator: Generator, cfg: AugmentConfig, global_shape, local_shape, n_local: int):
    """:func:`draw_sample_params` as lists of per-view dicts ``(globals, locals)``."""
    gp, lp = draw_sample_params(generator, cfg, global_shape, local_shape, n_local)
    return [view_params(gp, i) for i in range(2)], [view_params(lp, i) for i in range(n_local)]


def apply_spatial(x: torch.Tensor, params: dict) -> torch.Tensor:
    return affine(flip(x, params["flip"]), params["scales"], params["degrees"])


def apply_intensity(x: torch.Tensor, params: dict, cfg: AugmentConfig) -> torch.Tensor:
    x = blur(x, params["sigmas"])
    field = normal_field([params["noise_seed"]], x.shape[1:], x.device)
    x = x + field.to(x.dtype) * params["noise_std"]
    x = gamma(x, params["gamma"])
    if "swap" in params:
        x = swap(x, params["swap"], cfg.swap_patch)
    return z_normalize(x)


def spatial_augment(x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """RandomFlip then RandomAffine, fresh parameters per call (the official ``spatial_transforms``)."""
    return apply_spatial(x, draw_spatial(generator, cfg))


def intensity_augment(x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig, with_swap: bool) -> torch.Tensor:
    """RandomBlur, RandomNoise, RandomGamma, RandomSwap (global views: ``with_swap``), ZNormalization."""
    return apply_intensity(x, draw_intensity(generator, cfg, x.shape[1:], with_swap), cfg)
