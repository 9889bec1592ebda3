"""Preprocessing cache: round trip, windows, resumability, changed sources, bad scans, atomicity, memory maps,
index damage, training integration and the ``preprocess`` command."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pcrlv2_fast.cli import main as cli_main
from pcrlv2_fast.data import (
    CropConfig,
    PretrainDataset,
    ScanError,
    Volume,
    cached_volumes,
    cut_and_resize,
    is_cache,
    load_scan,
    open_cache,
    preprocess,
)
from pcrlv2_fast.data import cache as cache_module
from pcrlv2_fast.data.io import read_resampled

from ..conftest import ct_phantom
from ..helpers import file_size_limit, hold_folder_lock
from .test_io import write, write_dicom_series

# int16 rounding of the resampled HU moves a [0, 1] value by at most 0.5 / 2000; trilinear resizing is a convex
# combination, so crops keep that bound (plus float32 round-off).
INT16_TOL = 0.5 / 2000 + 1e-6


def small_ct(path, seed=0, shape=(48, 48, 36)):
    """A CT phantom that is 72 x 72 x 36 voxels at 1 mm: just above the minimum shape, fast to process."""
    sitk.WriteImage(ct_phantom(shape, spacing=(1.5, 1.5, 1.0), seed=seed), str(path))
    return path


def files_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def mtimes(cache):
    return {p.name: p.stat().st_mtime_ns for p in (cache / "volumes").iterdir()}


def no_temporaries(folder):
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- round trip


def test_ct_round_trip(phantom_dir, phantom_volumes, tmp_path):
    report = preprocess(phantom_dir, tmp_path / "cache", progress=False)
    assert [r.status for r in report.results] == ["processed", "processed"]
    assert report.names == [v.name for v in phantom_volumes] and is_cache(tmp_path / "cache")
    cached = open_cache(tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    for volume, memory, entry in zip(cached, phantom_volumes, index["scans"], strict=True):
        assert isinstance(volume.array, np.memmap) and volume.array.dtype == np.int16
        assert volume.array.flags.c_contiguous and volume.array.shape == memory.array.shape
        assert (volume.name, volume.source, volume.modality) == (memory.name, memory.source, "ct")
        assert volume.spacing == memory.spacing and volume.window == (-1000.0, 1000.0)
        assert volume.origin == memory.origin == (-100.0, -80.0, 40.0)
        assert volume.direction == memory.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        hu = read_resampled(memory.source).array
        np.testing.assert_array_equal(volume.array, np.rint(hu).astype(np.int16))
        assert entry["source"] == str(memory.source) and entry["source_size"] == memory.source.stat().st_size
        assert entry["source_sha256"] == cache_module.sha256_file(memory.source) and entry["dtype"] == "int16"
        assert entry["file"] == f"volumes/{memory.name}.npy" and entry["shape"] == list(memory.array.shape)

    # The dataset windows each crop before resizing: same boxes, same crops up to int16 rounding.
    for augment, items in ((False, range(4)), (True, [1])):
        a = PretrainDataset(cached, seed=5, pairs_per_volume=2, augment=augment)
        b = PretrainDataset(phantom_volumes, seed=5, pairs_per_volume=2, augment=augment)
        for i in items:
            item, expected = a[i], b[i]
            assert torch.equal(item["global_boxes"], expected["global_boxes"])
            assert torch.equal(item["local_boxes"], expected["local_boxes"])
            torch.testing.assert_close(item["gt"], expected["gt"], atol=INT16_TOL, rtol=0)
            assert item["x1"].dtype == torch.float32 and torch.isfinite(item["locals"]).all()
            array = torch.from_numpy(phantom_volumes[i % 2].array)
            for box in item["local_boxes"]:
                torch.testing.assert_close(cut_and_resize(cached[i % 2].array, box, (16, 16, 16), cached[i % 2].window),
                                           cut_and_resize(array, box, (16, 16, 16)), atol=INT16_TOL, rtol=0)


def test_windowed_dense_filter_draws_the_same_boxes(phantom_dir, phantom_volumes, tmp_path):
    preprocess(phantom_dir, tmp_path, progress=False)
    # -100 HU: soft tissue counts as dense; about a quarter of the phantoms' global crops are rejected.
    crop = CropConfig(dense_filter=True, dense_threshold=0.45, dense_max_fraction=0.5)
    a = PretrainDataset(open_cache(tmp_path), crop, seed=1, pairs_per_volume=2, augment=False)
    b = PretrainDataset(phantom_volumes, crop, seed=1, pairs_per_volume=2, augment=False)
    for i in range(len(a)):
        assert torch.equal(a[i]["global_boxes"], b[i]["global_boxes"])


def test_mr_is_z_scored_float16_with_percentile_window(tmp_path):
    rng = np.random.default_rng(0)
    mr = rng.gamma(4.0, 100.0, size=(70, 70, 40)).astype(np.float32)
    (tmp_path / "src").mkdir()
    path = write(mr, tmp_path / "src" / "mr.mha")
    report = preprocess(tmp_path / "src", tmp_path / "cache", progress=False)
    assert report.results[0].modality == "mr"
    (volume,) = open_cache(tmp_path / "cache")
    assert volume.modality == "mr" and volume.array.dtype == np.float16 and isinstance(volume.array, np.memmap)
    z = volume.array.astype(np.float64)
    assert abs(z.mean()) < 1e-3 and abs(z.std() - 1) < 1e-3
    lo, hi = volume.window
    expected = (np.percentile(mr, (0.5, 99.5)) - mr.mean()) / mr.std()
    np.testing.assert_allclose((lo, hi), expected, rtol=1e-4)
    # Windowed values equal load_scan's percentile scaling up to float16 rounding of z.
    windowed = np.clip((z - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(windowed, load_scan(path).array, atol=2e-3)
    entry = json.loads((tmp_path / "cache" / "index.json").read_text())["scans"][0]
    assert entry["zscore"]["mean"] == pytest.approx(mr.mean(), rel=1e-5) and entry["dtype"] == "float16"
    item = PretrainDataset([volume], seed=0, pairs_per_volume=1, augment=False)[0]
    assert 0 <= item["gt"].min() and item["gt"].max() <= 1


# ------------------------------------------------------------------------------------ resume & changes


def test_second_run_skips_unchanged_scans(phantom_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    preprocess(phantom_dir, cache, progress=False)
    index, before = (cache / "index.json").read_bytes(), mtimes(cache)

    def must_not_read(*args, **kwargs):
        raise AssertionError("an unchanged scan was read again")

    monkeypatch.setattr(cache_module, "read_resampled", must_not_read)
    report = preprocess(phantom_dir, cache, progress=False)
    assert [(r.status, r.reason) for r in report.results] == [("skipped", "unchanged")] * 2
    assert report.names == ["phantom_a", "phantom_b"] and mtimes(cache) == before
    assert (cache / "index.json").read_bytes() == index
    # A new HU window only moves the CT window: HU are stored in full.
    report = preprocess(phantom_dir, cache, hu_window=(-500, 500), progress=False)
    assert len(report.skipped) == 2 and mtimes(cache) == before
    assert {v.window for v in open_cache(cache)} == {(-500.0, 500.0)}


def test_changed_sources_are_processed_again(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    small_ct(src / "a.nii.gz", seed=1)
    small_ct(src / "b.mhd", seed=2)  # + b.raw
    write_dicom_series(src / "series", np.rint(sitk.GetArrayFromImage(ct_phantom((48, 48, 24), seed=3)).T)
                       .astype(np.int16), spacing=(1.5, 1.5, 1.5))
    first = preprocess(src, cache, progress=False)
    assert [r.name for r in first.processed] == ["a", "b", "series"]
    old = {v.name: np.array(v.array) for v in open_cache(cache)}

    small_ct(src / "a.nii.gz", seed=11)  # new content, same name
    os.utime(src / "b.mhd", ns=(1, 1))  # touched only: same bytes
    raw = bytearray((src / "b.raw").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the data file of a detached header changed
    (src / "b.raw").write_bytes(bytes(raw))
    slice_file = sorted((src / "series").glob("*.dcm"))[5]
    slice_file.write_bytes(slice_file.read_bytes()[:-2] + b"\x10\x00")  # one DICOM slice changed
    report = preprocess(src, cache, progress=False)
    assert [(r.name, r.status, r.reason) for r in report.results] == [
        ("a", "processed", "source changed"),
        ("b", "processed", "source changed"),
        ("series", "processed", "source changed"),
    ]
    new = {v.name: v.array for v in open_cache(cache)}
    assert not np.array_equal(new["a"], old["a"]) and not np.array_equal(new["b"], old["b"])

    os.utime(src / "a.nii.gz", ns=(1, 1))  # mtime alone: the content decides, nothing is redone
    assert [r.status for r in preprocess(src, cache, progress=False).results] == ["skipped"] * 3
    report = preprocess(src, cache, spacing=(0.9, 0.9, 0.9), progress=False)  # new settings: all redone
    assert all(r.reason.startswith("spacing changed") for r in report.results)
    assert open_cache(cache)[0].array.shape == (80, 80, 40)


def test_same_stem_gets_unique_names(tmp_path):
    for case in ("case1", "case2"):
        (tmp_path / case).mkdir()
        small_ct(tmp_path / case / "ct.nii.gz", seed=len(case))
    report = preprocess([tmp_path / "case1", tmp_path / "case2"], tmp_path / "cache", progress=False)
    names = report.names
    assert names[0] == "ct" and names[1].startswith("ct-") and len(names[1]) == 11
    assert files_in(tmp_path / "cache" / "volumes") == sorted(f"{n}.npy" for n in names)
    again = preprocess([tmp_path / "case2", tmp_path / "case1"], tmp_path / "cache", progress=False)
    assert sorted(again.names) == sorted(names) and len(again.skipped) == 2


# ------------------------------------------------------------------------------------------- bad input


def test_bad_scans_are_reported_and_skipped(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    small_ct(src / "good1.nii.gz", seed=1)
    small_ct(src / "good2.nrrd", seed=2)
    (src / "junk.nii.gz").write_bytes(b"not an image")
    write(np.full((70, 70, 40), 7, np.int16), src / "flat.nii.gz")
    report = preprocess([src, tmp_path / "missing"], cache, progress=False)
    failed = {r.source.name: r.reason for r in report.failed}
    assert set(failed) == {"missing", "junk.nii.gz", "flat.nii.gz"}
    assert "no such file" in failed["missing"] and "every voxel" in failed["flat.nii.gz"]
    assert str(src / "junk.nii.gz") in failed["junk.nii.gz"]
    assert report.names == ["good1", "good2"]
    assert files_in(cache) == [".lock", "index.json", "volumes/good1.npy", "volumes/good2.npy"]
    table = report.table()
    assert "failed" in table and "junk.nii.gz" in table and "2 processed, 0 skipped (unchanged), 3 failed" in table

    # A cached scan whose source turns bad is dropped with its volume, not kept stale.
    (src / "good2.nrrd").write_bytes(b"broken now")
    report = preprocess(src, cache, progress=False)
    assert report.names == ["good1"] and [v.name for v in open_cache(cache)] == ["good1"]
    assert files_in(cache / "volumes") == ["good1.npy"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    small_ct(src / "a.nii.gz", seed=1)
    preprocess(src, cache, progress=False)
    index = (cache / "index.json").read_bytes()
    small_ct(src / "b.nii.gz", seed=2)
    real_save = np.save

    def crash_mid_way(fh, array, **kwargs):
        real_save(fh, array[: len(array) // 2], **kwargs)  # half the bytes are on disk, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", crash_mid_way)
    with pytest.raises(OSError, match="No space left"):
        preprocess(src, cache, progress=False)
    assert files_in(cache / "volumes") == ["a.npy"] and no_temporaries(cache)
    assert (cache / "index.json").read_bytes() == index
    monkeypatch.setattr(np, "save", real_save)

    (cache / "volumes" / ".b.npy.0123456789abcdef.tmp").write_bytes(b"left by a killed run")
    report = preprocess(src, cache, progress=False)
    assert [r.status for r in report.results] == ["skipped", "processed"] and no_temporaries(cache)


def test_damaged_index_and_volumes_are_clear_errors(phantom_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    with pytest.raises(ScanError, match="not a preprocessing cache.*preprocess"):
        open_cache(cache)
    preprocess(phantom_dir, cache, progress=False)
    index_path, volume = cache / "index.json", cache / "volumes" / "phantom_b.npy"
    index = index_path.read_text()

    volume.rename(cache / "moved.npy")
    with pytest.raises(ScanError, match=r"phantom_b\.npy.*missing.*re-run `pcrlv2-fast preprocess"):
        open_cache(cache)
    (cache / "moved.npy").rename(volume)

    entries = json.loads(index)
    entries["scans"][1]["shape"] = [1, 2, 3]
    index_path.write_text(json.dumps(entries))
    with pytest.raises(ScanError, match=r"phantom_b\.npy: holds int16 \(132, 126, 100\).*\(1, 2, 3\)"):
        open_cache(cache)
    index_path.write_text(index)

    data = volume.read_bytes()
    volume.write_bytes(data[: len(data) // 3])
    with pytest.raises(ScanError, match=r"phantom_b\.npy: unreadable or truncated"):
        open_cache(cache)
    report = preprocess(phantom_dir, cache, progress=False)  # a damaged volume is rebuilt
    assert [r.reason for r in report.results] == ["unchanged", "volume file missing or damaged"]
    assert open_cache(cache)[1].array.shape == (132, 126, 100)

    index_path.write_text('{"format": "pcrlv2_fast-cache", "scans": [')
    with pytest.raises(ScanError, match=r"index\.json: cannot be parsed.*damaged.*preprocess"):
        open_cache(cache)
    index_path.write_text(json.dumps({"format": "pcrlv2_fast-cache", "version": 1, "scans": [{"name": "x"}]}))
    with pytest.raises(ScanError, match="entry 0 lacks file"):
        open_cache(cache)
    report = preprocess(phantom_dir, cache, progress=False)  # preprocess rebuilds a damaged index
    assert len(report.processed) == 2 and "Rebuilding the index" in capsys.readouterr().err
    with pytest.raises(ScanError, match="no scan named nope"):
        open_cache(cache, names=["nope"])


# -------------------------------------------------------------------------------------------- memory maps


class CountingArray:
    """Stands in for a volume's array and counts the bytes of every slice taken from it."""

    def __init__(self, array):
        self.array, self.bytes_read = array, 0
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        out = self.array[key]
        self.bytes_read += out.nbytes
        return out


