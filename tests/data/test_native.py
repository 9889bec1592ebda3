"""The native C++ crop_resize kernel against the plain-PyTorch reference, element-wise."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pcrlv2_fast.data import native
from pcrlv2_fast.reference.crop_resize import reference_crop_resize
from tests import requirements
from tests.helpers import assert_close

needs_native = requirements.needs("native", native.available(), f"native extension unavailable: {native.load_error()}")

WINDOW = (-1000.0, 1000.0)
SHAPE = (40, 36, 30)


def ct_volume(shape=SHAPE, dtype=np.int16, seed: int = 0) -> np.ndarray:
    """Random HU values that overshoot the window on both sides, so clipping is exercised."""
    return np.random.default_rng(seed).integers(-1200, 1400, size=shape).astype(dtype)


def box_inside(shape, size, rng) -> list[int]:
    start = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
    return [*start, *size]


CASES = [  # (box size, out size): up- and down-sampling, odd sizes, sizes equal to the output, mixed
    ((7, 5, 9), (16, 16, 16)),
    ((16, 16, 16), (16, 16, 16)),
    ((32, 32, 16), (16, 16, 16)),
    ((33, 21, 29), (8, 11, 7)),
    ((24, 24, 24), (64, 8, 13)),
    ((1, 1, 1), (3, 2, 4)),
    ((40, 36, 30), (40, 36, 30)),
]


@needs_native
@pytest.mark.parametrize("dtype", [np.int16, np.float16, np.float32])
@pytest.mark.parametrize(("size", "out_size"), CASES)
def test_matches_reference(dtype, size, out_size, simd_path):
    volume = ct_volume(dtype=dtype)
    rng = np.random.default_rng(1)
    boxes = np.array([box_inside(SHAPE, size, rng) for _ in range(3)])
    got = native.crop_resize(volume, boxes, out_size, WINDOW)
    assert got.dtype == torch.float32 and got.shape == (3, 1, *out_size)
    assert_close(got, reference_crop_resize(volume, boxes, out_size, WINDOW), what=f"{dtype.__name__} {size}")


@needs_native
@pytest.mark.parametrize(("size", "out_size"), [((12, 10, 100), (6, 5, 30)), ((12, 10, 200), (6, 5, 20)),
                                                ((5, 6, 64), (3, 4, 32))])
def test_long_z_downsampling(size, out_size, simd_path):
    # 16 outputs along z span 33-64 inputs (four-register permutes), more than 64 (gathers), exactly 32.
    volume = ct_volume(shape=(20, 20, 210), seed=3)
    boxes = np.array([box_inside(volume.shape, size, np.random.default_rng(k)) for k in range(2)])
    got = native.crop_resize(volume, boxes, out_size, WINDOW)
    assert_close(got, reference_crop_resize(volume, boxes, out_size, WINDOW), what=f"{size}")


@needs_native
def test_official_crop_sizes(simd_path):
    volume = ct_volume(shape=(120, 116, 100))
    rng = np.random.default_rng(5)
    for sizes, out_size in ([(96, 96, 64), (96, 96, 96), (112, 112, 64), (64, 64, 32)], (64, 64, 32)), \
                           ([(32, 32, 16), (16, 16, 16), (32, 32, 32), (8, 8, 8)], (16, 16, 16)):
        boxes = np.array([box_inside(volume.shape, s, rng) for s in sizes])
        got = native.crop_resize(volume, boxes, out_size, WINDOW)
        assert_close(got, reference_crop_resize(volume, boxes, out_size, WINDOW), what=f"{sizes}")


@needs_native
def test_boxes_touching_every_edge():
    volume = ct_volume(dtype=np.float32)
    x, y, z = SHAPE
    boxes = [[0, 0, 0, 9, 8, 7], [x - 9, y - 8, z - 7, 9, 8, 7], [0, y - 5, 0, x, 5, z], [x - 1, 0, z - 1, 1, y, 1]]
    got = native.crop_resize(volume, boxes, (12, 6, 10), (-500, 800))
    assert_close(got, reference_crop_resize(volume, boxes, (12, 6, 10), (-500, 800)))


@needs_native
def test_float16_conversion_of_every_finite_value():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(np.float16)
    values = values[np.isfinite(values)]  # NaN/Inf voxels are unspecified in the kernel; caches are finite
    volume = values.reshape(1, 1, -1)
    box = [[0, 0, 0, *volume.shape]]
    for window in ((-70000.0, 70000.0), (-1e-6, 1e-6), (-2.0, 3.0)):  # all, around subnormals, a narrow range
        got = native.crop_resize(volume, box, volume.shape, window)
        assert_close(got, reference_crop_resize(volume, box, volume.shape, window), what=f"window {window}")


@needs_native
def test_read_only_memmap_is_read_in_place(tmp_path):
    path = tmp_path / "ct.npy"
    np.save(path, ct_volume())
    volume = np.load(path, mmap_mode="r")
    assert isinstance(volume, np.memmap) and not volume.flags.writeable
    boxes = [[2, 3, 4, 20, 17, 11], [0, 0, 0, 40, 36, 30]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning escapes
        got = native.crop_resize(volume, boxes, (16, 16, 16), WINDOW)
    assert_close(got, reference_crop_resize(volume, boxes, (16, 16, 16), WINDOW))


@needs_native
def test_strided_volume_views():
    base = ct_volume(shape=(30, 40, 36), dtype=np.float32)
    boxes = [[1, 2, 3, 12, 9, 14]]
    for view in (base.transpose(2, 0, 1), base[:, ::2, :], np.asfortranarray(base)):
        got = native.crop_resize(view, boxes, (8, 10, 9), WINDOW)
        assert_close(got, reference_crop_resize(view, boxes, (8, 10, 9), WINDOW))
    with pytest.raises(ValueError, match="negative strides"):
        native.crop_resize(base[::-1], boxes, (8, 8, 8), WINDOW)


@needs_native
def test_bfloat16_output_is_the_rounded_float32_result():
    volume = ct_volume()
    boxes = [[0, 0, 0, 32, 32, 16], [5, 3, 2, 7, 5, 9]]
    f32 = native.crop_resize(volume, boxes, (16, 16, 16), WINDOW)
    bf16 = native.crop_resize(volume, boxes, (16, 16, 16), WINDOW, out_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, f32.to(torch.bfloat16))
    # within half a bfloat16 ulp of values in [0, 1] (2^-9), plus the float32 tolerance
    assert_close(bf16.float(), reference_crop_resize(volume, boxes, (16, 16, 16), WINDOW), atol=2**-9 + 1e-5)


@needs_native
def test_out_argument():
    volume = ct_volume()
    boxes = [[1, 1, 1, 10, 12, 14], [3, 0, 2, 20, 20, 20]]
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((2, 1, 8, 8, 8), -1.0, dtype=dtype)
        got = native.crop_resize(volume, boxes, (8, 8, 8), WINDOW, out=out)
        assert got is out
        assert torch.equal(out, native.crop_resize(volume, boxes, (8, 8, 8), WINDOW, out_dtype=dtype))
    # a view into a larger batch buffer: the first two of four slots
    buffer = torch.zeros(4, 1, 8, 8, 8)
    native.crop_resize(volume, boxes, (8, 8, 8), WINDOW, out=buffer[:2])
    assert_close(buffer[:2], reference_crop_resize(volume, boxes, (8, 8, 8), WINDOW))
    assert not buffer[2:].any()
    bad_outs = [torch.empty(2, 1, 8, 8, 7), torch.empty(2, 1, 8, 8, 8, dtype=torch.float16),
                torch.empty(2, 1, 8, 8, 16)[..., ::2]]
    for out in bad_outs:
        with pytest.raises(ValueError, match="out must be"):
            native.crop_resize(volume, boxes, (8, 8, 8), WINDOW, out=out)
    with pytest.raises(ValueError, match="out must be"):
        native.crop_resize(volume, boxes, (8, 8, 8), WINDOW, out_dtype=torch.bfloat16, out=torch.empty(2, 1, 8, 8, 8))


@needs_native
@pytest.mark.parametrize(
    ("boxes", "match"),
    [
        ([[0, 0, 0, 41, 4, 4]], r"box 0 .*\(0, 0, 0, 41, 4, 4\)"),
        ([[1, 1, 1, 4, 4, 4], [-1, 0, 0, 4, 4, 4]], r"box 1 .*\(-1, 0, 0, 4, 4, 4\)"),
        ([[0, 0, 0, 4, 0, 4]], "box 0"),
        ([[0, 30, 0, 4, 7, 4]], r"box 0 .*shape \(40, 36, 30\)"),
        ([[0, 0, 27, 4, 4, 4]], "box 0"),
        ([[0, 0, 0, 4, 4]], r"shape \(N, 6\)"),
        ([[0.0, 0.0, 0.0, 4.0, 4.0, 4.0]], "integer"),
    ],
)
def test_invalid_boxes_raise_value_error(boxes, match):
    with pytest.raises(ValueError, match=match):
        native.crop_resize(ct_volume(), boxes, (4, 4, 4), WINDOW)


@needs_native
def test_invalid_arguments_raise_value_error():
    volume, boxes = ct_volume(), [[0, 0, 0, 4, 4, 4]]
    for kwargs, match in [
        ({"window": (1.0, 1.0)}, "window"),
        ({"out_size": (4, 0, 4)}, "out_size"),
        ({"out_size": (4, 4)}, "out_size"),
        ({"out_dtype": torch.float16}, "out_dtype"),
        ({"num_threads": 0}, "num_threads"),
    ]:
        args = {"out_size": (4, 4, 4), "window": WINDOW, **kwargs}
        with pytest.raises(ValueError, match=match):
            native.crop_resize(volume, boxes, **args)
    for bad in (volume.astype(np.int32), volume[0], volume.astype(">i2")):
        with pytest.raises(ValueError, match="volume"):
            native.crop_resize(bad, boxes, (4, 4, 4), WINDOW)


@needs_native
def test_no_boxes():
    got = native.crop_resize(ct_volume(), np.zeros((0, 6), np.int64), (4, 5, 6), WINDOW)
    assert got.shape == (0, 1, 4, 5, 6)


@needs_native
def test_many_boxes_on_several_threads_are_deterministic():
    volume = ct_volume(shape=(64, 60, 48))
    rng = np.random.default_rng(7)
    sizes = [(32, 32, 16), (16, 16, 16), (32, 32, 32), (8, 8, 8), (19, 23, 17)]
    boxes = np.array([box_inside(volume.shape, sizes[i % len(sizes)], rng) for i in range(50)])
    expected = reference_crop_resize(volume, boxes, (16, 16, 16), WINDOW)
    one = native.crop_resize(volume, boxes, (16, 16, 16), WINDOW, num_threads=1)
    assert_close(one, expected)
    for threads in (2, 3):
        assert torch.equal(native.crop_resize(volume, boxes, (16, 16, 16), WINDOW, num_threads=threads), one)


@needs_native
def test_concurrent_python_threads():
    # The kernel releases the GIL; calls from several Python threads (DataLoader-style) stay correct.
    volume = ct_volume()
    rng = np.random.default_rng(3)
    jobs = [np.array([box_inside(SHAPE, (12, 10, 14), rng) for _ in range(6)]) for _ in range(4)]
    results = [None] * len(jobs)

    def work(i):
        for _ in range(5):
            results[i] = native.crop_resize(volume, jobs[i], (9, 9, 9), WINDOW, num_threads=1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for boxes, got in zip(jobs, results):
        assert_close(got, reference_crop_resize(volume, boxes, (9, 9, 9), WINDOW))


def test_reference_known_values():
    volume = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    # 2 -> 1 along every axis averages all 8 voxels; window (0, 7) maps v to v / 7
    got = reference_crop_resize(volume, [[0, 0, 0, 2, 2, 2]], (1, 1, 1), (0.0, 7.0))
    assert got.shape == (1, 1, 1, 1, 1) and got.item() == pytest.approx(3.5 / 7)
    # same size: the windowed crop itself, clipped to [0, 1]
    got = reference_crop_resize(volume, [[0, 0, 0, 2, 2, 2]], (2, 2, 2), (2.0, 5.0))
    assert torch.allclose(got[0, 0], torch.from_numpy(np.clip((volume - 2) / 3, 0, 1)))


def test_missing_extension_gives_clear_error():
    # Simulate an install without the extension: importing pcrlv2_fast._C fails.
    code = (
        "import sys; sys.modules['pcrlv2_fast._C'] = None\n"
        "import numpy as np\n"
        "from pcrlv2_fast.data import native\n"
        "assert not native.available()\n"
        "msg = native.load_error()\n"
        "assert msg.startswith('C++ extension pcrlv2_fast._C was not built: '), msg\n"
        "assert 'install a C++ compiler (g++) and reinstall' in msg and '--loader torch' in msg, msg\n"
        "try:\n"
        "    native.crop_resize(np.zeros((4, 4, 4), np.int16), [[0, 0, 0, 2, 2, 2]], (2, 2, 2), (0, 1))\n"
        "except RuntimeError as exc:\n"
        "    assert str(exc) == msg\n"
        "else:\n"
        "    raise AssertionError('no RuntimeError')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_native
def test_benchmark_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "benchmark_crop_resize.py"
    args = ["--shape", "120", "120", "100", "--boxes", "2", "--repeats", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["view"], r["provider"]) for r in rows] == [
        (v, p) for v in ("global", "local") for p in ("torch", "native", "native_out")]
    for r in rows:
        assert r["name"] == "crop_resize" and r["crops_per_s"] > 0 and r["device"] and r["torch"] and r["date"]


# ------------------------------------------------------------------------------------------- affine


def _affine_reference(x: torch.Tensor, scales, degrees, flips) -> torch.Tensor:
    """augment.flip then augment.affine, view by view."""
    from pcrlv2_fast.data import augment

    views = []
    for n in range(x.shape[0]):
        axes = [a for a in range(3) if bool(flips[n, a])]
        views.append(augment.affine(augment.flip(x[n], axes), scales[n], degrees[n]))
    return torch.stack(views)


def _affine_params(n: int, seed: int, flip_all: bool = False):
    from pcrlv2_fast.data.augment import AugmentConfig, sample_affine

    generator = torch.Generator().manual_seed(seed)
    cfg = AugmentConfig()
    drawn = [sample_affine(generator, cfg) for _ in range(n)]
    scales = torch.stack([s for s, _ in drawn])
    degrees = torch.stack([d for _, d in drawn])
    flips = torch.ones(n, 3, dtype=torch.bool) if flip_all else torch.rand(n, 3, generator=generator) < 0.5
    return scales, degrees, flips


@pytest.fixture(params=["wide", "portable"])
def simd_path(request):
    """Runs a test on the kernels' AVX-512 paths and on their portable paths (the same where no AVX-512)."""
    if request.param == "wide":
        yield request.param
    else:
        with native.portable_simd():
            yield request.param


