"""Read CT/MR scans, resample them to a fixed spacing and scale intensities to [0, 1].

The resampling follows the official ``load_sitk_with_resample`` (identity transform, same origin and
direction, linear interpolation, output size ``int(in_size * in_spacing / out_spacing + 0.5)``), and the
CT scaling follows ``luna_preprocess`` (clip HU to [-1000, 1000], scale to [0, 1]). Deviations:

- the image is cast to float32 before resampling; the official code resampled in the file's pixel type,
  which truncates interpolated int16 HU values to integers;
- voxels of the output grid that fall outside the input image (the last slice when the output size is
  rounded up) get the image minimum (air for CT) instead of SimpleITK's default 0, which is 0 HU (soft
  tissue) in CT;
- MR volumes, which the official code never handled, are scaled by their 0.5th/99.5th percentiles.

:func:`read_resampled` is the shared first half (read, check, resample, detect the modality); :func:`load_scan`
scales its result to float32 [0, 1], and :func:`pcrlv2_fast.data.cache.preprocess` stores it as int16 HU or
float16 z-scores with the window that maps them to [0, 1] (:attr:`Volume.window`).

Every problem with an input file raises :class:`ScanError`, whose message names the file and says what to do.

DICOM series folders are checked before their pixels are read, because SimpleITK reads a broken series without
an error: it silently leaves out files it cannot parse and stacks the remaining slices as if they were evenly
spaced, with the average spacing (one missing slice shifts every slice after it). A folder is refused, naming
the files concerned, when it holds more than one SeriesInstanceUID, when one of its ``.dcm`` files cannot be
read as a DICOM image (truncated or corrupt), when slices lack their position/orientation tags or disagree on
the orientation, when two slices share a position (several acquisitions under one series UID), when slices
are missing (a step between neighbouring slice positions of 1.5 times the median step or more; missing slices
at either end cannot be seen), and when the spacing is otherwise not uniform (a slice lies more than 10% of
the median step off the evenly spaced grid between the first and last slice). These are errors, not
warnings: the resampled volume would be geometrically wrong and the cache cannot represent the gap, so the
scan is left out (``preprocess`` reports it and goes on with the others) until the series is repaired.
"""

from __future__ import annotations

import gzip
import math
import mmap
import os
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import SimpleITK as sitk

def _simpleitk():
    """SimpleITK, imported when a scan is read: training from a preprocessed cache does not need it."""
    try:
        import SimpleITK
    except ImportError as exc:
        raise ScanError(f"reading scans needs SimpleITK ({exc}): pip install SimpleITK; a preprocessed cache "
                        "(pcrlv2-fast preprocess) trains without it") from exc
    return SimpleITK


__all__ = [
    "ScanError",
    "Volume",
    "ResampledScan",
    "find_scans",
    "read_resampled",
    "load_scan",
    "load_volumes",
    "SCAN_SUFFIXES",
    "MIN_SHAPE",
]

#: File name endings read as one scan each (case-insensitive). DICOM series are folders of ``.dcm`` files.
SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mhd", ".mha")
DICOM_SUFFIX = ".dcm"
#: Smallest resampled shape (x, y, z) accepted: the smallest official global crop.
MIN_SHAPE = (64, 64, 32)
MODALITIES = ("auto", "ct", "mr")
# The 1st percentile of a CT scan is air (about -1000 HU); MR intensities are never this negative.
_CT_AIR_THRESHOLD = -500.0
_MR_PERCENTILES = (0.5, 99.5)
_ACCEPTED = ", ".join(SCAN_SUFFIXES) + f" files or DICOM series folders (*{DICOM_SUFFIX})"
# DICOM slice geometry checks (see the module docstring), in units of the series' median slice step: a step of
# at least _DICOM_GAP is a gap, one below _DICOM_SAME puts two slices at one position, and a slice further than
# _DICOM_OFF_GRID from the even grid between the first and last slice makes the spacing non-uniform. Scanner
# position rounding (e.g. to 0.01 mm) stays far below these.
_DICOM_GAP = 1.5
_DICOM_SAME = 0.1
_DICOM_OFF_GRID = 0.1
# Largest difference between the direction cosines of two slices of one series still taken as one orientation.
_DICOM_ORIENTATION_TOL = 1e-3
_DICOM_POSITION, _DICOM_ORIENTATION = "0020|0032", "0020|0037"
# At most this many files or gaps are named in one message.
_DICOM_LISTED = 5


class ScanError(ValueError):
    """A scan that cannot be used; the message names the file and what to do about it."""