def test_items_read_only_their_crops_from_the_memory_map(phantom_dir, tmp_path):
    preprocess(phantom_dir, tmp_path, progress=False)
    volume = open_cache(tmp_path)[0]
    assert isinstance(volume.array, np.memmap)
    counting = CountingArray(volume.array)
    spy = Volume(volume.name, volume.source, counting, volume.spacing, volume.modality, volume.window)
    item = PretrainDataset([spy], seed=3, pairs_per_volume=1)[0]
    boxes = torch.cat([item["global_boxes"], item["local_boxes"]])
    assert counting.bytes_read == int(boxes[:, 3:].prod(dim=1).sum()) * 2  # int16: exactly the crops' voxels
    reference = PretrainDataset([volume], seed=3, pairs_per_volume=1)[0]
    assert all(torch.equal(item[k], reference[k]) for k in ("x1", "x2", "gt", "locals"))


def test_cached_volume_pickles_as_a_file_reference(phantom_dir, tmp_path):
    preprocess(phantom_dir, tmp_path, progress=False)
    volume = open_cache(tmp_path)[1]
    data = pickle.dumps(volume)
    assert len(data) < 4096  # not the 3.3 MB volume
    clone = pickle.loads(data)
    assert isinstance(clone.array, np.memmap) and np.array_equal(clone.array, volume.array)
    assert (clone.name, clone.window, clone.origin) == (volume.name, volume.window, volume.origin)
    sliced = Volume("part", volume.source, volume.array[:80], volume.spacing, "ct", volume.window)
    assert pickle.loads(pickle.dumps(sliced)).array.shape == (80, 126, 100)  # a view pickles its data


