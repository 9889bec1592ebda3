"""The DALI loader against the torch batch loader: same boxes, same parameters, views equal within tolerance.

Tolerances (absolute; maxima measured on the phantoms in brackets, including an 80-sample sweep):

- no augmentation: ``gt`` 1e-6 (1.2e-7: fn.resize and F.interpolate agree to float rounding); ``x1``/``x2``
  1e-5 (7e-7); ``locals`` 1e-4 (4e-5: fn.normalize takes float32 statistics, which on low-contrast 16^3
  views moves z-scores by a few 1e-5, where the torch path uses float64).
- default augmentation: ``gt`` 1e-4 (2.4e-5): fn.warp_affine's float32 source coordinates are within ~5e-5
  voxel of the torch grid's and a [0, 1] view changes by at most 1 per voxel; ``x1``/``x2``/``locals`` 1e-3
  (2.4e-4): that difference after blur, noise, gamma and division by the view's standard deviation.
- identity affine, no blur, noise or gamma (flips and swaps still drawn): ``gt`` 1e-5 (2.7e-6: DALI samples
  whole voxels exactly, the torch grid's unnormalisation rounds), ``x1``/``x2`` 1e-4 (1.3e-5), ``locals`` 1e-4.
"""

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pcrlv2_fast.data import AugmentConfig, BatchLoader, PretrainDataset
from tests import requirements
from tests.helpers import assert_close

requirements.importorskip("nvidia.dali", "dali")

from pcrlv2_fast.data.dali import DaliLoader, dali_available, dali_load_error  # noqa: E402

BATCHES = [[0, 5, 2], [7, 1]]
IDENTITY = AugmentConfig(flip_axes=(0, 1, 2), scales=(1.0, 1.0), degrees=(0.0, 0.0), blur_std=(0.0, 0.0),
                         noise_std=(0.0, 0.0), log_gamma=(0.0, 0.0))
TOL_PLAIN = {"gt": 1e-6, "x1": 1e-5, "x2": 1e-5, "locals": 1e-4}
TOL_AUGMENT = {"gt": 1e-4, "x1": 1e-3, "x2": 1e-3, "locals": 1e-3}
TOL_IDENTITY = {"gt": 1e-5, "x1": 1e-4, "x2": 1e-4, "locals": 1e-4}


def assert_batches_close(expected: dict, got: dict, tol: dict) -> None:
    assert set(got) == set(expected)
    for key in ("global_boxes", "local_boxes", "volume_index"):
        assert got[key].dtype == torch.int64 and torch.equal(got[key], expected[key]), key
    for key, atol in tol.items():
        assert got[key].dtype == torch.float32 and got[key].shape == expected[key].shape, key
        assert got[key].is_contiguous(), key
        assert_close(got[key], expected[key], atol=atol, what=key)


def compare(volumes, tol, augment=True, cfg=None, batches=BATCHES, **loader_kw):
    dataset = PretrainDataset(volumes, seed=3, pairs_per_volume=4, augment=augment, augment_cfg=cfg)
    dataset.set_epoch(1)
    expected = list(BatchLoader(dataset, "torch").batches(batches))
    got = list(DaliLoader(dataset, num_threads=1, **loader_kw).batches(batches))
    assert len(got) == len(batches)
    for ref, out in zip(expected, got, strict=True):
        assert_batches_close(ref, out, tol)
    return got


def test_dali_is_available():
    assert dali_available() and dali_load_error() is None


def test_without_augmentation(phantom_volumes):
    got = compare(phantom_volumes, TOL_PLAIN, augment=False)
    assert got[0]["x1"].shape == (3, 1, 64, 64, 32) and got[0]["locals"].shape == (3, 6, 1, 16, 16, 16)


def test_with_augmentation(phantom_volumes):
    # The spatial and intensity parameters, the noise fields and the swaps are the ones the torch loader draws.
    compare(phantom_volumes, TOL_AUGMENT)


