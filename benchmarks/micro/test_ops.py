"""Per-op CPU micro-benchmarks of the data engine, one thread (pytest-benchmark).

Ops: cutting a crop out of a memory-mapped int16 volume; crop + window + resize (the plain-torch reference, the
dataset's ``cut_and_resize`` and the native kernel); each augmentation of :mod:`pcrlv2_fast.data.augment` on one
view and its batched twin of :mod:`pcrlv2_fast.data.batched` on a batch of 16 views; the native flip + affine, the
native fused intensity chain, and the native loader's whole per-view chain (``native.views``: crop + resize, flip +
affine, intensity, straight from the memory map).
Views have the official shapes: global 64x64x32, local 16^3 (no swap for locals, as in the official chain).
Parameters come from augment.py's samplers with a fixed seed, so every run times the same work. The volume's
pages are read once before timing (a warm page cache). Each benchmark records the number of views (or crops) per
call in ``extra_info["items"]``: divide the time by it for a per-view cost.

    pytest benchmarks/micro --benchmark-json=benchmarks/results/micro-cpu-$(date +%F).json
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from pcrlv2_fast.data import augment, batched, native  # noqa: E402
from pcrlv2_fast.data.augment import AugmentConfig  # noqa: E402
from pcrlv2_fast.data.dataset import cut_and_resize  # noqa: E402
from pcrlv2_fast.reference.crop_resize import reference_crop_resize  # noqa: E402

GLOBAL_OUT = (64, 64, 32)
LOCAL_OUT = (16, 16, 16)
# Per view kind: the output shape and a representative official crop size (x, y, z) cut from the volume.
KINDS = {"global": (GLOBAL_OUT, (96, 96, 64)), "local": (LOCAL_OUT, (32, 32, 16))}
BATCH = 16  # views per batched call
VOLUME_SHAPE = (256, 256, 160)  # 1 mm CT, int16 HU: 21 MB
WINDOW = (-1000.0, 1000.0)
CFG = AugmentConfig()
needs_native = pytest.mark.skipif(not native.available(), reason=f"native extension: {native.load_error()}")
kinds = pytest.mark.parametrize("kind", list(KINDS))


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> np.memmap:
    """A memory-mapped int16 HU volume (air around random tissue) whose pages have been read once."""
    rng = np.random.default_rng(0)
    hu = np.full(VOLUME_SHAPE, -1000, dtype=np.int16)
    inner = (slice(16, -16), slice(16, -16), slice(8, -8))
    hu[inner] = rng.integers(-900, 1200, size=hu[inner].shape)
    path = tmp_path_factory.mktemp("micro") / "ct.npy"
    np.save(path, hu)
    mapped = np.load(path, mmap_mode="r")
    int(mapped.sum(dtype=np.int64))
    return mapped


def draw_boxes(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` boxes (x0, y0, z0, sx, sy, sz) of the kind's crop size at seeded positions inside the volume."""
    size = np.asarray(KINDS[kind][1], dtype=np.int64)
    rng = np.random.default_rng(seed)
    start = (rng.random((n, 3)) * (np.asarray(VOLUME_SHAPE) - size + 1)).astype(np.int64)
    return np.concatenate([start, np.broadcast_to(size, (n, 3))], axis=1)


@pytest.fixture(scope="module")
def views(volume) -> dict[str, torch.Tensor]:
    """Per kind, (BATCH, 1, *out) float32 windowed, resized crops: the inputs of the augmentations."""
    return {kind: reference_crop_resize(volume, draw_boxes(kind, BATCH), out, WINDOW)
            for kind, (out, _) in KINDS.items()}


@pytest.fixture(scope="module")
def params() -> dict[str, dict]:
    """Per kind, the augmentation parameters of BATCH views drawn view by view with augment.py's samplers
    (``batched.stack_view_params``): row 0 serves the single-view ops, all rows the batched ones."""
    generator = torch.Generator().manual_seed(0)
    drawn = {kind: batched.stack_view_params(generator, BATCH, CFG, out, with_swap=kind == "global")
             for kind, (out, _) in KINDS.items()}
    for p in drawn.values():  # the noise-field seeds of the native kernels
        p["noise_seed"] = torch.stack([torch.tensor(augment.sample_noise_seed(generator)) for _ in range(BATCH)])
    return drawn


def run(benchmark, fn, *args, items: int = 1, **kwargs):
    benchmark.extra_info["items"] = items
    return benchmark(fn, *args, **kwargs)


# ----------------------------------------------------------------------------------------- crop, resize


@pytest.mark.benchmark(group="crop")
@kinds
def test_crop_memmap(benchmark, volume, kind):
    """One crop of the official size copied out of the memory map (int16), as the crop kernels read it."""
    x0, y0, z0, sx, sy, sz = draw_boxes(kind, 1)[0].tolist()
    crop = run(benchmark, np.array, volume[x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz])
    assert crop.shape == KINDS[kind][1]


@pytest.mark.benchmark(group="resize")
@kinds
@pytest.mark.parametrize("n", [1, BATCH])
def test_resize_reference(benchmark, volume, kind, n):
    out_size, _ = KINDS[kind]
    out = run(benchmark, reference_crop_resize, volume, draw_boxes(kind, n), out_size, WINDOW, items=n)
    assert out.shape == (n, 1, *out_size)


@pytest.mark.benchmark(group="resize")
@kinds
def test_resize_cut_and_resize(benchmark, volume, kind):
    """The per-sample dataset's crop path (cut, float32, window, F.interpolate) for one box."""
    out_size, _ = KINDS[kind]
    out = run(benchmark, cut_and_resize, volume, draw_boxes(kind, 1)[0], out_size, WINDOW)
    assert out.shape == (1, *out_size)