@dataclass
class Volume:
    """One resampled scan whose stored values map to [0, 1] through ``window``.

    ``array`` (C-order, axes x, y, z) holds float32 values already in [0, 1] with ``window = (0, 1)`` (what
    :func:`load_scan` returns), or raw values such as int16 HU or float16 MR z-scores (a memory-mapped cache,
    see :mod:`pcrlv2_fast.data.cache`); the [0, 1] intensity of a stored value ``v`` is
    ``clip((v - lo) / (hi - lo), 0, 1)`` with ``(lo, hi) = window``, applied crop by crop by the dataset.
    """

    name: str
    source: Path
    array: np.ndarray
    spacing: tuple[float, float, float]
    modality: str  # "ct" | "mr"
    window: tuple[float, float] = (0.0, 1.0)
    origin: tuple[float, float, float] | None = None  # physical position (mm) of voxel (0, 0, 0)
    direction: tuple[float, ...] | None = None  # 3x3 direction cosines, row-major (SimpleITK's order)

    def __getstate__(self) -> dict:
        # A memory-mapped .npy pickles as its file name (DataLoader workers under spawn/forkserver re-map it)
        # instead of as the whole volume, which numpy's own pickling of a memmap would read and copy.
        state = dict(self.__dict__)
        array = self.array
        if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename:
            state["array"] = _MappedNpy(Path(array.filename), array.shape, array.dtype.str)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["array"], _MappedNpy):
            state["array"] = state["array"].open()
        self.__dict__.update(state)


@dataclass(frozen=True)
class _MappedNpy:
    """A picklable reference to a memory-mapped .npy file."""

    path: Path
    shape: tuple[int, ...]
    dtype: str

    def open(self) -> np.memmap:
        array = np.load(self.path, mmap_mode="r")
        if array.shape != self.shape or array.dtype.str != self.dtype:
            raise ScanError(
                f"{self.path}: changed on disk (now {array.dtype} {array.shape}, expected {self.dtype} {self.shape}) "
                "while a run was using it; re-run `pcrlv2-fast preprocess`."
            )
        return array


@dataclass
class ResampledScan:
    """A scan read, checked and resampled, before any intensity scaling (see :func:`read_resampled`)."""

    path: Path
    array: np.ndarray  # float32, C-order, axes (x, y, z), in the file's units (HU for CT)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    modality: str  # "ct" | "mr" (decided when "auto" was asked for)


def _has_scan_suffix(name: str) -> bool:
    lower = name.lower()
    return any(lower.endswith(suffix) for suffix in SCAN_SUFFIXES)


def _is_dicom_name(name: str) -> bool:
    return name.lower().endswith(DICOM_SUFFIX)


def find_scans(path: str | os.PathLike) -> list[Path]:
    """List the scans under ``path``, sorted.

    ``path`` is a single scan file (a ``.dcm`` file stands for its series folder) or a folder searched
    recursively for scan files and DICOM series folders (folders that directly contain ``.dcm`` files).
    Hidden files and folders (name starting with ``.``) are ignored.
    """
    root = Path(path)
    if not root.exists():
        raise ScanError(f"{root}: no such file or folder. Pass a scan file or a folder of scans ({_ACCEPTED}).")
    if root.is_file():
        if _is_dicom_name(root.name):
            return [root.parent]
        if _has_scan_suffix(root.name):
            return [root]
        raise ScanError(f"{root}: unsupported file format. Accepted: {_ACCEPTED}.")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prunes the walk below hidden folders
        visible = [f for f in filenames if not f.startswith(".")]
        if any(_is_dicom_name(f) for f in visible):
            found.append(folder)
        found.extend(folder / f for f in visible if _has_scan_suffix(f))
    if not found:
        raise ScanError(f"{root}: no scans found (searched recursively for {_ACCEPTED}).")
    return sorted(found)


def scan_name(path: Path) -> str:
    """The scan's name: its file name without the scan suffix, or the DICOM series folder's name."""
    if path.is_dir():
        return path.name
    lower = path.name.lower()
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _reason(error: Exception) -> str:
    """The informative part of an exception message: for ITK errors, the text after "ERROR:" without the
    object address, on one line."""
    text = str(error)
    if "ERROR:" in text:
        text = re.sub(r"^\s*\w+\(0x[0-9a-f]+\):\s*", "", text.split("ERROR:", 1)[1])
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


# NIfTI-1 (348-byte) and NIfTI-2 (540-byte) header fields: (struct format, offset) per field.
_NIFTI_LAYOUTS = {
    348: {"dim": ("8h", 40), "bitpix": ("h", 72), "pixdim": ("8f", 76), "vox_offset": ("f", 108),
          "qform_code": ("h", 252), "sform_code": ("h", 254), "quatern": ("6f", 256), "srow": ("12f", 280)},
    540: {"dim": ("8q", 16), "bitpix": ("h", 14), "pixdim": ("8d", 104), "vox_offset": ("q", 168),
          "qform_code": ("i", 344), "sform_code": ("i", 348), "quatern": ("6d", 352), "srow": ("12d", 400)},
}


