"""Scan readers under hostile headers: NIfTI, NRRD and MetaImage files with absurd or negative dimensions, zero,
negative, NaN or infinite spacings and affines, 1D/2D/4D images, odd pixel types and truncated payloads."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pcrlv2_fast.data import io
from pcrlv2_fast.data.io import ScanError, read_resampled

from .isolated import MARGIN, run_isolated

# Payloads are written in full only up to this size; larger claims get a short (truncated) payload.
FULL_PAYLOAD = 300_000



def mostly(valid, hostile):
    """Three draws in four from ``valid``: most examples get past the first check, so the deeper paths (the memory
    guard, resampling, the NaN and size checks) are reached as well as the header checks."""
    return st.one_of(valid, valid, valid, hostile)


dim = mostly(st.integers(2, 40), st.one_of(st.integers(-3, 1), st.integers(41, 32767)))
value = mostly(st.floats(0.5, 3.0), st.one_of(
    st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf")]),
    st.floats(allow_nan=True, allow_infinity=True, width=32)))


def vectors(element, valid_element, n: int):
    """``n`` values: all plausible three times in four, else each drawn from ``element`` (hostile at times)."""
    return mostly(st.lists(valid_element, min_size=n, max_size=n), st.lists(element, min_size=n, max_size=n))


def dims(n):
    return vectors(dim, st.integers(2, 40), n)


def floats(n):
    return vectors(value, st.floats(0.5, 3.0), n)
kinds = mostly(st.sampled_from(["smooth", "random"]), st.just("short"))
NIFTI_TYPES = {2: 8, 4: 16, 8: 32, 16: 32, 64: 64, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64, 128: 24,
               32: 64, 2304: 32}


def payload(rng: np.random.Generator, claimed: int, kind: str) -> bytes:
    """Voxel bytes: the claimed amount (random bytes, or small smooth values that decode as plausible voxels) when
    it is small enough, else a short piece."""
    if claimed > FULL_PAYLOAD or kind == "short":
        return rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
    if kind == "random":
        return rng.integers(0, 256, claimed, dtype=np.uint8).tobytes()
    return rng.integers(0, 2, claimed, dtype=np.uint8).tobytes()  # 0/1 bytes: small integers, tiny finite floats


def _read(path: Path) -> tuple[int, ...]:
    # The reader refuses a scan whose reading and resampling would need more than the memory available; with
    # "available" set to half the child's address-space margin, an estimate that undercounts ends in MemoryError.
    io.memory_available = lambda: MARGIN // 2
    scan = read_resampled(path, min_shape=(1, 1, 1))
    assert scan.array.ndim == 3 and np.isfinite(scan.array).all()
    return scan.array.shape


def check_read(path: Path) -> None:
    """The one allowed outcome besides a clean read: a ScanError naming the file; never another exception, a
    crash, a hang or an allocation past the bound (each only ends the forked child)."""
    outcome = run_isolated(lambda: _read(path))
    if outcome.raised(ScanError):
        assert str(path) in outcome.message, outcome.message
        event(" ".join(outcome.message.split(str(path), 1)[1].split()[:4]))  # see --hypothesis-show-statistics
    elif outcome.kind == "ok":
        event("read")
    else:
        pytest.fail(f"{path.name}: {outcome.describe()}")


def check_scan_file(lines: list[str], body: bytes, detached: bool, attached_form: tuple[str, str, str],
                    detached_form: tuple[str, str]) -> None:
    """Write a text header and its data, in one file (``(suffix, last header line, separator)``) or as a header
    beside ``scan.raw`` (``(suffix, the line naming it)``), then read it."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if detached:
            suffix, line = detached_form
            (folder / "scan.raw").write_bytes(body)
            path = folder / f"scan{suffix}"
            path.write_text("\n".join([*lines, line]) + "\n")
        else:
            suffix, line, separator = attached_form
            path = folder / f"scan{suffix}"
            path.write_bytes(("\n".join([*lines, line] if line else lines) + "\n" + separator).encode() + body)
        check_read(path)


