"""Augmentation ops with fixed parameters against hand computations and torchio, and their samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcrlv2_fast.data.augment import (
    AugmentConfig,
    affine,
    blur,
    flip,
    gamma,
    intensity_augment,
    sample_affine,
    sample_blur,
    sample_flip,
    sample_gamma,
    sample_noise,
    sample_swap,
    spatial_augment,
    swap,
    z_normalize,
)
from tests import requirements
from tests.helpers import assert_close

CFG = AugmentConfig()
SHAPES = [(1, 16, 16, 16), (1, 20, 18, 12), (2, 13, 9, 7)]


def view(shape=(1, 20, 18, 12), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------- fixed params


@pytest.mark.parametrize("shape", SHAPES)
def test_flip(shape):
    x = view(shape)
    assert_close(flip(x, (0,)), torch.from_numpy(np.flip(x.numpy(), axis=1).copy()), atol=0)
    assert_close(flip(x, (0, 2)), x.flip(1).flip(3), atol=0)
    same = flip(x, ())
    assert_close(same, x, atol=0)
    assert same.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("shape", SHAPES)
def test_affine_identity(shape):
    x = view(shape)
    assert_close(affine(x, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), x, atol=1e-5)


def test_affine_rotation_90_about_z():
    # Rotating by +90 degrees about z maps in[y, n - 1 - x] to out[x, y]: torch.rot90 over (x, y).
    x = view((1, 10, 10, 6))
    assert_close(affine(x, (1, 1, 1), (0, 0, 90)), torch.rot90(x, 1, dims=(1, 2)), atol=1e-5)


def test_affine_scale_and_fill():
    # A ramp equal to the x index: scaling x by 2 about the centre c gives c + (x - c) / 2.
    n = 21
    ramp = torch.arange(n, dtype=torch.float32).view(1, n, 1, 1).expand(1, n, 8, 6).contiguous() + 5
    out = affine(ramp, (2.0, 1.0, 1.0), (0, 0, 0))
    c = (n - 1) / 2
    expected = (c + (torch.arange(n) - c) / 2 + 5).view(1, n, 1, 1).expand_as(out)
    assert_close(out, expected, atol=1e-4)
    # Zooming out (scale 0.5) leaves out-of-field voxels, filled with the view minimum.
    out = affine(ramp, (0.5, 1.0, 1.0), (0, 0, 0))
    assert_close(out[0, 0], torch.full((8, 6), 5.0), atol=0)
    assert_close(out[0, n // 2], torch.full((8, 6), c + 5), atol=1e-4)


def test_affine_anisotropic_rotation_keeps_shape():
    # An isotropic blob in a 64x64x32 view is rotation invariant about its centre: any shear from mixing
    # normalised coordinates of different lengths would distort it.
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in (64, 64, 32)), indexing="ij")
    blob = torch.exp(-sum(g**2 for g in grid) / (2 * 5.0**2))[None]
    assert_close(affine(blob, (1, 1, 1), (10, -10, 10)), blob, atol=0.02)


def _gaussian_1d(sigma):
    radius = int(4 * sigma + 0.5)
    w = torch.exp(-0.5 * torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / sigma**2)
    return w / w.sum()


def test_blur_impulse_and_constant():
    x = torch.zeros(1, 21, 21, 21)
    x[0, 10, 10, 10] = 1.0
    sigmas = (0.7, 1.5, 0.0)
    out = blur(x, sigmas)
    wx, wy = _gaussian_1d(0.7), _gaussian_1d(1.5)
    expected = torch.zeros(21, 21, 21, dtype=torch.float64)
    expected[10 - len(wx) // 2 : 11 + len(wx) // 2, 10 - len(wy) // 2 : 11 + len(wy) // 2, 10] = wx[:, None] * wy[None]
    assert_close(out[0], expected.float(), atol=1e-6)
    assert abs(float(out.sum()) - 1.0) < 1e-5
    constant = torch.full((1, 9, 8, 7), 0.25)
    assert_close(blur(constant, (2.0, 2.0, 2.0)), constant, atol=1e-6)  # reflect border keeps constants
    assert_close(blur(x, (0, 0, 0)), x, atol=0)


def test_blur_reflect_border():
    # scipy 'reflect' (d c b a | a b c d): a one-voxel-radius kernel at the edge sees the edge voxel twice.
    x = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1, 1)
    sigma = 0.3  # radius int(1.2 + 0.5) = 1
    w = _gaussian_1d(sigma)
    out = blur(x, (sigma, 0, 0)).flatten()
    assert out[0].item() == pytest.approx(float(w[0] * 1 + w[1] * 1 + w[2] * 2), abs=1e-6)
    assert out[3].item() == pytest.approx(float(w[0] * 4 + w[1] * 8 + w[2] * 8), abs=1e-6)


def test_gamma():
    x = view()
    assert_close(gamma(x, 0.8), x**0.8, atol=1e-6)
    signed = torch.tensor([-4.0, -1.0, 0.0, 0.25, 4.0])
    assert_close(gamma(signed, 0.5), torch.tensor([-2.0, -1.0, 0.0, 0.5, 2.0]), atol=1e-6)


def test_swap_exchanges_patches():
    x = torch.arange(1 * 16 * 8 * 8, dtype=torch.float32).view(1, 16, 8, 8)
    patch = (8, 4, 4)
    out = swap(x, [[[0, 0, 0], [8, 4, 4]]], patch)
    assert_close(out[:, 8:16, 4:8, 4:8], x[:, 0:8, 0:4, 0:4], atol=0)
    assert_close(out[:, 0:8, 0:4, 0:4], x[:, 8:16, 4:8, 4:8], atol=0)
    untouched = torch.ones_like(x, dtype=torch.bool)
    untouched[:, 8:16, 4:8, 4:8] = False
    untouched[:, 0:8, 0:4, 0:4] = False
    assert torch.equal(out[untouched], x[untouched])


def test_swap_preserves_values():
    # Sampled pairs may overlap partially (as in torchio); the multiset is kept when each pair is disjoint.
    x = view((1, 64, 64, 32))
    pairs = sample_swap(gen(1), x.shape[1:], CFG)
    patch = torch.tensor(CFG.swap_patch)
    disjoint = ((pairs[:, 0] - pairs[:, 1]).abs() >= patch).any(dim=1)
    out = swap(x, pairs[disjoint], CFG.swap_patch)
    assert torch.equal(out.flatten().sort().values, x.flatten().sort().values)
    assert not torch.equal(out, x)


def test_sample_swap_bounds():
    shape = (64, 64, 32)
    pairs = sample_swap(gen(0), shape, CFG)
    assert pairs.shape == (CFG.swap_iterations, 2, 3)
    upper = torch.tensor(shape) - torch.tensor(CFG.swap_patch) - 1  # torchio never draws the last start
    assert (pairs >= 0).all() and (pairs <= upper).all()
    assert not (pairs[:, 0] == pairs[:, 1]).all(dim=1).any()
    tight = sample_swap(gen(0), (8, 6, 4), CFG)  # only y can move, to start 0 or 1
    assert (tight[..., 0] == 0).all() and (tight[..., 2] == 0).all()
    assert torch.equal(tight[:, :, 1].sort(dim=1).values, torch.tensor([[0, 1]]).expand(CFG.swap_iterations, 2))
    with pytest.raises(ValueError, match="larger than the view"):
        sample_swap(gen(0), (4, 4, 4), CFG)
    with pytest.raises(ValueError, match="fewer than two"):
        sample_swap(gen(0), (8, 5, 4), CFG)


def test_z_normalize():
    x = view() * 3 + 2
    out = z_normalize(x)
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std()) - 1) < 1e-5
    assert_close(z_normalize(torch.full((1, 4, 4, 4), 0.7)), torch.zeros(1, 4, 4, 4), atol=0)


# ------------------------------------------------------------------------------------------ samplers


def test_sampler_ranges():
    g = gen(0)
    flips = [sample_flip(g, CFG) for _ in range(400)]
    assert set(flips) == {(), (0,)}
    assert 150 < sum(f == (0,) for f in flips) < 250
    for _ in range(100):
        scales, degrees = sample_affine(g, CFG)
        assert ((scales >= 0.9) & (scales <= 1.1)).all() and (degrees.abs() <= 10).all()
        assert ((sample_blur(g, CFG) >= 0) & (sample_blur(g, CFG) <= 2)).all()
        assert 0 <= sample_noise(g, CFG) <= 0.25
        assert math.exp(-0.3) <= sample_gamma(g, CFG) <= math.exp(0.3)


def test_pipelines_deterministic():
    x = view((1, 64, 64, 32))
    a = intensity_augment(spatial_augment(x, gen(5), CFG), gen(6), CFG, with_swap=True)
    b = intensity_augment(spatial_augment(x, gen(5), CFG), gen(6), CFG, with_swap=True)
    c = intensity_augment(spatial_augment(x, gen(5), CFG), gen(7), CFG, with_swap=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1) < 1e-4


# ------------------------------------------------------------------------------------------- torchio


@pytest.mark.parametrize(
    "scales, degrees",
    [((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), ((1.1, 0.9, 1.05), (7.0, -4.0, 9.0)), ((0.9, 0.95, 1.1), (-10.0, 10.0, 3.0))],
)
def test_affine_matches_torchio(scales, degrees):
    tio = requirements.importorskip("torchio", "torchio")
    x = view((1, 20, 18, 12))
    expected = tio.Affine(scales=scales, degrees=degrees, translation=(0, 0, 0))(x)
    assert_close(affine(x, scales, degrees), expected, atol=1e-5)


def test_intensity_ops_match_torchio():
    tio = requirements.importorskip("torchio", "torchio")
    x = view((1, 20, 18, 12))
    assert_close(flip(x, (0,)), tio.Flip(axes=(0,))(x), atol=0)
    for sigmas in [(0.5, 1.3, 2.0), (0.0, 1.0, 0.2)]:
        assert_close(blur(x, sigmas), tio.Blur(std=sigmas)(x), atol=1e-5)
    signed = x - 0.3
    assert_close(gamma(signed, 1.2), tio.Gamma(gamma=1.2)(signed), atol=1e-6)
    assert_close(gamma(x, 0.8), tio.Gamma(gamma=0.8)(x), atol=1e-6)
    pairs = [((0, 0, 0), (8, 4, 4)), ((10, 12, 6), (2, 5, 0))]
    assert_close(swap(x, pairs, (8, 4, 4)), tio.Swap(patch_size=(8, 4, 4), locations=pairs)(x), atol=0)
    assert_close(z_normalize(x), tio.ZNormalization()(x), atol=1e-5)


# ------------------------------------------------------------------------------------- noise fields


def test_normal_field_is_a_pure_function_of_the_seed():
    from pcrlv2_fast.data.augment import normal_field

    for backend in ("torch", "auto"):
        a = normal_field([5, 2**61 + 3], (6, 7, 5), impl=backend)
        assert a.shape == (2, 6, 7, 5) and a.dtype == torch.float32
        assert torch.equal(a, normal_field([5, 2**61 + 3], (6, 7, 5), impl=backend))
        # Fields do not depend on their neighbours.
        assert torch.equal(a[1], normal_field([2**61 + 3], (6, 7, 5), impl=backend)[0])
        assert not torch.equal(a[0], a[1])
        # The same flat index gives the same value whatever the shape: the field is indexed in C order.
        assert torch.equal(normal_field([5], (210,), impl=backend)[0], a[0].reshape(-1))
    with pytest.raises(ValueError, match="impl"):
        normal_field([1], (2, 2, 2), impl="numpy")


def test_normal_field_is_standard_normal():
    from pcrlv2_fast.data.augment import normal_field

    seeds = torch.arange(40) * 7919 + 3
    z = normal_field(seeds, (64, 64, 8), impl="torch").double()  # 1.3 M values
    assert abs(float(z.mean())) < 3e-3 and abs(float(z.std()) - 1) < 3e-3
    # Kolmogorov-Smirnov distance to the normal CDF on a subsample (critical value at 1e-3: 1.95 / sqrt(n)).
    sample = z.reshape(-1)[::13].sort().values
    n = sample.numel()
    cdf = 0.5 * (1 + torch.erf(sample / 2**0.5))
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert float(ks) < 1.95 / n**0.5, float(ks)
    # Third and fourth moments, neighbours along z and across fields uncorrelated.
    assert abs(float((z**3).mean())) < 0.02 and abs(float((z**4).mean()) - 3) < 0.03
    assert abs(float((z[..., 1:] * z[..., :-1]).mean())) < 4e-3
    assert abs(float((z[1:] * z[:-1]).mean())) < 4e-3
    assert float(z.abs().max()) < 6.5


def test_noise_seed_drives_apply_intensity():
    from pcrlv2_fast.data.augment import apply_intensity, normal_field, z_normalize

    x = torch.rand(1, 9, 8, 7, generator=gen(1))
    params = {"sigmas": torch.zeros(3, dtype=torch.float64), "noise_std": 0.2, "noise_seed": 77, "gamma": 1.0}
    expected = z_normalize(x + normal_field([77], x.shape[1:]) * 0.2)
    assert_close(apply_intensity(x, params, AugmentConfig()), expected, atol=1e-6)
    other = apply_intensity(x, {**params, "noise_seed": 78}, AugmentConfig())
    assert (other - expected).abs().max() > 0.1