def _nifti_header(header: bytes) -> dict:
    """The geometry fields of a NIfTI-1 or NIfTI-2 header (either byte order); ValueError for anything else."""
    for order in "<>":
        layout = _NIFTI_LAYOUTS.get(struct.unpack(order + "i", header[:4])[0])
        if layout is not None and len(header) >= max(348, struct.unpack(order + "i", header[:4])[0]):
            return {key: struct.unpack_from(order + fmt, header, offset) for key, (fmt, offset) in layout.items()}
    raise ValueError("not a NIfTI-1/2 header")


def _nifti_problem(h: dict) -> str | None:
    """Why ITK must not be handed this header (it loops forever on some non-finite affines), or None."""
    ndim, dims = h["dim"][0], h["dim"][1:]
    if not 1 <= ndim <= 7 or min(dims[:ndim]) < 1:
        return f"dimensions {h['dim'][:max(1, min(ndim, 7)) + 1]} (dim[0] must be 1..7 and each size >= 1)"
    if h["bitpix"][0] <= 0 or not np.isfinite(h["vox_offset"][0]) or h["vox_offset"][0] < 0:
        return f"bitpix {h['bitpix'][0]} / vox_offset {h['vox_offset'][0]} (must be positive / finite, >= 0)"
    pixdim = h["pixdim"][1:min(ndim, 3) + 1]
    if not all(np.isfinite(v) and v != 0 for v in pixdim):
        return f"voxel sizes (pixdim) {pixdim} (must be finite and non-zero)"
    for code, values in (("qform_code", "quatern"), ("sform_code", "srow")):
        if not 0 <= h[code][0] <= 4:
            return f"{code} {h[code][0]} (must be 0..4)"
        if h[code][0] > 0 and not all(np.isfinite(v) for v in h[values]):
            what = "quaternion/offset" if values == "quatern" else "affine (srow)"
            return f"{what} {h[values]} (must be finite when {code} > 0)"
    return None


def _nifti_expected_bytes(h: dict) -> tuple[int, int]:
    """(vox_offset, voxel data bytes) of a checked NIfTI header."""
    ndim = h["dim"][0]
    n_voxels = math.prod(h["dim"][1:ndim + 1])
    return int(h["vox_offset"][0]), n_voxels * h["bitpix"][0] // 8


def _check_nifti_complete(path: Path) -> None:
    """Raise ScanError when a NIfTI header is inconsistent (see :func:`_nifti_problem`) or the file holds less voxel
    data than the header promises.

    SimpleITK fills the missing part of a truncated NIfTI file with zeros without any error, so the length
    is checked here (for .nii.gz by decompressing the stream, which also verifies the gzip checksum).
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        if compressed:
            with gzip.open(path, "rb") as stream:
                header = stream.read(540)
                length = len(header)
                while chunk := stream.read(1 << 22):
                    length += len(chunk)
        else:
            with open(path, "rb") as stream:
                header = stream.read(540)
            length = path.stat().st_size
        fields = _nifti_header(header)
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as error:
        raise ScanError(
            f"{path}: corrupt or truncated NIfTI file ({_reason(error)}). Re-export or re-download it."
        ) from error
    problem = _nifti_problem(fields)
    if problem:
        raise ScanError(f"{path}: invalid NIfTI header: {problem}; the header is damaged. Re-export the scan.")
    vox_offset, data_bytes = _nifti_expected_bytes(fields)
    if length < vox_offset + data_bytes:
        raise ScanError(
            f"{path}: truncated NIfTI file: the header promises {data_bytes} bytes of voxel data after offset "
            f"{vox_offset}, the file holds {length - vox_offset}. Re-export or re-download it."
        )


def detached_data_file(path: Path) -> Path | None:
    """The single data file named by a detached header (.mhd ``ElementDataFile``, .nhdr ``data file``).

    None for other formats, for data stored in the header file itself, and for lists or patterns of files.
    """
    lower = path.name.lower()
    if lower.endswith(".mhd"):
        pattern = r"^\s*ElementDataFile\s*=\s*(.+?)\s*$"
    elif lower.endswith(".nhdr"):
        pattern = r"^\s*data ?file\s*:\s*(.+?)\s*$"
    else:
        return None
    match = re.search(pattern, path.read_text(errors="replace"), re.MULTILINE | re.IGNORECASE)
    if match is None:
        return None
    name = match.group(1)
    if name.upper() == "LOCAL" or name.upper().startswith("LIST") or "%" in name:
        return None
    return path.parent / name


# MetaImage header fields of NDims numbers (NDims squared for the matrices); ITK's parser is not trusted with them.
_META_VECTORS = ("DimSize", "ElementSpacing", "ElementSize", "Offset", "Position", "Origin", "CenterOfRotation")
_META_MATRICES = ("TransformMatrix", "Rotation", "Orientation")


def _metaimage_fields(path: Path) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header, up to ElementDataFile (binary data may follow it)."""
    with open(path, "rb") as fh:
        text = fh.read(1 << 16).decode("latin-1")
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    return fields


