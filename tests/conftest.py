"""Shared fixtures: synthetic CT phantoms on disk and the optional real sample data in ../shared/data."""

from __future__ import annotations

import locale
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests import requirements
from tests.requirements import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (CI hooks)

PHANTOM_SPACING = (1.5, 1.5, 2.0)


@pytest.fixture(autouse=True)
def _process_locale_restored():
    """SimpleITK's DICOM writer (used by the DICOM tests to build series) switches the process locale to "C",
    which would make Python's default text encoding ASCII for every later test in the process."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)
# (file name, shape (x, y, z), seed); at 1 mm these become 135x120x104 and 132x126x100 voxels, so every
# official global crop (up to 112x112x96) fits.
PHANTOMS = (("phantom_a.nii.gz", (90, 80, 52), 1), ("phantom_b.nrrd", (88, 84, 50), 2))


def ct_phantom(shape_xyz, spacing=PHANTOM_SPACING, seed: int = 0) -> sitk.Image:
    """An int16 CT phantom in HU: air (-1000) around an ellipsoid body (~0 HU) with a low-density "lung"
    (~-800 HU), a few dense (+300 HU) spheres and Gaussian noise."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape_xyz), indexing="ij")
    x, y, z = grid
    hu = np.full(shape_xyz, -1000.0)
    hu[(x / 0.85) ** 2 + (y / 0.75) ** 2 + (z / 0.9) ** 2 < 1] = 0.0
    hu[((x + 0.35) / 0.3) ** 2 + (y / 0.35) ** 2 + (z / 0.5) ** 2 < 1] = -800.0
    for _ in range(4):
        centre = rng.uniform(-0.4, 0.4, size=3)
        radius = rng.uniform(0.08, 0.18)
        hu[sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) < radius**2] = 300.0
    hu += rng.normal(0.0, 20.0, size=hu.shape)
    image = sitk.GetImageFromArray(np.clip(hu, -1024, 3000).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin((-100.0, -80.0, 40.0))
    return image


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A folder with two small CT phantoms (HU): ``phantom_a.nii.gz`` and ``phantom_b.nrrd``."""
    folder = tmp_path_factory.mktemp("phantoms")
    for name, shape, seed in PHANTOMS:
        sitk.WriteImage(ct_phantom(shape, seed=seed), str(folder / name), useCompression=True)
    return folder


@pytest.fixture(scope="session")
def phantom_volumes(phantom_dir):
    """The two phantoms loaded at 1 mm (list of :class:`pcrlv2_fast.data.Volume`)."""
    from pcrlv2_fast.data import load_volumes

    return load_volumes(phantom_dir, progress=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or ``$PCRLV2_SHARED_DATA``); skips when absent."""
    env = os.environ.get("PCRLV2_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        requirements.skip("shared-data",
                          f"real sample data not present at {path} (set PCRLV2_SHARED_DATA to its folder)")
    return path


# The phantom scans preprocessed once into a cache that every run (in this process, in spawned processes and in
# command-line subprocesses) reads, so all of them draw the same samples.
@pytest.fixture(scope="session")
def phantom_cache(phantom_dir, tmp_path_factory):
    from pcrlv2_fast.data import preprocess

    cache = tmp_path_factory.mktemp("phantom_cache")
    report = preprocess([phantom_dir], cache, progress=False)
    assert len(report.names) == 2, report.table()
    return cache


@pytest.fixture(scope="session")
def cache_volumes(phantom_cache):
    from pcrlv2_fast.data import open_cache

    return open_cache(phantom_cache)