@pytest.mark.benchmark(group="resize")
@needs_native
@kinds
@pytest.mark.parametrize("n", [1, BATCH])
def test_resize_native(benchmark, volume, kind, n):
    out_size, _ = KINDS[kind]
    buffer = torch.empty((n, 1, *out_size))  # a loader reuses its batch buffer
    out = run(benchmark, native.crop_resize, volume, draw_boxes(kind, n), out_size, WINDOW, out=buffer,
              num_threads=1, items=n)
    assert out.shape == (n, 1, *out_size)


# ------------------------------------------------------------------------------------ per-view augment


def _view_params(p: dict) -> dict:
    return {k: (v[0] if isinstance(v, torch.Tensor) else v) for k, v in p.items()}


@pytest.mark.benchmark(group="flip")
@kinds
def test_flip(benchmark, views, kind):
    run(benchmark, augment.flip, views[kind][0], (0,))


@pytest.mark.benchmark(group="affine")
@kinds
def test_affine(benchmark, views, params, kind):
    p = _view_params(params[kind])
    run(benchmark, augment.affine, views[kind][0], p["scales"], p["degrees"])


@pytest.mark.benchmark(group="blur")
@kinds
def test_blur(benchmark, views, params, kind):
    run(benchmark, augment.blur, views[kind][0], _view_params(params[kind])["sigmas"])


@pytest.mark.benchmark(group="noise")
@kinds
def test_noise(benchmark, views, params, kind):
    generator = torch.Generator().manual_seed(1)
    run(benchmark, augment.noise, views[kind][0], float(_view_params(params[kind])["noise_std"]), generator)


@pytest.mark.benchmark(group="gamma")
@kinds
def test_gamma(benchmark, views, params, kind):
    run(benchmark, augment.gamma, views[kind][0] - 0.5, float(_view_params(params[kind])["gamma"]))


@pytest.mark.benchmark(group="swap")
def test_swap(benchmark, views, params):
    p = _view_params(params["global"])
    run(benchmark, augment.swap, views["global"][0], p["swap"], CFG.swap_patch)


@pytest.mark.benchmark(group="z_normalize")
@kinds
def test_z_normalize(benchmark, views, kind):
    run(benchmark, augment.z_normalize, views[kind][0])


# ------------------------------------------------------------------------------------------ batched ops


@pytest.mark.benchmark(group="affine")
@kinds
def test_affine_batch(benchmark, views, params, kind):
    """Flip + affine in one resampling (``spatial_batch``), the torch loader's spatial step."""
    p = params[kind]
    run(benchmark, batched.affine_batch, views[kind], p["scales"], p["degrees"], p["flip"], items=BATCH)


@pytest.mark.benchmark(group="blur")
@kinds
def test_blur_batch(benchmark, views, params, kind):
    run(benchmark, batched.blur_batch, views[kind], params[kind]["sigmas"], items=BATCH)


@pytest.mark.benchmark(group="noise")
@kinds
def test_noise_batch(benchmark, views, params, kind):
    generator = torch.Generator().manual_seed(1)
    run(benchmark, batched.noise_batch, views[kind], params[kind]["noise_std"], generator, items=BATCH)


@pytest.mark.benchmark(group="gamma")
@kinds
def test_gamma_batch(benchmark, views, params, kind):
    run(benchmark, batched.gamma_batch, views[kind] - 0.5, params[kind]["gamma"], items=BATCH)


@pytest.mark.benchmark(group="swap")
def test_swap_batch(benchmark, views, params):
    p = params["global"]
    run(benchmark, batched.swap_batch, views["global"], p["swap"], p["swap_patch"], items=BATCH)


@pytest.mark.benchmark(group="z_normalize")
@kinds
def test_z_normalize_batch(benchmark, views, kind):
    run(benchmark, batched.z_normalize_batch, views[kind], items=BATCH)


# ---------------------------------------------------------------------------------------------- native


@pytest.mark.benchmark(group="affine")
@needs_native
@kinds
@pytest.mark.parametrize("n", [1, BATCH])
def test_affine_native(benchmark, views, params, kind, n):
    """Flip + affine of ``n`` views with the C++ kernel, its maps built per call as the native loader does."""
    p = params[kind]
    x, scales, degrees, flips = views[kind][:n], p["scales"][:n], p["degrees"][:n], p["flip"][:n]
    out = torch.empty_like(x)

    def flip_affine():
        maps = native.affine_maps(scales, degrees, x.shape[2:])
        return native.affine(x, maps, out=out, flips=flips, num_threads=1)

    assert run(benchmark, flip_affine, items=n).shape == x.shape


@pytest.mark.benchmark(group="intensity")
@needs_native
@kinds
@pytest.mark.parametrize("n", [1, BATCH])
def test_intensity_native(benchmark, views, params, kind, n):
    """Blur, noise, gamma, swap (global views) and z-normalisation of ``n`` views, the fused C++ kernel."""
    p = {k: (v[:n] if isinstance(v, torch.Tensor) else v) for k, v in params[kind].items()}
    x = views[kind][:n]
    out = torch.empty_like(x)
    assert run(benchmark, native.intensity, x, p, out=out, num_threads=1, items=n).shape == x.shape


@pytest.mark.benchmark(group="views")
@needs_native
@kinds
def test_views_native(benchmark, volume, params, kind):
    """The native loader's chain for BATCH views: crop + resize from the memory map, flip + affine, intensity."""
    out_size, _ = KINDS[kind]
    out = torch.empty((BATCH, 1, *out_size))
    result = run(benchmark, native.views, [volume], [WINDOW], np.zeros(BATCH, dtype=np.int64),
                 draw_boxes(kind, BATCH), out_size, params[kind], out=out, num_threads=1, items=BATCH)
    assert result.shape == out.shape
