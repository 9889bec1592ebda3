"""Real CT and MR sample scans for demos and smoke tests.

The source distribution of ``pyradiomics==3.0.1`` on PyPI ships ten small NRRD files under ``data/``: two chest CTs
(Hounsfield units), two brain MRs and one breast MR, each with a segmentation label. PyPI is reachable wherever ``pip``
works, so these are the one set of real scans every user can get without a data-use agreement.

:func:`fetch_samples` looks the tarball up in PyPI's JSON simple index, downloads it, checks it against the index and
against the hash pinned here, extracts only the scans (each checked against its own pinned hash) and deletes the
tarball. The result is cached; a second call only re-hashes the cached files and touches no network.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import secrets
import ssl
import tarfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from .utils.io import atomic_write, sha256_file

SDIST_VERSION = "pyradiomics-3.0.1"
SDIST_FILENAME = f"{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
SIMPLE_INDEX_URL = "https://pypi.org/simple/pyradiomics/"
# PEP 691: ask the simple index for JSON, which carries each file's URL and sha256 in plain fields.
SIMPLE_INDEX_ACCEPT = "application/vnd.pypi.simple.v1+json"
CACHE_ENV = "PCRLV2_CACHE"

_TIMEOUT_S = 60
_CHUNK = 1 << 20
# The largest scan is 17.8 MB; anything far bigger in a member we asked for is not the file we pinned.
_MAX_MEMBER_BYTES = 64 << 20


@dataclass(frozen=True)
class SampleFile:
    """One pinned scan (an image or its ``*_label.nrrd``): its modality ("CT" or "MR") and SHA-256."""

    name: str
    modality: str
    sha256: str

    @property
    def is_label(self) -> bool:
        return self.name.endswith("_label.nrrd")

    @property
    def subdir(self) -> str:
        return "labels" if self.is_label else self.modality.lower()

    @property
    def member(self) -> str:
        return f"{SDIST_VERSION}/data/{self.name}"

    @property
    def relpath(self) -> str:
        return f"{self.subdir}/{self.name}"


# SHA-256 of each file as extracted from the sdist above (computed once from the real download).
SAMPLE_FILES: tuple[SampleFile, ...] = (
    SampleFile("lung1_image.nrrd", "CT", "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed"),
    SampleFile("lung2_image.nrrd", "CT", "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651"),
    SampleFile("brain1_image.nrrd", "MR", "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf"),
    SampleFile("brain2_image.nrrd", "MR", "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e"),
    SampleFile("breast1_image.nrrd", "MR", "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2"),
    SampleFile("lung1_label.nrrd", "CT", "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a"),
    SampleFile("lung2_label.nrrd", "CT", "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a"),
    SampleFile("brain1_label.nrrd", "MR", "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059"),
    SampleFile("brain2_label.nrrd", "MR", "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5"),
    SampleFile("breast1_label.nrrd", "MR", "07085bb0e36a956de5bd1c1c1b5f8bdf2ce80952125b13cbd352412c108c8950"),
)

MANUAL_INSTRUCTIONS = f"""\
To get the sample scans by hand, on any machine that can reach PyPI run:
    pip install numpy setuptools wheel versioneer
    pip download --no-deps --no-binary :all: --no-build-isolation pyradiomics==3.0.1 -d DIR