@needs_native
@pytest.mark.parametrize("shape", [(64, 64, 32), (16, 16, 16), (17, 9, 23), (5, 12, 7), (3, 6, 2)])
@pytest.mark.parametrize("flip_all", [False, True])
def test_affine_matches_augment(shape, flip_all, simd_path):
    n = 6
    x = torch.rand((n, 1, *shape), generator=torch.Generator().manual_seed(sum(shape)))
    scales, degrees, flips = _affine_params(n, seed=len(shape) + shape[0], flip_all=flip_all)
    maps = native.affine_maps(scales, degrees, shape)
    got = native.affine(x, maps, flips=flips, num_threads=2)
    assert got.dtype == torch.float32 and got.shape == x.shape
    # More threads than views: the work is split into (view, x) slabs instead; same values.
    assert torch.equal(native.affine(x, maps, flips=flips, num_threads=n + 2), got)
    assert_close(got, _affine_reference(x, scales, degrees, flips), what=f"affine {shape}")


@needs_native
def test_affine_wide_angles_and_scales_fill_with_sample_minimum(simd_path):
    # Large rotations / small scales put many output voxels outside: they get each sample's own minimum.
    shape = (20, 18, 12)
    x = torch.rand((4, 1, *shape), generator=torch.Generator().manual_seed(3)) + torch.arange(4.0).view(4, 1, 1, 1, 1)
    scales = torch.tensor([[0.5, 0.7, 0.6], [1.3, 0.8, 1.0], [1.0, 1.0, 1.0], [0.9, 1.1, 0.95]], dtype=torch.float64)
    degrees = torch.tensor([[40.0, -30.0, 75.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-120.0, 10.0, 5.0]],
                           dtype=torch.float64)
    flips = torch.tensor([[True, False, True], [False, True, False], [False, False, False], [True, True, True]])
    got = native.affine(x, native.affine_maps(scales, degrees, shape), flips=flips)
    expected = _affine_reference(x, scales, degrees, flips)
    assert_close(got, expected, what="wide")
    # Identity map: the input, up to the float32 grid's rounding (the reference's own: ~1e-6 on values ~3).
    torch.testing.assert_close(got[2], x[2], rtol=0, atol=2e-6)
    assert (got[0] == x[0].min()).any()