# ------------------------------------------------------------------------------------- training and CLI


def test_pretrain_preprocesses_raw_folders_and_reads_caches(phantom_dir, tmp_path, capsys):
    tiny = ["--preset", "tiny", "--steps", "1", "--no-pictures"]
    run = tmp_path / "run"
    assert cli_main(["pretrain", "--data", str(phantom_dir), "--out", str(run), *tiny]) == 0
    assert [v.name for v in open_cache(run / "cache")] == ["phantom_a", "phantom_b"]
    before = mtimes(run / "cache")
    volumes = cached_volumes(phantom_dir, run / "cache", progress=False)  # what a resumed run does
    assert mtimes(run / "cache") == before and all(isinstance(v.array, np.memmap) for v in volumes)

    other = tmp_path / "from_cache"
    assert cli_main(["pretrain", "--data", str(run / "cache"), "--out", str(other), *tiny]) == 0
    assert (other / "checkpoint.pt").exists() and not (other / "cache").exists()
    capsys.readouterr()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ScanError, match=r"no scan could be preprocessed.*junk\.nii\.gz"):
        cached_volumes(bad, tmp_path / "bad_cache", progress=False)
    small_ct(bad / "good.nii.gz")
    assert [v.name for v in cached_volumes(bad, tmp_path / "bad_cache", progress=False)] == ["good"]
    assert "warning: skipped" in capsys.readouterr().err