def _check_metaimage_header(path: Path) -> None:
    """Refuse MetaImage headers ITK mishandles: a non-positive NDims makes its parser loop forever, and sizes or
    vectors of the wrong length are read past their end."""
    fields = _metaimage_fields(path)
    try:
        ndims = int(fields.get("NDims", ""))
    except ValueError:
        ndims = 0
    if not 1 <= ndims <= 16:
        raise ScanError(f"{path}: MetaImage header with NDims = {fields.get('NDims', '(missing)')!r}, not a positive "
                        "number of dimensions; the header is damaged. Re-export the scan.")
    for key in _META_VECTORS + _META_MATRICES:
        if key not in fields:
            continue
        want = ndims * ndims if key in _META_MATRICES else ndims
        try:
            values = [float(v) for v in fields[key].split()]
        except ValueError:
            values = []
        if len(values) != want or (key == "DimSize" and not all(v >= 1 and v == int(v) for v in values)):
            raise ScanError(f"{path}: MetaImage header field {key} = {fields[key][:80]!r}: expected {want} "
                            f"{'positive integers' if key == 'DimSize' else 'numbers'} for NDims = {ndims}; the "
                            "header is damaged. Re-export the scan.")


# NRRD encodings whose data ITK parses as text; binary bytes there crash it (a segmentation fault in teem).
_NRRD_TEXT = ("ascii", "text", "txt")
_NRRD_TEXT_CHARS = re.compile(rb"[^0-9eEinfINFaA.+\-,\s]")


def _check_nrrd_text_data(path: Path) -> None:
    """Refuse a text-encoded NRRD whose data is not text numbers, before ITK reads it."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    end = head.find(b"\n\n")
    header = (head if end < 0 else head[:end]).decode("latin-1")
    lines = (line.partition(":") for line in header.splitlines())
    fields = {key.strip().lower(): value.strip() for key, sep, value in lines if sep}
    if fields.get("encoding", "").lower() not in _NRRD_TEXT:
        return
    data_file = detached_data_file(path)
    if data_file is not None:
        data = data_file.read_bytes() if data_file.is_file() else b""
    else:
        data = path.read_bytes()[end + 2:] if end >= 0 else b""
    bad = _NRRD_TEXT_CHARS.search(data)
    if bad is not None:
        raise ScanError(f"{path}: NRRD with encoding {fields['encoding']!r} but its data holds a non-text byte "
                        f"{bad.group()!r} at offset {bad.start()}; the file is damaged. Re-export the scan.")


def _check_metaimage_data_file(path: Path) -> None:
    """Name the missing data file of a .mhd header (ITK only reports "No such file or directory")."""
    data_file = detached_data_file(path)
    if data_file is not None and not data_file.is_file():
        raise ScanError(f"{path}: its data file {data_file} is missing; copy it next to the header.")


def _listed(items: list[str]) -> str:
    """The first few items joined with "; ", and how many more there are."""
    shown = "; ".join(items[:_DICOM_LISTED])
    return shown + (f"; and {len(items) - _DICOM_LISTED} more" if len(items) > _DICOM_LISTED else "")


def _dicom_header(path: Path) -> sitk.ImageFileReader:
    """A reader holding the header of one DICOM file (pixels not read); RuntimeError when GDCM cannot parse it."""
    sitk = _simpleitk()
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _dicom_file_problem(path: Path) -> str:
    """Why GDCM left a .dcm file out of every series: its parse error, or its SeriesInstanceUID when it parses."""
    size = f"{path.stat().st_size} bytes"
    try:
        header = _dicom_header(path)
    except RuntimeError as error:
        return f"not a readable DICOM image, {size}, truncated or corrupt: {_reason(error)}"
    uid = header.GetMetaData("0020|000e").strip() if header.HasMetaDataKey("0020|000e") else "none"
    return f"a DICOM header GDCM does not sort into a series ({size}, SeriesInstanceUID {uid})"


def _dicom_vector(header: sitk.ImageFileReader, tag: str, n: int) -> np.ndarray | None:
    """A multi-valued decimal tag (e.g. "0020|0032") as n floats, None when it is absent or malformed."""
    if not header.HasMetaDataKey(tag):
        return None
    try:
        values = np.array([float(v) for v in header.GetMetaData(tag).strip().split("\\")])
    except ValueError:
        return None
    return values if values.shape == (n,) and np.isfinite(values).all() else None


def _check_dicom_slices(folder: Path, files: list[Path]) -> None:
    """Raise ScanError unless the slices of a single-frame series share one orientation and lie on an evenly
    spaced grid along the slice normal (no missing, doubled or irregularly spaced slices)."""
    positions, orientations = _dicom_geometry(folder, files)
    common = _common_orientation(folder, files, orientations)
    along = np.array(positions) @ np.cross(common[:3], common[3:])  # mm along the slice normal
    order = np.argsort(along, kind="stable")
    _check_slice_steps(folder, along[order], [files[i].name for i in order])


def _dicom_geometry(folder: Path, files: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each slice's ImagePositionPatient and ImageOrientationPatient; a ScanError names the slices lacking them."""
    positions, orientations, untagged = [], [], []
    for file in files:
        try:
            header = _dicom_header(file)
        except RuntimeError as error:
            raise ScanError(f"{folder}: cannot read the DICOM header of {file} ({_reason(error)}); "
                            "replace it with an intact copy of the series.") from error
        position = _dicom_vector(header, _DICOM_POSITION, 3)
        orientation = _dicom_vector(header, _DICOM_ORIENTATION, 6)
        if position is None or orientation is None:
            untagged.append(file.name)
        positions.append(position)
        orientations.append(orientation)
    if untagged:
        raise ScanError(
            f"{folder}: {len(untagged)} of {len(files)} slices lack a valid ImagePositionPatient (0020,0032) or "
            f"ImageOrientationPatient (0020,0037): {_listed(untagged)}. Without them the slices cannot be placed "
            "in 3D; export the series with its geometry tags, or convert it to NIfTI/NRRD with a tool you trust."
        )
    return positions, orientations