def test_identity_augmentation_is_tighter(phantom_volumes):
    compare(phantom_volumes, TOL_IDENTITY, cfg=IDENTITY)


@pytest.mark.parametrize("storage", ["int16", "float16", "mixed", "float16-plain"])
def test_raw_storage_dtypes_and_windows(phantom_volumes, storage):
    """Cache-style volumes: int16 HU and float16 values with a window (clip + scale before the resize), a mix of
    both (cut as float32), and float16 values already in [0, 1] (window (0, 1): only a cast)."""
    hu = [dataclasses.replace(v, array=np.round(v.array * 2000 - 1000).astype(np.int16), window=(-1000.0, 1000.0))
          for v in phantom_volumes]
    half = [dataclasses.replace(v, array=(v.array * 4 - 2).astype(np.float16), window=(-1.5, 1.5))
            for v in phantom_volumes]
    plain = [dataclasses.replace(v, array=v.array.astype(np.float16)) for v in phantom_volumes]
    volumes = {"int16": hu, "float16": half, "mixed": [hu[0], half[1]], "float16-plain": plain}[storage]
    compare(volumes, TOL_AUGMENT, batches=[[0, 3]])
    compare(volumes, TOL_PLAIN, augment=False, batches=[[2, 1]])


def test_batches_larger_than_the_pipelines_and_repeated(phantom_volumes):
    """A batch above ``batch_size`` rebuilds the pipelines once; a repeated batch gives the same tensors."""
    dataset = PretrainDataset(phantom_volumes, seed=0, pairs_per_volume=3)
    loader = DaliLoader(dataset, num_threads=1, batch_size=1)
    first = loader.batch([4])
    big = loader.batch([1, 4])
    assert loader.capacity == 2
    assert torch.equal(big["x1"][1], first["x1"][0]) and torch.equal(big["locals"][1], first["locals"][0])
    again = loader.batch([1, 4])
    for key in big:
        assert torch.equal(again[key], big[key]), key


def test_errors(phantom_volumes):
    dataset = PretrainDataset(phantom_volumes, seed=0, pairs_per_volume=2)
    loader = DaliLoader(dataset, num_threads=1)
    with pytest.raises(ValueError, match="at least one index"):
        loader.batch([])
    with pytest.raises(IndexError, match="out of range"):
        loader.batch([0, len(dataset)])
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        DaliLoader(dataset, device="meta")
    with pytest.raises(ValueError, match="num_threads"):
        DaliLoader(dataset, num_threads=0)
    with pytest.raises(ValueError, match="batch_size"):
        DaliLoader(dataset, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DaliLoader(dataset, device="cuda")


def test_import_without_dali():
    """pcrlv2_fast imports without DALI; the loader then says how to install it."""
    code = textwrap.dedent("""
        import sys
        sys.modules["nvidia.dali"] = None  # any import of DALI now fails
        import pcrlv2_fast, pcrlv2_fast.data
        from pcrlv2_fast.data import PretrainDataset
        from pcrlv2_fast.data.dali import DaliLoader, dali_available, dali_load_error
        assert not dali_available()
        assert dali_load_error().startswith("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda120")
        try:
            DaliLoader(None)
        except RuntimeError as exc:
            assert "pip install nvidia-dali-cuda120" in str(exc), exc
        else:
            raise AssertionError("DaliLoader without DALI did not raise")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pipeline_matches_cpu(phantom_volumes):
    dataset = PretrainDataset(phantom_volumes, seed=3, pairs_per_volume=4)
    cpu = DaliLoader(dataset, num_threads=1).batch([0, 5, 2])
    gpu = DaliLoader(dataset, device="cuda", num_threads=2).batch([0, 5, 2])
    for key in gpu:
        assert gpu[key].device.type == ("cuda" if gpu[key].is_floating_point() else "cpu"), key
    assert_batches_close(cpu, {k: v.cpu() for k, v in gpu.items()}, TOL_AUGMENT)