@needs_native
def test_affine_out_and_errors():
    x = torch.rand(3, 1, 8, 6, 4)
    scales, degrees, flips = _affine_params(3, seed=1)
    maps = native.affine_maps(scales, degrees, (8, 6, 4))
    out = torch.empty_like(x)
    assert native.affine(x, maps, out=out, flips=flips) is out
    torch.testing.assert_close(out, native.affine(x, maps, flips=flips, num_threads=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="maps"):
        native.affine(x, maps[:2])
    with pytest.raises(ValueError, match="flips"):
        native.affine(x, maps, flips=flips[:, :2])
    with pytest.raises(ValueError, match="x must be"):
        native.affine(x.double(), maps)
    with pytest.raises(ValueError, match="out must be"):
        native.affine(x, maps, out=x)
    with pytest.raises(ValueError, match="num_threads"):
        native.affine(x, maps, num_threads=0)
    empty = torch.empty(0, 1, 8, 6, 4)
    assert native.affine(empty, torch.empty(0, 3, 4, dtype=torch.float64)).shape == empty.shape


# ------------------------------------------------------------------------------------ fused intensity


def _intensity_reference(x: torch.Tensor, params: dict, cfg) -> torch.Tensor:
    """augment.apply_intensity, view by view."""
    from pcrlv2_fast.data import augment

    return torch.stack([augment.apply_intensity(x[i], augment.view_params(params, i), cfg) for i in range(len(x))])


@needs_native
def test_normal_field_matches_reference():
    from pcrlv2_fast.data.augment import normal_field

    seeds = torch.tensor([0, 1, 2**40 + 5, 2**62 - 1, 123456789])
    for shape in [(64, 64, 32), (3, 5, 7)]:
        ref = normal_field(seeds, shape, impl="torch")
        got = native.normal_field(seeds, shape, num_threads=2)
        # Same integers and formula; log, cos and sin differ by float32 ulps (values up to ~5.5).
        assert_close(got, ref, atol=4e-6, what=f"field {shape}")


@needs_native
@pytest.mark.parametrize("shape, with_swap", [((64, 64, 32), True), ((16, 16, 16), False), ((9, 12, 10), True),
                                              ((5, 3, 7), False), ((6, 5, 40), True)])
def test_intensity_matches_apply_intensity(shape, with_swap, simd_path):
    from pcrlv2_fast.data.augment import AugmentConfig, draw_sample_params

    cfg = AugmentConfig(swap_patch=(4, 2, 2) if shape[0] < 20 else (8, 4, 4), blur_std=(0.0, 3.0))
    n = 4
    params, _ = draw_sample_params(torch.Generator().manual_seed(sum(shape)), cfg, shape, shape, 0)
    params = {k: (torch.cat([v, v.flip(0)]) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
    params["sigmas"][1] = torch.tensor([0.0, 2.9, 1e-16], dtype=torch.float64)  # skipped axes; radius > size
    if not with_swap:
        params.pop("swap")
    x = torch.rand((n, 1, *shape), generator=torch.Generator().manual_seed(1)) * 3 - 1  # negative values too
    got = native.intensity(x, params, num_threads=2)
    assert_close(got, _intensity_reference(x, params, cfg), atol=2e-5, what=f"intensity {shape}")
    # Thread count does not change the result.
    torch.testing.assert_close(native.intensity(x, params, num_threads=1), got, rtol=0, atol=0)


@needs_native
def test_intensity_constant_view_out_and_errors():
    from pcrlv2_fast.data.augment import AugmentConfig, draw_sample_params

    cfg = AugmentConfig()
    params, _ = draw_sample_params(torch.Generator().manual_seed(0), cfg, (16, 16, 8), (8, 8, 8), 0)
    x = torch.rand(2, 1, 16, 16, 8)
    flat = {**params, "noise_std": torch.zeros(2, dtype=torch.float64)}
    x[1] = 0.25  # constant after blur, no noise: z-normalised to zeros (torchio would raise)
    out = torch.empty_like(x)
    assert native.intensity(x, flat, out=out) is out
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out[0], _intensity_reference(x[:1], {k: (v[:1] if isinstance(v, torch.Tensor) else v)
                                                      for k, v in flat.items()}, cfg)[0], atol=2e-5)
    in_place = x.clone()
    assert native.intensity(in_place, flat, out=in_place) is in_place
    torch.testing.assert_close(in_place, out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sigmas"):
        native.intensity(x, {**params, "sigmas": params["sigmas"][:1]})
    with pytest.raises(ValueError, match="swap"):
        native.intensity(x, {**params, "swap": params["swap"] + 100})
    with pytest.raises(ValueError, match="x must be"):
        native.intensity(x.double(), params)
    with pytest.raises(ValueError, match="out must be"):
        native.intensity(x, params, out=torch.empty(2, 1, 16, 16, 7))
    with pytest.raises(ValueError, match="num_threads"):
        native.intensity(x, params, num_threads=0)


def _views_case(n: int, shape, seed: int, with_swap: bool):
    from pcrlv2_fast.data.augment import AugmentConfig, draw_sample_params

    rng = np.random.default_rng(seed)
    volumes = [rng.integers(-1200, 1500, (50, 44, 40)).astype(np.int16),
               rng.random((40, 52, 36)).astype(np.float32),
               (rng.random((45, 40, 48)) * 4 - 1).astype(np.float16)]
    windows = [(-1000.0, 1000.0), (0.0, 1.0), (-0.5, 2.0)]
    volume_index = rng.integers(0, 3, n)
    boxes = []
    for k in volume_index:
        vshape = np.array(volumes[k].shape)
        size = rng.integers(np.minimum(shape, vshape) // 2, vshape + 1)
        start = rng.integers(0, vshape - size + 1)
        boxes.append([*start, *size])
    cfg = AugmentConfig(swap_patch=(4, 2, 2))
    generator = torch.Generator().manual_seed(seed)
    drawn = [draw_sample_params(generator, cfg, shape, shape, 0)[0] for _ in range((n + 1) // 2)]
    params = {k: torch.cat([d[k] for d in drawn])[:n] for k in drawn[0] if isinstance(drawn[0][k], torch.Tensor)}
    params["swap_patch"] = drawn[0]["swap_patch"]
    if not with_swap:
        params.pop("swap")
    return volumes, windows, volume_index, np.array(boxes, dtype=np.int64), params


@needs_native
@pytest.mark.parametrize("shape, with_swap", [((16, 12, 20), True), ((8, 8, 8), False), ((10, 6, 40), True)])
def test_views_equal_the_chained_kernels(shape, with_swap, simd_path):
    n = 7
    volumes, windows, volume_index, boxes, params = _views_case(n, shape, seed=sum(shape), with_swap=with_swap)
    kept = torch.full((3, 1, *shape), float("nan"))
    got = native.views(volumes, windows, volume_index, boxes, shape, params, spatial_out=kept, num_threads=2)
    crops = torch.cat([native.crop_resize(volumes[k], boxes[i:i + 1], shape, windows[k])
                       for i, k in enumerate(volume_index)])
    spatial = native.affine(crops, native.affine_maps(params["scales"], params["degrees"], shape),
                            flips=params["flip"])
    assert torch.equal(kept, spatial[:3])
    assert torch.equal(got, native.intensity(spatial, params))
    assert torch.equal(native.views(volumes, windows, volume_index, boxes, shape, params, num_threads=1), got)
    # The processing order changes nothing but the order the views are computed in.
    order = np.random.default_rng(0).permutation(n)
    assert torch.equal(native.views(volumes, windows, volume_index, boxes, shape, params, order=order,
                                    num_threads=2), got)


@needs_native
def test_views_errors():
    shape = (8, 8, 8)
    volumes, windows, volume_index, boxes, params = _views_case(3, shape, seed=5, with_swap=True)
    with pytest.raises(ValueError, match="volume_index"):
        native.views(volumes, windows, np.array([0, 3, 1]), boxes, shape, params)
    bad = boxes.copy()
    bad[1, 0] = 10_000
    with pytest.raises(ValueError, match="does not lie inside"):
        native.views(volumes, windows, volume_index, bad, shape, params)
    with pytest.raises(ValueError, match="windows"):
        native.views(volumes, [(1.0, 0.0)] * 3, volume_index, boxes, shape, params)
    with pytest.raises(ValueError, match="spatial_out"):
        native.views(volumes, windows, volume_index, boxes, shape, params, spatial_out=torch.empty(4, 1, *shape))
    with pytest.raises(ValueError, match="out must be"):
        native.views(volumes, windows, volume_index, boxes, shape, params, out=torch.empty(3, 1, 8, 8, 7))
    with pytest.raises(ValueError, match="swap"):
        native.views(volumes, windows, volume_index, boxes, (3, 3, 3), params)
    with pytest.raises(ValueError, match="permutation"):
        native.views(volumes, windows, volume_index, boxes, shape, params, order=[0, 0, 1])