def _common_orientation(folder: Path, files: list[Path], orientations: list[np.ndarray]) -> np.ndarray:
    """The orientation most slices share (the series'); a ScanError names the slices at others."""
    counts = Counter(tuple(np.round(o / _DICOM_ORIENTATION_TOL).astype(np.int64)) for o in orientations)
    key = counts.most_common(1)[0][0]
    common = next(o for o in orientations if tuple(np.round(o / _DICOM_ORIENTATION_TOL).astype(np.int64)) == key)
    differing = [f.name for f, o in zip(files, orientations) if np.abs(o - common).max() > _DICOM_ORIENTATION_TOL]
    if differing:
        raise ScanError(
            f"{folder}: slices with different orientations (ImageOrientationPatient) in one series: "
            f"{len(files) - len(differing)} slice(s) at {_dicom_text(common)}, {len(differing)} at other "
            f"orientations: {_listed(differing)}. The folder mixes acquisitions (e.g. localizer and axial slices) "
            "under one SeriesInstanceUID; move the slices of each orientation into their own folder."
        )
    return common


def _check_slice_steps(folder: Path, along: np.ndarray, names: list[str]) -> None:
    """Sorted slice positions ``along`` the normal (mm) must be evenly spaced: no doubled position, no gap, no
    slice off the grid. Each problem is one ScanError naming the slices."""
    steps = np.diff(along)
    # The reference step ignores doubled positions, which would otherwise drag the median to 0.
    distinct = steps[steps > 1e-6 * max(1.0, float(along[-1] - along[0]))]
    step = float(np.median(distinct)) if distinct.size else 0.0
    spacing_note = f"the median slice step is {step:.4g} mm"
    same = np.flatnonzero(steps < _DICOM_SAME * step) if step > 0 else np.arange(len(steps))
    if same.size:
        pairs = [f"{names[i]} and {names[i + 1]} at {along[i]:.4g} mm" for i in same]
        raise ScanError(
            f"{folder}: {same.size} pair(s) of slices at the same position along the slice normal: "
            f"{_listed(pairs)} ({spacing_note}). The series holds several acquisitions (echoes, phases, "
            "repeats) under one SeriesInstanceUID; move each acquisition into its own folder."
        )
    gaps = np.flatnonzero(steps >= _DICOM_GAP * step)
    if gaps.size:
        descriptions = []
        for i in gaps:
            n_missing = max(1, round(steps[i] / step) - 1)
            expected = ", ".join(f"{along[i] + k * steps[i] / (n_missing + 1):.4g}" for k in range(1, n_missing + 1))
            descriptions.append(f"{n_missing} slice(s) missing between {names[i]} ({along[i]:.4g} mm) and "
                                f"{names[i + 1]} ({along[i + 1]:.4g} mm), expected at {expected} mm")
        raise ScanError(
            f"{folder}: missing slices: {_listed(descriptions)} ({spacing_note}; positions in mm along the slice "
            "normal). Copy the missing files from the original export, or re-export or re-download the series; "
            "read as it is, every slice after a gap would be shifted."
        )
    grid = along[0] + np.arange(len(along)) * (along[-1] - along[0]) / (len(along) - 1)
    off = np.abs(along - grid)
    worst = int(off.argmax())
    if off[worst] > _DICOM_OFF_GRID * step:
        raise ScanError(
            f"{folder}: non-uniform slice spacing: steps between neighbouring slices range from "
            f"{steps.min():.4g} to {steps.max():.4g} mm ({spacing_note}), and slice {names[worst]} lies "
            f"{off[worst]:.3g} mm off the evenly spaced grid. Read as it is, the volume would be distorted along "
            "the slice normal; resample the series onto a uniform grid (e.g. convert it to NIfTI with a tool "
            "that handles variable spacing) and pass that file instead."
        )