@given(ndim=mostly(st.just(3), st.integers(-1, 8)), sizes=dims(7),
       datatype=mostly(st.sampled_from([2, 4, 16, 512]), st.sampled_from(sorted(NIFTI_TYPES) + [0, 3, 99])),
       pixdim=floats(8), srow=floats(12),
       codes=mostly(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.tuples(st.integers(-1, 5), st.integers(-1, 5))),
       vox_offset=mostly(st.just(352.0), st.sampled_from([0.0, 348.0, 1e9, float("nan"), 400.0])),
       kind=kinds, compressed=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_nifti_headers(ndim, sizes, datatype, pixdim, srow, codes, vox_offset, kind, compressed, seed):
    rng = np.random.default_rng(seed)
    bitpix = NIFTI_TYPES.get(datatype, 8)
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, ndim, *[max(-32768, min(32767, s)) for s in sizes])
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, *pixdim)
    struct.pack_into("<f", header, 108, vox_offset)
    struct.pack_into("<f", header, 112, 1.0)
    struct.pack_into("<hh", header, 252, *codes)
    struct.pack_into("<12f", header, 280, *srow)
    header[344:348] = b"n+1\0"
    used = sizes[:max(0, min(ndim, 7))]
    claimed = int(np.prod([max(s, 1) for s in used], dtype=np.float64) * bitpix // 8) if used else 0
    data = bytes(header) + payload(rng, claimed, kind)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("scan.nii.gz" if compressed else "scan.nii")
        path.write_bytes(gzip.compress(data, compresslevel=1) if compressed else data)
        check_read(path)


NRRD_TYPES = ["uchar", "short", "ushort", "int", "float", "double", "int64", "block", "signed char"]


@given(dimension=mostly(st.just(3), st.integers(-1, 6)), sizes=dims(6),
       type_=mostly(st.sampled_from(NRRD_TYPES[:5]), st.sampled_from(NRRD_TYPES)),
       spacings=floats(6), directions=st.booleans(),
       encoding=mostly(st.sampled_from(["raw", "gzip"]), st.sampled_from(["ascii", "bzip2", "hex"])), kind=kinds,
       detached=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_nrrd_headers(dimension, sizes, type_, spacings, directions, encoding, kind, detached, seed):
    rng = np.random.default_rng(seed)
    n = max(dimension, 0)
    lines = ["NRRD0004", f"type: {type_}", f"dimension: {dimension}", "sizes: " + " ".join(map(str, sizes[:n])),
             f"encoding: {encoding}", "endian: little"]
    if directions:
        vectors = " ".join("(" + ",".join(str(spacings[(i + j) % 6]) for j in range(n)) + ")" for i in range(n))
        space = "space: left-posterior-superior" if n == 3 else f"space dimension: {n}"
        lines += [space, f"space directions: {vectors}"]
    else:
        lines.append("spacings: " + " ".join(map(str, spacings[:n])))
    itemsize = {"uchar": 1, "signed char": 1, "short": 2, "ushort": 2, "int": 4, "float": 4}.get(type_, 8)
    claimed = int(np.prod([max(s, 1) for s in sizes[:n]], dtype=np.float64) * itemsize) if n else 0
    body = payload(rng, claimed, kind)
    if encoding == "gzip":
        body = gzip.compress(body, compresslevel=1)
    check_scan_file(lines, body, detached, (".nrrd", "", "\n"), (".nhdr", "data file: scan.raw"))


META_TYPES = ["MET_UCHAR", "MET_SHORT", "MET_FLOAT", "MET_DOUBLE", "MET_LONG_LONG", "MET_UCHAR_ARRAY", "MET_OTHER"]


@given(ndims=mostly(st.just(3), st.integers(-1, 6)), sizes=dims(6),
       type_=mostly(st.sampled_from(META_TYPES[:3]), st.sampled_from(META_TYPES)),
       spacings=floats(6), matrix=floats(9),
       compressed=st.booleans(), kind=kinds, detached=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_metaimage_headers(ndims, sizes, type_, spacings, matrix, compressed, kind, detached, seed):
    rng = np.random.default_rng(seed)
    n = max(ndims, 0)
    itemsize = {"MET_UCHAR": 1, "MET_SHORT": 2, "MET_FLOAT": 4}.get(type_, 8)
    claimed = int(np.prod([max(s, 1) for s in sizes[:n]], dtype=np.float64) * itemsize) if n else 0
    body = payload(rng, claimed, kind)
    if compressed:
        body = gzip.compress(body, compresslevel=1)[10:-8]  # MetaImage stores a bare zlib/deflate stream
    lines = ["ObjectType = Image", f"NDims = {ndims}", "DimSize = " + " ".join(map(str, sizes[:n])),
             f"ElementType = {type_}", "ElementSpacing = " + " ".join(map(str, spacings[:n])),
             "TransformMatrix = " + " ".join(map(str, matrix[:n * n])), f"CompressedData = {compressed}"]
    check_scan_file(lines, body, detached, (".mha", "ElementDataFile = LOCAL", ""),
                    (".mhd", "ElementDataFile = scan.raw"))


def test_the_isolation_reports_hangs_crashes_and_large_allocations():
    """What the fuzz tests rely on: each failure mode of a reader ends the child and is named."""
    import os
    import signal
    import time

    assert run_isolated(lambda: time.sleep(30), timeout=1).kind == "hang"
    assert run_isolated(lambda: os.kill(os.getpid(), signal.SIGSEGV)).kind == "crash"
    assert run_isolated(lambda: np.ones(4 << 30, dtype=np.uint8).sum()).kind == "MemoryError"
    assert run_isolated(lambda: read_resampled("/nonexistent.nii")).raised(ScanError)
    assert run_isolated(lambda: 7).value == 7
