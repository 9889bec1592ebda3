"""Batched crop/resize and augmentations against the per-view ops of dataset.py and augment.py, element-wise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pcrlv2_fast.data import batched
from pcrlv2_fast.data.augment import (
    AugmentConfig,
    affine,
    blur,
    flip,
    gamma,
    noise,
    sample_affine,
    sample_blur,
    sample_flip,
    sample_gamma,
    sample_noise,
    sample_swap,
    swap,
    z_normalize,
)
from pcrlv2_fast.data.batched import (
    VolumeBank,
    affine_batch,
    augment_batch,
    blur_batch,
    gamma_batch,
    intensity_batch,
    noise_batch,
    spatial_batch,
    stack_view_params,
    swap_batch,
    z_normalize_batch,
)
from pcrlv2_fast.data.dataset import cut_and_resize
from tests.helpers import assert_close

CFG = AugmentConfig()
# Every axis may flip, so the flip folded into the affine is exercised on all three.
CFG_ALL_FLIPS = replace(CFG, flip_axes=(0, 1, 2))
# (views, spatial shape): odd sizes, the global and the local view size.
BATCHES = [(3, (13, 11, 9)), (2, (64, 64, 32)), (3, (16, 16, 16))]
LAYOUTS = ["contiguous", "channels_last_3d", "strided"]


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n, shape, layout="contiguous", seed=0, channels=1) -> torch.Tensor:
    """Random views in [0, 1) in the given memory layout (same values for every layout)."""
    x = torch.rand((n, channels, *shape), generator=gen(seed))
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":  # every other sample of a twice larger batch, axes stored in reverse order
        big = torch.zeros((2 * n, channels, *shape))
        big[::2] = x
        return big.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)[::2]
    return x


def flip_axes(mask_row) -> tuple[int, ...]:
    return tuple(a for a in range(3) if bool(mask_row[a]))


# ------------------------------------------------------------------------------------------ volume bank


def bank_volumes(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(shape, dtype=np.float32) for shape in ((40, 36, 30), (33, 45, 21), (50, 29, 37))]


def random_boxes(shapes, n, rng, sizes):
    volume_index = rng.integers(0, len(shapes), n)
    boxes = []
    for v in volume_index:
        size = np.asarray(sizes[rng.integers(len(sizes))])
        size = np.minimum(size, shapes[v])
        start = rng.integers(0, np.asarray(shapes[v]) - size + 1)
        boxes.append(np.concatenate([start, size]))
    return volume_index, np.stack(boxes)


@pytest.mark.parametrize("out_size", [(16, 16, 16), (12, 10, 7)])
def test_crop_resize_matches_cut_and_resize(out_size):
    volumes = bank_volumes()
    bank = VolumeBank(volumes)
    rng = np.random.default_rng(1)
    # Down- and up-sampling, odd sizes, several boxes of one size from different volumes.
    sizes = [(32, 32, 16), (8, 8, 8), (21, 17, 30), (5, 9, 3), (1, 1, 1)]
    volume_index, boxes = random_boxes([v.shape for v in volumes], 24, rng, sizes)
    out = bank.crop_resize(torch.from_numpy(volume_index), torch.from_numpy(boxes), out_size)
    assert out.shape == (24, 1, *out_size) and out.dtype == torch.float32
    for i, (v, box) in enumerate(zip(volume_index, boxes, strict=True)):
        expected = cut_and_resize(torch.from_numpy(volumes[v]), box, out_size)
        assert_close(out[i], expected, atol=1e-6)


def test_crop_resize_chunks(monkeypatch):
    volumes = bank_volumes(2)
    rng = np.random.default_rng(3)
    volume_index, boxes = random_boxes([v.shape for v in volumes], 10, rng, [(20, 20, 12), (9, 7, 5)])
    bank = VolumeBank(volumes)
    whole = bank.crop_resize(volume_index, boxes, (8, 8, 8))
    monkeypatch.setattr(batched, "_CUT_CHUNK", 1000)  # a few crops per gather
    assert torch.equal(bank.crop_resize(volume_index, boxes, (8, 8, 8)), whole)


def test_crop_resize_windows_int16_storage():
    rng = np.random.default_rng(4)
    hu = [rng.integers(-1400, 2500, size=s).astype(np.int16) for s in ((30, 28, 20), (26, 31, 24))]
    windows = [(-1000.0, 1000.0), (-200.0, 300.0)]
    bank = VolumeBank(hu, windows=windows)
    assert bank.dtype == torch.int16 and bank.nbytes == sum(a.size for a in hu) * 2
    volume_index, boxes = random_boxes([a.shape for a in hu], 8, rng, [(16, 16, 12), (7, 9, 5)])
    out = bank.crop_resize(volume_index, boxes, (10, 10, 8))
    for i, (v, box) in enumerate(zip(volume_index, boxes, strict=True)):
        lo, hi = windows[v]
        scaled = (np.clip(hu[v].astype(np.float32), lo, hi) - lo) / (hi - lo)  # io._scale
        assert_close(out[i], cut_and_resize(torch.from_numpy(scaled), box, (10, 10, 8)), atol=1e-6)
    # One window for every volume.
    shared = VolumeBank(hu, windows=(-1000, 1000)).crop_resize(volume_index[:1], boxes[:1], (4, 4, 4))
    assert shared.min() >= 0 and shared.max() <= 1


def test_crop_resize_float16_and_memmap(tmp_path):
    volumes = bank_volumes(5)
    path = tmp_path / "v.npy"
    np.save(path, volumes[0].astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    bank = VolumeBank([mapped, volumes[1].astype(np.float16)])
    assert bank.dtype == torch.float16
    box = np.array([[3, 4, 5, 20, 16, 12]])
    out = bank.crop_resize([0], box, (8, 8, 8))
    assert_close(out[0], cut_and_resize(torch.from_numpy(np.asarray(mapped, dtype=np.float32)), box[0], (8, 8, 8)))


def test_bank_rejects_bad_input():
    volumes = bank_volumes()
    bank = VolumeBank(volumes)
    with pytest.raises(ValueError, match="does not lie inside volume 1"):
        bank.crop_resize([0, 1], [[0, 0, 0, 8, 8, 8], [30, 0, 0, 8, 8, 8]], (4, 4, 4))
    with pytest.raises(IndexError, match="out of range"):
        bank.crop_resize([3], [[0, 0, 0, 8, 8, 8]], (4, 4, 4))
    with pytest.raises(ValueError, match="boxes"):
        bank.crop_resize([0], [[0, 0, 0, 8, 8]], (4, 4, 4))
    with pytest.raises(ValueError, match="window"):
        VolumeBank([np.zeros((4, 4, 4), np.int16)])
    with pytest.raises(ValueError, match="windows"):
        VolumeBank(volumes, windows=[(0, 1), (1, 0), (0, 1)])
    with pytest.raises(ValueError, match="3D"):
        VolumeBank([np.zeros((4, 4), np.float32)])
    assert bank.crop_resize([], np.zeros((0, 6), np.int64), (4, 4, 4)).shape == (0, 1, 4, 4, 4)


# ------------------------------------------------------------------------------------ ops vs per view


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,shape", BATCHES)
def test_affine_batch(n, shape, layout):
    x = batch(n, shape, layout)
    p = stack_view_params(gen(2), n, CFG, shape, with_swap=False)
    out = affine_batch(x, p["scales"], p["degrees"])
    for i in range(n):
        assert_close(out[i], affine(x[i], p["scales"][i], p["degrees"][i]))


@pytest.mark.parametrize("n,shape", BATCHES)
def test_affine_batch_extreme_parameters(n, shape):
    """Large rotations and shrinking scales put many voxels outside: same inside band and fill per sample."""
    x = batch(n, shape, seed=3) + torch.arange(n).view(-1, 1, 1, 1, 1)  # a different minimum per sample
    scales = torch.linspace(0.6, 1.4, n, dtype=torch.float64)[:, None].expand(n, 3)
    degrees = torch.tensor([[35.0, -50.0, 80.0]], dtype=torch.float64).expand(n, 3) * torch.linspace(-1, 1, n)[:, None]
    out = affine_batch(x, scales, degrees)
    for i in range(n):
        assert_close(out[i], affine(x[i], scales[i], degrees[i]))
    identity = affine_batch(x, torch.ones(n, 3), torch.zeros(n, 3))
    assert_close(identity, x, atol=2e-5)  # the normalised grid is not exact at integer indices


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,shape", BATCHES)
def test_spatial_batch_folds_flip_into_affine(n, shape, layout):
    x = batch(n, shape, layout, seed=4)
    p = stack_view_params(gen(5), n, CFG_ALL_FLIPS, shape, with_swap=False)
    p["flip"][0] = True  # at least one sample flips every axis
    out = spatial_batch(x, p)
    for i in range(n):
        expected = affine(flip(x[i], flip_axes(p["flip"][i])), p["scales"][i], p["degrees"][i])
        assert_close(out[i], expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,shape", BATCHES)
def test_blur_batch(n, shape, layout):
    x = batch(n, shape, layout, seed=6)
    sigmas = stack_view_params(gen(7), n, CFG, shape, with_swap=False)["sigmas"]
    sigmas[0] = torch.tensor([0.0, 2.0, 1e-16], dtype=torch.float64)  # skipped axes and the largest radius
    out = blur_batch(x, sigmas)
    for i in range(n):
        assert_close(out[i], blur(x[i], sigmas[i]))


def test_blur_batch_multiplies_in_float64_where_fp32_could_be_tf32():
    """On CUDA float32 views are blurred in float64 (a process-wide TF32 switch would otherwise round the matmuls'
    inputs to 10 bits); the float64 product equals the float32 one to float32 rounding."""
    from pcrlv2_fast.data.batched import blur_dtype

    x = batch(3, (9, 8, 7), seed=9)
    assert blur_dtype(x) == torch.float32
    cuda_like = type("CudaTensorLike", (), {"is_cuda": True, "dtype": torch.float32})()
    assert blur_dtype(cuda_like) == torch.float64
    sigmas = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.5, 0.7], [0.3, 0.0, 0.0]], dtype=torch.float64)
    exact = blur_batch(x, sigmas, dtype=torch.float64)
    assert exact.dtype == torch.float32
    assert_close(exact, blur_batch(x, sigmas), atol=2e-6)


def test_blur_batch_several_channels_and_large_sigma():
    x = batch(2, (7, 12, 5), channels=2, seed=8)
    sigmas = torch.tensor([[3.0, 0.4, 2.5], [0.0, 5.0, 0.9]], dtype=torch.float64)  # radii beyond the axis length
    out = blur_batch(x, sigmas)
    for i in range(2):
        assert_close(out[i], blur(x[i], sigmas[i]))


@pytest.mark.parametrize("n,shape", BATCHES)
def test_gamma_batch(n, shape):
    x = batch(n, shape, "strided", seed=9) - 0.3  # negative values take the sign(x) |x|^g form
    g = stack_view_params(gen(10), n, CFG, shape, with_swap=False)["gamma"]
    out = gamma_batch(x, g)
    for i in range(n):
        assert_close(out[i], gamma(x[i], float(g[i])), atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,shape", BATCHES)
def test_swap_batch(n, shape, layout):
    x = batch(n, shape, layout, seed=11)
    p = stack_view_params(gen(12), n, CFG, shape, with_swap=True)
    out = swap_batch(x, p["swap"], p["swap_patch"])
    for i in range(n):
        assert torch.equal(out[i], swap(x[i], p["swap"][i], CFG.swap_patch))


def test_swap_batch_overlapping_patches():
    """Partly overlapping pairs: the first patch is written last, as augment.swap."""
    x = batch(2, (13, 11, 9), seed=13, channels=2)
    pairs = torch.tensor(
        [[[[0, 0, 0], [3, 2, 1]], [[2, 1, 0], [0, 0, 2]], [[5, 7, 5], [1, 3, 2]]],
         [[[4, 4, 4], [4, 5, 4]], [[1, 1, 1], [8, 3, 2]], [[0, 2, 0], [0, 0, 0]]]]
    )
    out = swap_batch(x, pairs, (5, 4, 4))
    for i in range(2):
        assert torch.equal(out[i], swap(x[i], pairs[i], (5, 4, 4)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,shape", BATCHES)
def test_z_normalize_batch(n, shape, layout):
    x = batch(n, shape, layout, seed=14) * torch.arange(1, n + 1).view(-1, 1, 1, 1, 1)
    x[-1] = 0.25  # a constant view
    out = z_normalize_batch(x)
    for i in range(n):
        assert_close(out[i], z_normalize(x[i]), atol=1e-6)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_z_normalize_batch_constant_views(dtype):
    """Constant views of values that are not dyadic, large or negative become zeros; others do not."""
    values = torch.tensor([0.1, -3.7e5, 1 / 3, 0.0], dtype=dtype)
    x = values.view(-1, 1, 1, 1, 1).expand(4, 1, 13, 11, 9).clone()
    x[3, 0, 5, 5, 5] = 1e-6  # almost constant: normalised, not zeroed
    out = z_normalize_batch(x)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert_close(out[3], z_normalize(x[3]), atol=1e-5)
    assert out[3].abs().max() > 1


def test_noise_batch():
    x = batch(4, (13, 11, 9), seed=15)
    std = torch.tensor([0.0, 0.05, 0.25, 0.1], dtype=torch.float64)
    out = noise_batch(x, std, gen(16))
    # The field is one draw of the batch's shape, scaled per sample.
    field = torch.randn(x.shape, generator=gen(16))
    assert_close(out, x + field * std.float().view(-1, 1, 1, 1, 1), atol=1e-6)
    assert torch.equal(out[0], noise(x[0], 0.0, gen(0)))
    # Statistics of the added noise per sample.
    big = torch.zeros(3, 1, 32, 32, 32)
    std = torch.tensor([0.01, 0.1, 0.25], dtype=torch.float64)
    added = noise_batch(big, std, gen(17)).flatten(1)
    assert_close(added.mean(dim=1), torch.zeros(3), atol=3e-3)
    assert_close(added.std(dim=1) / std.float(), torch.ones(3), atol=0.02)


# -------------------------------------------------------------------------------------- parameters


def per_view_intensity(v, p, i, with_swap):
    """augment.intensity_augment's chain with view i's parameters and noise std 0."""
    v = gamma(noise(blur(v, p["sigmas"][i]), 0.0), float(p["gamma"][i]))
    if with_swap:
        v = swap(v, p["swap"][i], p["swap_patch"])
    return z_normalize(v)


@pytest.mark.parametrize("with_swap", [True, False])
@pytest.mark.parametrize("n,shape", BATCHES)
def test_augment_batch_matches_per_view_pipeline(n, shape, with_swap):
    x = batch(n, shape, "channels_last_3d", seed=18)
    p = stack_view_params(gen(19), n, CFG_ALL_FLIPS, shape, with_swap)
    p["noise_std"] = torch.zeros(n, dtype=torch.float64)
    spatial, augmented = augment_batch(x, p, gen(20))
    assert torch.equal(intensity_batch(spatial, p, gen(20)), augmented)
    for i in range(n):
        view = affine(flip(x[i], flip_axes(p["flip"][i])), p["scales"][i], p["degrees"][i])
        assert_close(spatial[i], view)
        # z-scores are up to ~5 and amplify the float32 rounding of the spatial output.
        assert_close(augmented[i], per_view_intensity(spatial[i], p, i, with_swap), atol=2e-5)


def test_stack_view_params_replays_the_per_view_samplers():
    p = stack_view_params(gen(21), 3, CFG_ALL_FLIPS, (64, 64, 32), with_swap=True)
    g = gen(21)
    for i in range(3):
        assert flip_axes(p["flip"][i]) == sample_flip(g, CFG_ALL_FLIPS)
        scales, degrees = sample_affine(g, CFG_ALL_FLIPS)
        assert torch.equal(p["scales"][i], scales) and torch.equal(p["degrees"][i], degrees)
        assert torch.equal(p["sigmas"][i], sample_blur(g, CFG_ALL_FLIPS))
        assert float(p["noise_std"][i]) == sample_noise(g, CFG_ALL_FLIPS)
        assert float(p["gamma"][i]) == sample_gamma(g, CFG_ALL_FLIPS)
        assert torch.equal(p["swap"][i], sample_swap(g, (64, 64, 32), CFG_ALL_FLIPS))


def test_sampled_batch_augments_end_to_end():
    """Batched parameters drive the batched pipeline: finite z-scored views, target in the input's range."""
    x = batch(4, (16, 16, 16), seed=23)
    p = stack_view_params(gen(24), 4, CFG, (16, 16, 16), with_swap=False)
    spatial, augmented = augment_batch(x, p, gen(25))
    assert spatial.min() >= 0 and spatial.max() <= 1
    assert torch.isfinite(augmented).all()
    assert_close(augmented.flatten(1).mean(dim=1), torch.zeros(4), atol=1e-5)
    assert_close(augmented.flatten(1).std(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("size", [2, 9, 16, 32, 64, 113])
def test_inside_bounds_equal_the_source_index_test(size, dtype):
    """Thresholds on the normalised coordinate decide exactly as augment.affine's test on the source index."""
    lo, hi = batched.inside_bounds(size, dtype)
    grid = torch.linspace(-1.2, 1.2, 20001, dtype=torch.float64).to(dtype)
    g = torch.cat([grid, torch.tensor([lo, hi], dtype=dtype)])
    inf = torch.tensor(math.inf, dtype=dtype)
    g = torch.cat([g, torch.nextafter(g[-2:], -inf), torch.nextafter(g[-2:], inf)])
    half = torch.tensor((size - 1) / 2, dtype=dtype)
    source = (g + 1) * half
    expected = (source >= -0.5) & (source < torch.tensor(size, dtype=dtype) - 0.5)
    assert torch.equal((g >= lo) & (g < hi), expected)
    assert expected[-6] and not expected[-5]  # lo is inside, hi is not


def test_augment_benchmark_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "benchmark_augment.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--batch-size", "1", "--steps", "1", "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    stages = ["crop", "spatial", "blur", "noise", "gamma", "swap", "z_normalize", "augment"]
    assert [(r["stage"], r["provider"]) for r in rows] == [(s, p) for s in stages for p in ("per_view", "batched")]
    for r in rows:
        assert r["benchmark"] == "augment" and r["samples_per_s"] > 0 and r["device"] and r["torch"] and r["date"]
    assert "speed-up" in proc.stdout