def test_cli_preprocess_summary_and_exit_codes(phantom_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["preprocess", str(phantom_dir), "--out", str(cache), "--spacing", "1.0", "--hu-window", "-1000", "1000"]
    assert cli_main([*args, "--workers", "2", "--modality", "ct"]) == 0
    out = capsys.readouterr().out
    assert "processed  phantom_a" in out and "2 processed, 0 skipped (unchanged), 0 failed" in out
    assert cli_main([*args, "--modality", "ct"]) == 0
    assert "0 processed, 2 skipped (unchanged), 0 failed" in capsys.readouterr().out

    bad = tmp_path / "bad"
    bad.mkdir()
    write(np.zeros((70, 70, 40), np.int16), bad / "flat.nii.gz")
    assert cli_main(["preprocess", str(bad), str(tmp_path / "missing"), "--out", str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert "0 processed, 0 skipped (unchanged), 2 failed" in captured.out and "every voxel" in captured.out
    assert "no scan could be preprocessed" in captured.err
    assert json.loads((tmp_path / "empty" / "index.json").read_text())["scans"] == []
    assert cli_main(["preprocess", str(bad), "--out", str(cache), "--hu-window", "5", "1"]) == 2
    assert "hu_window" in capsys.readouterr().err


# ------------------------------------------------------------------------------ hostile index, full disk, locks
@pytest.mark.parametrize("field, value, match", [
    ("file", "../../etc/passwd.npy", "not a volumes/\\*.npy file inside the cache"),
    ("file", "/tmp/elsewhere.npy", "not a volumes/\\*.npy file inside the cache"),
    ("file", "volumes/../../x.npy", "inside the cache"),
    ("shape", [10, -1, 3], "not three positive integers"),
    ("shape", "big", "not three positive integers"),
    ("dtype", "object", "not one of"),
    ("dtype", [1], "not one of"),
    ("spacing", [1.0, 0.0, 1.0], "not three positive numbers"),
    ("window", [1.0, 1.0], "low < high"),
    ("origin", [1.0, "x", 2.0], "not 3 finite numbers"),
    ("modality", "pet", "not ct or mr"),
    ("name", 7, "not a non-empty string"),
])
def test_hostile_index_entries_are_refused_before_any_file_is_opened(tmp_path, field, value, match):
    cache = tmp_path / "cache"
    preprocess(small_ct(tmp_path / "a.nii.gz"), cache, progress=False)
    index = json.loads((cache / "index.json").read_text())
    index["scans"][0][field] = value
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(ScanError, match=f"index.json: entry 0 .*{match}"):
        open_cache(cache)


def test_full_disk_during_a_cache_write_keeps_the_previous_entry(tmp_path):
    src, cache = small_ct(tmp_path / "a.nii.gz"), tmp_path / "cache"
    preprocess(src, cache, progress=False)
    before = np.array(open_cache(cache)[0].array)
    index = (cache / "index.json").read_bytes()
    # At 0.9 mm the volume (80 x 80 x 40 int16, 512 kB) exceeds the limit: its write fails as on a full disk.
    result = subprocess.run([sys.executable, "-m", "pcrlv2_fast", "preprocess", str(src), "--out", str(cache),
                             "--spacing", "0.9"], capture_output=True, text=True, timeout=300,
                            preexec_fn=file_size_limit(200_000))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "a.npy: could not be written" in result.stderr and "previous version is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert (cache / "index.json").read_bytes() == index and no_temporaries(cache)
    assert np.array_equal(open_cache(cache)[0].array, before)


def test_a_second_preprocess_of_one_cache_is_refused(tmp_path):
    src, cache = small_ct(tmp_path / "a.nii.gz"), tmp_path / "cache"
    holder = hold_folder_lock(cache, "preprocess")
    try:
        with pytest.raises(ValueError, match=f"in use by preprocess \\(pid {holder.pid}\\).*wait for it to end"):
            preprocess(src, cache, progress=False)
        assert not (cache / "index.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert preprocess(src, cache, progress=False).names == ["a"]  # a dead holder leaves no stale lock


def test_a_volume_with_a_damaged_npy_header_is_a_clear_error(tmp_path):
    """numpy raises tokenize.TokenError for this header (found by tests/fuzz): still one ScanError."""
    cache = tmp_path / "cache"
    preprocess(small_ct(tmp_path / "a.nii.gz"), cache, progress=False)
    volume = cache / "volumes" / "a.npy"
    data = bytearray(volume.read_bytes())
    data[9] ^= 2  # the header length field
    volume.write_bytes(bytes(data))
    with pytest.raises(ScanError, match=r"a\.npy: unreadable or truncated volume file"):
        open_cache(cache)
    redone = preprocess(tmp_path / "a.nii.gz", cache, progress=False)
    assert redone.results[0].reason == "volume file missing or damaged"