(pip builds the package's metadata, hence the build tools), copy DIR/{SDIST_FILENAME} here and run:
    pcrlv2-fast samples --from-sdist DIR/{SDIST_FILENAME}"""


class SampleDownloadError(RuntimeError):
    """The sdist could not be located or downloaded (offline, HTTP error, unexpected index answer)."""


class SampleIntegrityError(RuntimeError):
    """A tarball or an extracted scan does not match its pinned SHA-256."""


# What urllib raises for a failed request or a connection that breaks mid-read; ssl errors during read() arrive
# unwrapped. Deliberately not plain OSError, so that e.g. a full disk is not reported as a network problem.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, ssl.SSLError)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$PCRLV2_CACHE``, else ``~/.cache/pcrlv2_fast``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pcrlv2_fast"


def samples_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder :func:`fetch_samples` fills: ``<cache root>/samples/pyradiomics-3.0.1``."""
    return cache_root(cache_dir) / "samples" / SDIST_VERSION


def fetch_samples(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    sdist: str | os.PathLike | None = None,
) -> Path:
    """Make sure the pinned sample scans are in the cache and return their folder.

    The folder holds ``ct/`` (lung1, lung2), ``mr/`` (brain1, brain2, breast1) and ``labels/`` (all ``*_label.nrrd``).
    Files already there are kept if their SHA-256 matches and removed if not. Missing files are extracted from
    ``sdist`` (a local ``pyradiomics-3.0.1.tar.gz``; no network) or from a fresh download from PyPI.

    Raises:
        SampleDownloadError: PyPI could not be reached or answered unexpectedly; the message says how to get the
            tarball by hand.
        SampleIntegrityError: a tarball or a scan in it does not match its pinned hash; nothing unverified is left.
    """
    folder = samples_dir(cache_dir)
    missing = _verify_cached(folder)
    if not missing:
        return folder
    if sdist is not None:
        sdist = Path(sdist)
        if not sdist.is_file():
            raise FileNotFoundError(f"sdist not found: {sdist}")
        _check_hash(sdist, SDIST_SHA256, f"tarball {sdist} (should be {SDIST_FILENAME} exactly as PyPI serves it)")
        _extract(sdist, folder, missing)
        return folder

    url, index_sha256 = _resolve_sdist()
    if index_sha256 != SDIST_SHA256:
        raise SampleIntegrityError(
            f"PyPI lists {SDIST_FILENAME} with sha256 {index_sha256}, but this module pins {SDIST_SHA256}; "
            "refusing to use a tarball that differs from the one the scans were pinned against"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Download next to the cache (same file system, cleaned up below) rather than to /tmp, which may be small.
    tarball = folder.parent / f".{SDIST_FILENAME}.{secrets.token_hex(8)}.part"
    try:
        _download(url, tarball, SDIST_SHA256, progress)
        _extract(tarball, folder, missing)
    finally:
        # The scans are all we keep; the 34 MB tarball would double the cache for nothing.
        tarball.unlink(missing_ok=True)
    return folder


def _verify_cached(folder: Path) -> list[SampleFile]:
    """Return the pinned files that still need extracting; cached files with a wrong hash are deleted."""
    missing = []
    for sample in SAMPLE_FILES:
        path = folder / sample.relpath
        if not path.is_file():
            missing.append(sample)
        elif sha256_file(path) != sample.sha256:
            # A truncated or edited scan would silently change every result computed from it: fetch it again.
            warnings.warn(f"{path} does not match its pinned sha256; removing it to fetch it again", stacklevel=3)
            path.unlink()
            missing.append(sample)
    return missing


def _check_hash(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise SampleIntegrityError(f"{what} has sha256 {actual}, expected {expected}")


def _download_error(what: str, url: str, cause: BaseException) -> SampleDownloadError:
    return SampleDownloadError(f"could not {what} {url}: {cause}\n{MANUAL_INSTRUCTIONS}")


def _resolve_sdist() -> tuple[str, str]:
    """Ask PyPI's JSON simple index for the sdist's download URL and sha256."""
    request = urllib.request.Request(SIMPLE_INDEX_URL, headers={"Accept": SIMPLE_INDEX_ACCEPT})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            body = response.read()
    except _NETWORK_ERRORS as exc:
        raise _download_error("read the package index", SIMPLE_INDEX_URL, exc) from exc
    try:
        files = json.loads(body)["files"]
        entry = next(f for f in files if f["filename"] == SDIST_FILENAME)
        return entry["url"], entry["hashes"]["sha256"]
    except (ValueError, KeyError, TypeError, StopIteration) as exc:
        what = f"find {SDIST_FILENAME} with a sha256 in the index answer from"
        raise _download_error(what, SIMPLE_INDEX_URL, exc) from exc


def _download(url: str, dest: Path, expected_sha256: str, progress: bool) -> None:
    """Stream ``url`` into ``dest`` with a byte progress bar, hashing on the way; raise if the hash differs."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=SDIST_FILENAME, disable=not progress
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except _NETWORK_ERRORS as exc:
        raise _download_error("download", url, exc) from exc
    if digest.hexdigest() != expected_sha256:
        raise SampleIntegrityError(f"download of {url} has sha256 {digest.hexdigest()}, expected {expected_sha256}")


def _extract(tarball: Path, folder: Path, wanted: list[SampleFile]) -> None:
    """Copy the ``wanted`` members of ``tarball`` into ``folder``, each written atomically and hash-checked.

    Output paths come from the pinned table, never from member names, and only regular-file members are read, so a
    hostile tarball cannot write outside ``folder`` (no ``..``, absolute paths, symlinks or hard links).
    """
    try:
        archive = tarfile.open(tarball, "r:*")
    except tarfile.TarError as exc:
        raise SampleIntegrityError(f"{tarball} is not a readable tar archive: {exc}") from exc
    with archive:
        for sample in wanted:
            try:
                member = archive.getmember(sample.member)
            except KeyError as exc:
                raise SampleIntegrityError(f"{tarball} has no member {sample.member}") from exc
            if not member.isfile():
                raise SampleIntegrityError(f"{tarball}: {sample.member} is not a regular file")
            if member.size > _MAX_MEMBER_BYTES:
                raise SampleIntegrityError(f"{tarball}: {sample.member} is {member.size} bytes, too large for a sample")
            source = archive.extractfile(member)
            if source is None:
                raise SampleIntegrityError(f"{tarball}: cannot read {sample.member}")
            digest = hashlib.sha256()
            # Raising inside atomic_write discards the temporary file: a scan with a wrong hash never appears.
            with source, atomic_write(folder / sample.relpath, "wb") as out:
                for chunk in iter(functools.partial(source.read, _CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
                if digest.hexdigest() != sample.sha256:
                    raise SampleIntegrityError(
                        f"{sample.member} in {tarball} has sha256 {digest.hexdigest()}, expected {sample.sha256}"
                    )


def describe_samples(folder: str | os.PathLike) -> str:
    """One line per pinned file: path, modality, voxel grid, spacing (mm) and pixel type, read from the header."""
    import SimpleITK as sitk

    folder = Path(folder)
    lines = [f"{'file':<28} {'modality':<8} {'size (x, y, z)':<18} {'spacing mm (x, y, z)':<22} pixel type"]
    for sample in SAMPLE_FILES:
        path = folder / sample.relpath
        kind = f"{sample.modality} label" if sample.is_label else sample.modality
        if not path.is_file():
            lines.append(f"{sample.relpath:<28} {kind:<8} missing")
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # header only: no voxel data is loaded
        size = "x".join(str(s) for s in reader.GetSize())
        spacing = ", ".join(f"{s:.3g}" for s in reader.GetSpacing())
        pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        lines.append(f"{sample.relpath:<28} {kind:<8} {size:<18} {spacing:<22} {pixel}")
    return "\n".join(lines)
