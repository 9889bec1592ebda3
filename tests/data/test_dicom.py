"""DICOM series folders: geometry of good series, and every kind of broken series refused with a clear error
(mixed series, corrupt files, missing or doubled slices, non-uniform spacing), also inside ``preprocess``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pcrlv2_fast.data import ScanError, load_scan, open_cache, preprocess
from pcrlv2_fast.data.io import read_resampled

UID = "1.2.826.0.1.3680043.8.498.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # rows along +x, columns along -z: slice normal +y


def _decimals(values) -> str:
    return "\\".join(f"{float(v):.6g}" for v in values)


def write_series(
    folder: Path,
    array_xyz: np.ndarray,
    pixel_spacing=(1.0, 1.0),
    steps=None,
    orientation=AXIAL,
    origin=(-40.0, -30.0, 100.0),
    uid: str = UID,
    prefix: str = "slice",
    orientations=None,
) -> list[Path]:
    """Write ``array_xyz`` (int16 HU, axes x, y, z) as one .dcm file per z slice and return the files in slice order.

    Slice k lies at ``origin + offsets[k] * normal`` with ``offsets = cumsum([0, *steps])`` (default steps 1.5 mm),
    ``normal = row x column`` of ``orientation``; ``orientations`` overrides the orientation per slice. Files are
    numbered against the slice order (InstanceNumber and name descending), so readers have to sort by position.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = array_xyz.shape[2]
    steps = np.full(n - 1, 1.5) if steps is None else np.asarray(steps, dtype=np.float64)
    offsets = np.concatenate([[0.0], np.cumsum(steps)])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(n):
        iop = np.asarray(orientation if orientations is None else orientations[k], dtype=np.float64)
        position = np.asarray(origin) + offsets[k] * np.cross(iop[:3], iop[3:])
        image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz[:, :, k].T))
        image.SetSpacing(tuple(float(s) for s in pixel_spacing))
        tags = {
            "0008|0060": "CT",
            "0020|000d": uid + ".0",
            "0020|000e": uid,
            "0020|0013": str(n - k),
            "0020|0032": _decimals(position),
            "0020|0037": _decimals(iop),
            "0028|0030": _decimals((pixel_spacing[1], pixel_spacing[0])),  # row spacing (y), column spacing (x)
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        file = folder / f"{prefix}{n - 1 - k:03d}.dcm"
        writer.SetFileName(str(file))
        writer.Execute(image)
        files.append(file)
    return files


def hu_array(shape, seed: int = 0) -> np.ndarray:
    """int16 HU: air around a block of random tissue values (not constant, so the scan is accepted)."""
    rng = np.random.default_rng(seed)
    array = np.full(shape, -1000, dtype=np.int16)
    inner = tuple(slice(max(1, n // 8), n - max(1, n // 8)) for n in shape)
    array[inner] = rng.integers(-200, 500, size=array[inner].shape)
    return array


def read_error(folder: Path) -> str:
    with pytest.raises(ScanError) as info:
        read_resampled(folder, min_shape=(1, 1, 1))
    message = str(info.value)
    assert message.startswith(f"{folder}: "), message  # every error names the series folder first
    return message


# -------------------------------------------------------------------------------------------- good series


def test_good_series_geometry(tmp_path):
    array = hu_array((12, 10, 7))
    folder = tmp_path / "coronal"
    write_series(folder, array, pixel_spacing=(0.8, 0.7), steps=[2.0] * 6, orientation=CORONAL,
                 origin=(10.0, 20.0, 30.0))
    (folder / "notes.txt").write_text("a sidecar file that is not DICOM")
    scan = read_resampled(folder, spacing=(0.8, 0.7, 2.0), min_shape=(1, 1, 1))  # the native grid: no resampling
    assert scan.array.shape == (12, 10, 7)
    assert scan.spacing == (0.8, 0.7, 2.0)
    assert scan.origin == pytest.approx((10.0, 20.0, 30.0))
    # Columns of the direction matrix: row direction, column direction, slice normal (= +y).
    np.testing.assert_allclose(np.reshape(scan.direction, (3, 3)), [[1, 0, 0], [0, 0, 1], [0, -1, 0]], atol=1e-9)
    np.testing.assert_allclose(scan.array, array, atol=1e-3)  # slices sorted by position, not by file name
    assert scan.modality == "ct"

    volume = load_scan(folder, min_shape=(1, 1, 1))  # 1 mm: 12 * 0.8 -> 10, 10 * 0.7 -> 7, 7 * 2.0 -> 14
    assert volume.name == "coronal" and volume.array.shape == (10, 7, 14) and volume.spacing == (1.0, 1.0, 1.0)


def test_position_rounding_is_not_a_gap(tmp_path):
    # 0.625 mm slices with positions rounded to 0.01 mm, as some scanners write them: steps of 0.62 and 0.63.
    n = 9
    offsets = np.round(np.arange(n) * 0.625, 2)
    folder = tmp_path / "rounded"
    write_series(folder, hu_array((8, 8, n)), steps=np.diff(offsets))
    scan = read_resampled(folder, spacing=(1.0, 1.0, 0.625), min_shape=(1, 1, 1))
    assert scan.array.shape == (8, 8, n)


def test_single_slice_is_not_a_volume(tmp_path):
    # One file has no slice positions to compare (a multi-frame file carries its own geometry); one 2D slice is
    # refused as not 3D.
    folder = tmp_path / "one"
    write_series(folder, hu_array((8, 8, 1)))
    assert "not a 3D volume" in read_error(folder)


# --------------------------------------------------------------------------------------------- bad series


@pytest.mark.parametrize("removed", [[4], [4, 5]])
def test_missing_slices_are_named(tmp_path, removed):
    folder = tmp_path / "gap"
    files = write_series(folder, hu_array((8, 8, 10)), origin=(0.0, 0.0, 0.0))  # slice k at z = 1.5 k
    for k in removed:
        files[k].unlink()
    message = read_error(folder)
    before, after = files[removed[0] - 1].name, files[removed[-1] + 1].name
    assert f"{len(removed)} slice(s) missing between {before}" in message and after in message, message
    expected = ", ".join(f"{1.5 * k:.4g}" for k in removed)
    assert f"expected at {expected} mm" in message, message
    assert "median slice step is 1.5 mm" in message and "re-export" in message


def test_missing_slices_at_two_places_are_all_listed(tmp_path):
    folder = tmp_path / "gaps"
    files = write_series(folder, hu_array((8, 8, 12)), origin=(0.0, 0.0, 0.0))
    files[2].unlink()
    files[8].unlink()
    message = read_error(folder)
    assert message.count("slice(s) missing") == 2
    assert "expected at 3 mm" in message and "expected at 12 mm" in message


def test_non_uniform_spacing(tmp_path):
    folder = tmp_path / "uneven"
    write_series(folder, hu_array((8, 8, 10)), steps=[1.0] * 5 + [1.3] * 4)
    message = read_error(folder)
    assert "non-uniform slice spacing" in message and "from 1 to 1.3 mm" in message, message


def test_slices_at_one_position(tmp_path):
    # Two echoes of one MR acquisition under one SeriesInstanceUID: every position holds two slices.
    folder = tmp_path / "echoes"
    write_series(folder, hu_array((8, 8, 6), seed=1), prefix="echo1_")
    write_series(folder, hu_array((8, 8, 6), seed=2), prefix="echo2_")
    message = read_error(folder)
    assert "at the same position" in message and "several acquisitions" in message, message
    assert re.search(r"echo[12]_\d+\.dcm and echo[12]_\d+\.dcm", message), message


def test_slices_with_another_orientation(tmp_path):
    folder = tmp_path / "localizer"
    orientations = [AXIAL] * 5 + [CORONAL]
    files = write_series(folder, hu_array((8, 8, 6)), orientations=orientations)
    message = read_error(folder)
    assert "different orientations" in message and files[5].name in message, message


def test_mixed_series_in_one_folder(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder, hu_array((8, 8, 5)), uid=UID, prefix="a")
    write_series(folder, hu_array((8, 8, 4)), uid=UID + ".2", prefix="b")
    message = read_error(folder)
    assert "2 DICOM series" in message and "own folder" in message
    assert f"{UID} (5 files" in message and f"{UID}.2 (4 files" in message, message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_is_named(tmp_path, damage):
    folder = tmp_path / "corrupt"
    files = write_series(folder, hu_array((8, 8, 8)))
    bad = files[3]
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[:-100], "garbage": b"\x00not dicom\xff" * 40, "empty": b""}[damage])
    message = read_error(folder)
    assert "1 of its 8 .dcm files" in message and str(bad) in message, message
    assert "truncated or corrupt" in message and "intact copies" in message


def test_folder_of_unreadable_files(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for k in range(3):
        (folder / f"x{k}.dcm").write_bytes(b"junk" * 10)
    message = read_error(folder)
    assert "no readable DICOM series" in message and str(folder / "x0.dcm") in message, message


# --------------------------------------------------------------------------------------------- preprocess


def _cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.name != ".lock")


def test_preprocess_keeps_good_series_and_reports_bad_ones(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    good = hu_array((70, 70, 24), seed=3)  # 1.5 mm slices: 36 slices at 1 mm, above the minimum shape
    write_series(src / "good", good)
    gap_files = write_series(src / "gap", hu_array((70, 70, 24), seed=4))
    gap_files[10].unlink()
    corrupt_files = write_series(src / "corrupt", hu_array((70, 70, 24), seed=5))
    corrupt_files[7].write_bytes(corrupt_files[7].read_bytes()[:200])
    write_series(src / "mixed", hu_array((70, 70, 24), seed=6), uid=UID, prefix="a")
    write_series(src / "mixed", hu_array((70, 70, 24), seed=7), uid=UID + ".9", prefix="b")

    report = preprocess(src, cache, progress=False)
    status = {r.source.name: (r.status, r.reason) for r in report.results}
    assert status["good"] == ("processed", "new")
    assert {name for name, (s, _) in status.items() if s == "failed"} == {"gap", "corrupt", "mixed"}
    assert "missing slices" in status["gap"][1] and str(src / "gap") in status["gap"][1]
    assert str(corrupt_files[7]) in status["corrupt"][1]
    assert "2 DICOM series" in status["mixed"][1]
    assert "gap" in report.table() and "missing slices" in report.table()

    # Only the good series is in the cache: no partial volume, no temporary file of the failed ones.
    assert _cache_files(cache) == ["index.json", "volumes/good.npy"]
    assert [e["name"] for e in json.loads((cache / "index.json").read_text())["scans"]] == ["good"]
    (volume,) = open_cache(cache)
    assert volume.array.shape == (70, 70, 36) and volume.array.dtype == np.int16

    # A re-run skips the good series and reports the bad ones again; once a series breaks, its old volume goes.
    again = preprocess(src, cache, progress=False)
    assert [(r.source.name, r.status) for r in again.results] == [
        ("corrupt", "failed"), ("gap", "failed"), ("good", "skipped"), ("mixed", "failed")
    ]
    (src / "good" / "slice012.dcm").unlink()
    broken = preprocess(src, cache, progress=False)
    assert [r.status for r in broken.results] == ["failed"] * 4
    assert _cache_files(cache) == ["index.json"]
    assert json.loads((cache / "index.json").read_text())["scans"] == []