def _dicom_text(values: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in values)


def _read_dicom_series(folder: Path) -> sitk.ImageSeriesReader:
    """A reader for the one DICOM series in ``folder``, after the checks listed in the module docstring."""
    sitk = _simpleitk()
    dcm_files = sorted(p for p in folder.iterdir()
                       if _is_dicom_name(p.name) and not p.name.startswith(".") and p.is_file())
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        example = f" (e.g. {dcm_files[0]}: {_dicom_file_problem(dcm_files[0])})" if dcm_files else ""
        raise ScanError(
            f"{folder}: no readable DICOM series in this folder: none of its {len(dcm_files)} .dcm files could be "
            f"sorted into a series{example}. Check that the .dcm files are intact DICOM images; re-export them."
        )
    members = {uid: [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]
               for uid in series}
    if len(series) > 1:
        described = [f"{uid} ({len(files)} files, e.g. {files[0].name})" for uid, files in members.items()]
        raise ScanError(
            f"{folder}: {len(series)} DICOM series (SeriesInstanceUID) mixed in one folder: {_listed(described)}. "
            "Move each series into its own folder; each folder is read as one scan."
        )
    files = members[series[0]]
    in_series = {f.name for f in files}
    left_out = [f for f in dcm_files if f.name not in in_series]
    if left_out:
        problems = [f"{f} ({_dicom_file_problem(f)})" for f in left_out]
        raise ScanError(
            f"{folder}: {len(left_out)} of its {len(dcm_files)} .dcm files cannot be part of the series, which would "
            f"silently lack those slices: {_listed(problems)}. Replace them with intact copies (re-export or "
            "re-download the series), or delete files that do not belong to it."
        )
    if len(files) > 1:  # one file is a multi-frame image, whose geometry ITK reads from the file itself
        _check_dicom_slices(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return reader


def read_image(path: Path, spacing: tuple[float, float, float] | None = None) -> sitk.Image:
    """The SimpleITK image of a scan file or DICOM series folder; every failure is a ScanError naming the file.

    The header is read first: a scan whose voxels (and, given the target ``spacing``, its resampled copy) would
    not fit in the memory available is refused before its pixels are read (:func:`_check_memory`).
    """
    sitk = _simpleitk()
    if path.is_dir():
        reader = _read_dicom_series(path)
        header, n_files = _dicom_header(Path(reader.GetFileNames()[0])), len(reader.GetFileNames())
    else:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(path)
        elif path.name.lower().endswith((".mhd", ".mha")):
            _check_metaimage_header(path)
            _check_metaimage_data_file(path)
        elif path.name.lower().endswith((".nrrd", ".nhdr")):
            _check_nrrd_text_data(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        header, n_files = reader, 1
    try:
        if header is reader:
            reader.ReadImageInformation()
        _check_memory(path, header, n_files, spacing)
        return reader.Execute()
    except RuntimeError as error:
        raise ScanError(
            f"{path}: SimpleITK cannot read it ({_reason(error)}). The file may be truncated or corrupt, "
            "or for .mhd/.nhdr the data file it names may be missing or of the wrong size; re-export the scan."
        ) from error


def memory_available() -> int | None:
    """Bytes of memory a new allocation can get without swapping (Linux MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _bytes_per_voxel(header: sitk.ImageFileReader) -> int:
    sitk = _simpleitk()
    component = sitk.Image([1] * header.GetDimension(), header.GetPixelID()).GetSizeOfPixelComponent()
    return component * max(1, header.GetNumberOfComponents())


# Deflate (gzip/zlib, the compression of NRRD, MetaImage and NIfTI) shrinks data at most ~1032 times.
_MAX_COMPRESSION = 1100


def _check_claim(path: Path, claimed: int, size: list[int]) -> None:
    """Refuse a file whose header claims more voxel bytes than its data could hold even at deflate's largest
    compression ratio: SimpleITK would allocate the claim before finding the data short."""
    if path.is_dir():
        return  # DICOM: GDCM reads slice by slice, each checked when the series was sorted
    data = detached_data_file(path) or path
    if not data.is_file():
        return  # a list or pattern of data files: ITK reports what is missing
    on_disk = data.stat().st_size
    if claimed > _MAX_COMPRESSION * max(on_disk, 1):
        raise ScanError(
            f"{path}: the header claims {' x '.join(map(str, size))} voxels ({claimed} bytes), more than "
            f"{data.name} ({on_disk} bytes) can hold even compressed; the file is truncated or its header is wrong. "
            "Re-export the scan."
        )


def _check_memory(path: Path, header: sitk.ImageFileReader, n_files: int,
                  spacing: tuple[float, float, float] | None) -> None:
    """Refuse a scan whose reading and resampling would need more memory than is available (a header claiming
    absurd dimensions, or a real scan too large for this machine): the file's voxels, their float32 copy, and the
    resampled float32 volume twice (SimpleITK's and the transposed array)."""
    # ITK reads some negative spacings (e.g. NIfTI pixdim) as their absolute value when it reads the pixels.
    size, in_spacing = [int(n) for n in header.GetSize()], tuple(abs(s) for s in header.GetSpacing())
    if n_files > 1:  # a series of single slices: one slice's header, the slices stacked (their step ~ its spacing)
        size, in_spacing = size[:2] + [n_files], in_spacing[:2] + (in_spacing[2:3] or (1.0,))
    n_voxels = math.prod(max(n, 1) for n in size)
    needed = n_voxels * (_bytes_per_voxel(header) + 4)
    if spacing is not None and len(size) == 3:
        if all(np.isfinite(s) and s > 0 for s in in_spacing):
            out = math.prod(max(1, int(n * s / o + 0.5)) for n, s, o in zip(size, in_spacing, spacing, strict=True))
            needed += out * 8
    _check_claim(path, n_voxels * _bytes_per_voxel(header), size)
    available = memory_available()
    if available is not None and needed > available:
        gib = 2**30
        raise ScanError(
            f"{path}: {' x '.join(map(str, size))} voxels need about {needed / gib:.1f} GiB to read and resample, more "
            f"than the {available / gib:.1f} GiB of memory available; nothing was read. Check the header's dimensions, "
            "or crop or downsample the scan first (or run where more memory is free)."
        )


# Voxel types a scan may have: real scalars (complex, vector and label-map images are refused).
_SCALAR_TYPES = ("sitkUInt8", "sitkInt8", "sitkUInt16", "sitkInt16", "sitkUInt32", "sitkInt32", "sitkUInt64",
                 "sitkInt64", "sitkFloat32", "sitkFloat64")


def _check_geometry(path: Path, image: sitk.Image) -> None:
    sitk = _simpleitk()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector/RGB image); "
            "pass a single-channel scalar scan."
        )
    if image.GetPixelID() not in {getattr(sitk, name) for name in _SCALAR_TYPES}:
        raise ScanError(f"{path}: voxels of type {image.GetPixelIDTypeAsString()}, not real scalars (integers or "
                        "floats); pass a single-channel scalar scan.")
    size = image.GetSize()
    if image.GetDimension() != 3 or min(size) < 2:
        raise ScanError(f"{path}: image of size {size} is not a 3D volume; pass 3D scans only.")
    spacing = image.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ScanError(f"{path}: invalid voxel spacing {spacing}; fix the header so every spacing is positive.")


def _resample(image: sitk.Image, spacing: tuple[float, float, float], fill: float) -> sitk.Image:
    sitk = _simpleitk()
    in_size, in_spacing = image.GetSize(), image.GetSpacing()
    out_size = [int(n * s / o + 0.5) for n, s, o in zip(in_size, in_spacing, spacing, strict=True)]
    resampler = sitk.ResampleImageFilter()
    resampler.SetTransform(sitk.Transform())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputOrigin(image.GetOrigin())
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetSize(out_size)
    resampler.SetDefaultPixelValue(fill)
    return resampler.Execute(image)


def scale_to_unit(array: np.ndarray, modality: str, hu_window: tuple[float, float]) -> np.ndarray:
    """float32 intensities mapped to [0, 1]: CT through ``hu_window``, MR through its own percentile window."""
    lo, hi = hu_window if modality == "ct" else mr_window(array)
    scaled = (np.clip(array, lo, hi) - lo) / (hi - lo)
    return scaled.astype(np.float32)


def _check_arguments(spacing, modality: str, hu_window=(-1000.0, 1000.0)) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if hu_window[1] <= hu_window[0]:
        raise ValueError(f"hu_window must be (low, high) with low < high, got {hu_window}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")


def read_resampled(
    path: str | os.PathLike,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    modality: str = "auto",
    min_shape: tuple[int, int, int] = MIN_SHAPE,
) -> ResampledScan:
    """Read one scan, check it, resample it to ``spacing`` (mm) and decide its modality; no intensity scaling.

    ``modality="auto"`` picks CT when the 1st percentile of the resampled volume is below -500 (air in HU).
    Raises :class:`ScanError` for unreadable/truncated files, non-3D or vector images, invalid spacing,
    NaN/inf voxels, constant volumes and volumes smaller than ``min_shape`` after resampling.
    """
    sitk = _simpleitk()
    path = Path(path)
    _check_arguments(spacing, modality)
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder.")
    image = read_image(path, tuple(float(v) for v in spacing))
    _check_geometry(path, image)
    image = sitk.Cast(image, sitk.sitkFloat32)
    original = sitk.GetArrayViewFromImage(image)
    n_bad = int(np.count_nonzero(~np.isfinite(original)))
    if n_bad:
        raise ScanError(f"{path}: {n_bad} NaN/inf voxels; fix or remove the scan.")
    low, high = float(original.min()), float(original.max())
    if low == high:
        raise ScanError(f"{path}: every voxel has the value {low}; the scan is empty, remove it.")
    spacing = tuple(float(s) for s in spacing)
    resampled = _resample(image, spacing, fill=low)
    array = np.ascontiguousarray(sitk.GetArrayFromImage(resampled).transpose(2, 1, 0))
    if any(n < m for n, m in zip(array.shape, min_shape, strict=True)):
        raise ScanError(
            f"{path}: resampled shape {array.shape} (x, y, z) at spacing {spacing} mm is smaller than the "
            f"minimum {tuple(min_shape)}; use a larger scan or a finer spacing (for pretraining, a smaller "
            "--crop-scale lowers the minimum)."
        )
    if modality == "auto":
        modality = "ct" if np.percentile(array, 1.0) < _CT_AIR_THRESHOLD else "mr"
    return ResampledScan(
        path=path,
        array=array,
        spacing=spacing,
        origin=tuple(float(v) for v in resampled.GetOrigin()),
        direction=tuple(float(v) for v in resampled.GetDirection()),
        modality=modality,
    )


def mr_window(array: np.ndarray) -> tuple[float, float]:
    """The (low, high) intensities that map an MR volume to [0, 1]: its 0.5th/99.5th percentiles."""
    lo, hi = (float(v) for v in np.percentile(array, _MR_PERCENTILES))
    if hi <= lo:
        # Mostly-constant scans (e.g. > 99% background) collapse the percentiles; use the full range.
        lo, hi = float(array.min()), float(array.max())
    return lo, hi


def load_scan(
    path: str | os.PathLike,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    modality: str = "auto",
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    min_shape: tuple[int, int, int] = MIN_SHAPE,
) -> Volume:
    """Read one scan, resample it to ``spacing`` (mm) and scale intensities to float32 [0, 1].

    ``modality``: ``"ct"`` clips HU to ``hu_window`` and scales linearly; ``"mr"`` scales by the 0.5th/99.5th
    percentiles and clips; ``"auto"`` picks CT when the 1st percentile is below -500 (air in HU).
    Raises :class:`ScanError` as :func:`read_resampled` does.
    """
    _check_arguments(spacing, modality, hu_window)
    scan = read_resampled(path, spacing=spacing, modality=modality, min_shape=min_shape)
    return Volume(
        name=scan_name(scan.path),
        source=scan.path,
        array=scale_to_unit(scan.array, scan.modality, hu_window),
        spacing=scan.spacing,
        modality=scan.modality,
        origin=scan.origin,
        direction=scan.direction,
    )


def load_volumes(
    path: str | os.PathLike,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    modality: str = "auto",
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    progress: bool = True,
) -> list[Volume]:
    """Load every scan under ``path`` (see :func:`find_scans`); the first bad scan raises its ScanError."""
    scans = find_scans(path)
    return [
        load_scan(scan, spacing=spacing, modality=modality, hu_window=hu_window)
        for scan in tqdm(scans, desc="loading scans", unit="scan", disable=not progress)
    ]
