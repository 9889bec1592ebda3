"""Fine-tuning data: find image/label cases, load them on one voxel grid, and sample training patches.

Where cases come from (:func:`find_cases`):

- a folder with ``imagesTr/`` and ``labelsTr/`` (Medical Segmentation Decathlon / nnU-Net): the label
  ``labelsTr/<case>.nii.gz`` goes with ``imagesTr/<case>.nii.gz`` or, one file per input channel,
  ``imagesTr/<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...;
- a folder with ``<case>_image.<ext>`` and ``<case>_label.<ext>`` files anywhere below it (the pyradiomics samples);
- for classification, a folder of class folders (``DIR/<class>/<scan>``; classes sorted by name);
- a CSV file with columns ``image`` (or several ``image*`` columns, one per input channel, in column order),
  ``label`` and optionally ``patient`` and ``id``;
- a JSON file: a list of ``{"image": path or [paths], "label": path or class, "patient": ..., "id": ...}`` or a
  Decathlon ``dataset.json`` (its ``"training"`` list).

Relative paths in lists are relative to the list file. Cases of one ``patient`` always land in the same split
(without the column, every case is its own patient). Images may be NIfTI, NRRD or MetaImage files.

Loading (:func:`load_case`) reads every channel with :func:`pcrlv2_fast.data.io.read_resampled` (linear
resampling to the chosen spacing, or the scan's own spacing), scales it as pretraining does (CT: HU window to
[0, 1]; MR: 0.5th/99.5th percentiles) and z-normalises it over the volume, because the pretraining network saw
z-normalised views. The label map is resampled with nearest-neighbour interpolation onto the same grid. A label
whose size, spacing, origin or orientation differs from its image's is refused: it would be silently misaligned.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ..data.io import SCAN_SUFFIXES, ScanError, read_resampled, scale_to_unit, scan_name
from ..data.io import read_image as read_image_checked  # names the file in every error
from .options import TASKS

__all__ = [
    "Case",
    "LoadedCase",
    "Preprocessing",
    "PatchSampler",
    "find_cases",
    "load_case",
    "load_cases",
    "finalize_labels",
    "resize_volume",
]

# Geometry tolerances between an image and its label: relative spacing, orientation cosines, and origin in
# units of the voxel size (half a voxel off means the label is drawn on another grid).
_SPACING_RTOL = 1e-3
_DIRECTION_ATOL = 1e-3
_ORIGIN_VOXELS = 0.5
# Auto-detected classes are refused when fewer than this share of 0..max label occurs (e.g. 42 of 118 organ ids).
_SPARSE_SHARE = 0.5
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_LAYOUTS = (
    "a folder with imagesTr/ and labelsTr/, a folder of <case>_image.<ext> and <case>_label.<ext> files, "
    "a folder of class folders (--task cls), or a .csv/.json list of image/label pairs"
)


@dataclass(frozen=True)
class Case:
    """One labelled case: its input channels (files), its label (a label-map file or a class index) and patient."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | int
    patient: str


@dataclass(frozen=True)
class Preprocessing:
    """How scans become network inputs; stored in fine-tuning checkpoints so evaluation repeats it exactly.

    ``spacing``: resample to this spacing in mm, or keep each scan's own spacing (None). ``keep_labels``: label
    values kept as classes 1..K in this order, every other value becoming background. ``num_classes`` counts the
    background; None means "max label + 1" (refused when sparse, see :func:`finalize_labels`).
    """

    spacing: tuple[float, float, float] | None = None
    modality: str = "auto"
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    keep_labels: tuple[int, ...] | None = None
    num_classes: int | None = None
    allow_empty: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        for key in ("spacing", "hu_window", "keep_labels"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class LoadedCase:
    """A case in memory: ``image`` (C, X, Y, Z) float32 z-normalised; ``label`` (X, Y, Z) class map or an int."""

    case: Case
    image: np.ndarray
    label: np.ndarray | int
    spacing: tuple[float, float, float]
    modalities: tuple[str, ...] = field(default_factory=tuple)

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def label_source(self) -> str:
        return str(self.case.label) if isinstance(self.case.label, Path) else str(self.case.images[0])


# ------------------------------------------------------------------------------------------------- discovery
def find_cases(data: str | os.PathLike, task: str = "seg") -> tuple[list[Case], list[str] | None]:
    """The cases under ``data`` (a folder or a CSV/JSON list; see the module docstring) and, for classification,
    the class names (None when the labels are plain class indices). Sorted by case id."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    root = Path(data)
    if not root.exists():
        raise ScanError(f"{root}: no such file or folder; pass {_LAYOUTS}")
    class_names = None
    if root.is_file():
        suffix = root.name.lower().rsplit(".", 1)[-1]
        if suffix == "csv":
            rows = _read_csv(root)
        elif suffix == "json":
            rows = _read_json(root)
        else:
            raise ScanError(f"{root}: a list of cases must be a .csv or .json file; pass {_LAYOUTS}")
        cases, class_names = _cases_from_rows(rows, root, task)
    elif (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        _require_seg(root, task, "imagesTr/labelsTr")
        cases = _decathlon_cases(root)
    elif task == "cls":
        cases, class_names = _class_folder_cases(root)
    else:
        cases = _suffix_pair_cases(root)
    if not cases:
        raise ScanError(f"{root}: no cases found; pass {_LAYOUTS}")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ScanError(f"{root}: case ids occur more than once: {duplicates[:5]}; give each case a unique 'id'")
    return sorted(cases, key=lambda c: c.case_id), class_names


def _require_seg(root: Path, task: str, layout: str) -> None:
    if task != "seg":
        raise ScanError(f"{root}: the {layout} layout holds label maps, which is --task seg; for --task cls pass a "
                        "folder of class folders or a CSV/JSON list with a class per case")


def _is_scan_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(SCAN_SUFFIXES)


def _decathlon_cases(root: Path) -> list[Case]:
    images: dict[str, list[Path]] = {}
    for path in sorted((root / "imagesTr").iterdir()):
        if not _is_scan_file(path):
            continue
        name = scan_name(path)
        match = _CHANNEL_SUFFIX.match(name)
        images.setdefault(match.group("case") if match else name, []).append(path)
    cases, unlabelled = [], set(images)
    for label in sorted((root / "labelsTr").iterdir()):
        if not _is_scan_file(label):
            continue
        case_id = scan_name(label)
        if case_id not in images:
            raise ScanError(f"{label}: no image for this label in {root / 'imagesTr'} (expected {case_id}.nii.gz or "
                            f"{case_id}_0000.nii.gz, ...)")
        unlabelled.discard(case_id)
        cases.append(Case(case_id, tuple(sorted(images[case_id])), label, case_id))
    if unlabelled:
        raise ScanError(f"{root / 'imagesTr'}: images without a label in labelsTr: {sorted(unlabelled)[:5]}; add "
                        "their labels or move them to imagesTs")
    return cases


def _suffix_pair_cases(root: Path) -> list[Case]:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not _is_scan_file(path):
                continue
            stem = scan_name(path)
            for suffix, table in (("_image", images), ("_label", labels)):
                if stem.endswith(suffix):
                    case_id = stem[: -len(suffix)]
                    if case_id in table:
                        raise ScanError(f"{root}: two files for case {case_id!r}: {table[case_id]} and {path}")
                    table[case_id] = path
    if not images and not labels:
        raise ScanError(f"{root}: found no image/label pairs; pass {_LAYOUTS}")
    lonely = sorted(set(images) ^ set(labels))
    if lonely:
        where = [str(images.get(c) or labels.get(c)) for c in lonely[:5]]
        raise ScanError(f"{root}: files without their image or label partner: {where}; every <case>_image file "
                        "needs a <case>_label file and vice versa")
    return [Case(c, (images[c],), labels[c], c) for c in images]


def _class_folder_cases(root: Path) -> tuple[list[Case], list[str]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {f.name: sorted(p for p in f.rglob("*") if _is_scan_file(p)) for f in folders}
    per_class = {name: scans for name, scans in per_class.items() if scans}
    if len(per_class) < 2:
        raise ScanError(f"{root}: --task cls expects a folder with one folder of scans per class (at least 2 "
                        f"classes), or a CSV/JSON list; found {len(per_class)} class folder(s) with scans")
    names = sorted(per_class)
    cases = [Case(f"{name}/{scan_name(p)}", (p,), index, f"{name}/{scan_name(p)}")
             for index, name in enumerate(names) for p in per_class[name]]
    return cases, names


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise ScanError(f"{path}: empty CSV; expected a header row with 'image' and 'label' columns")
        columns = [c.strip() for c in reader.fieldnames]
        image_columns = [c for c in columns if c.lower().startswith("image")]
        if not image_columns or "label" not in columns:
            raise ScanError(f"{path}: the CSV needs an 'image' (or image_*) column and a 'label' column; "
                            f"its columns are {columns}")
        rows = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not any(row.values()):
                continue
            rows.append({"image": [row[c] for c in image_columns if row.get(c)], "label": row.get("label", ""),
                         "patient": row.get("patient") or None, "id": row.get("id") or None})
        return rows


def _read_json(path: Path) -> list[dict]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ScanError(f"{path}: not a readable JSON file ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("training"), list):
        obj = obj["training"]
    if not isinstance(obj, list) or not all(isinstance(e, dict) for e in obj):
        raise ScanError(f"{path}: expected a list of {{'image': ..., 'label': ...}} entries or a Decathlon "
                        "dataset.json with a 'training' list")
    rows = []
    for number, entry in enumerate(obj):
        if "image" not in entry or "label" not in entry:
            raise ScanError(f"{path}: entry {number} lacks 'image' or 'label': {entry}")
        image = entry["image"]
        rows.append({"image": list(image) if isinstance(image, list) else [image], "label": entry["label"],
                     "patient": entry.get("patient"), "id": entry.get("id")})
    return rows


def _cases_from_rows(rows: list[dict], source: Path, task: str) -> tuple[list[Case], list[str] | None]:
    base = source.parent
    class_names = None
    if task == "cls":
        raw = [r["label"] for r in rows]
        if all(_is_int(v) for v in raw):
            labels = [int(v) for v in raw]
        else:
            class_names = sorted({str(v) for v in raw})
            labels = [class_names.index(str(v)) for v in raw]
    cases = []
    for number, row in enumerate(rows):
        if not row["image"]:
            raise ScanError(f"{source}: row {number + 1} has no image path")
        images = tuple(_resolve(base, p) for p in row["image"])
        if task == "seg":
            if _is_int(row["label"]) or not str(row["label"]):
                raise ScanError(f"{source}: row {number + 1}: --task seg needs a label-map file in 'label', got "
                                f"{row['label']!r}")
            label: Path | int = _resolve(base, row["label"])
            case_id = row["id"] or scan_name(label)
        else:
            label = labels[number]
            if label < 0:
                raise ScanError(f"{source}: row {number + 1}: class {label} is negative")
            case_id = row["id"] or scan_name(images[0])
        cases.append(Case(str(case_id), images, label, str(row["patient"] or case_id)))
    return cases, class_names


def _is_int(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()) is not None


def _resolve(base: Path, path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else base / path


# --------------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class _Header:
    path: Path
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def _header(path: Path, what: str) -> _Header:
    """A scan file's geometry, read without its voxels."""
    if path.is_dir():
        raise ScanError(f"{path}: fine-tuning reads {what}s from NIfTI, NRRD or MetaImage files, not DICOM folders; "
                        "convert the series first (e.g. with SimpleITK or dcm2niix)")
    if not path.is_file():
        raise ScanError(f"{path}: no such {what} file")
    if not path.name.lower().endswith(SCAN_SUFFIXES):
        raise ScanError(f"{path}: unsupported {what} format; accepted: {', '.join(SCAN_SUFFIXES)}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ScanError(f"{path}: cannot read the {what} header ({' '.join(str(exc).split())[-200:]})") from exc
    if reader.GetDimension() != 3:
        hint = (" A 4D file holds several channels: split it into one 3D file per channel (imagesTr/<case>_0000, "
                "_0001, ... or several image columns in a CSV)") if reader.GetDimension() == 4 else ""
        raise ScanError(f"{path}: {what} has {reader.GetDimension()} dimensions, expected a 3D volume.{hint}")
    if reader.GetNumberOfComponents() != 1:
        raise ScanError(f"{path}: {what} has {reader.GetNumberOfComponents()} components per voxel; pass a scalar "
                        "3D volume")
    return _Header(path, tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                   tuple(reader.GetDirection()))


def _check_same_grid(ref: _Header, other: _Header, what: str) -> None:
    """Refuse ``other`` (a label or another channel) unless it lies on ``ref``'s voxel grid."""
    pair = f"{other.path}: {what}"
    if other.size != ref.size:
        raise ScanError(f"{pair} shape {other.size} differs from image {ref.path} shape {ref.size} (x, y, z); it must "
                        "be drawn on the image's voxel grid")
    if not np.allclose(other.spacing, ref.spacing, rtol=_SPACING_RTOL, atol=0):
        raise ScanError(f"{pair} spacing {_mm(other.spacing)} mm differs from image {ref.path} spacing "
                        f"{_mm(ref.spacing)} mm; it must be drawn on the image's voxel grid")
    if not np.allclose(other.direction, ref.direction, atol=_DIRECTION_ATOL, rtol=0):
        raise ScanError(f"{pair} orientation differs from image {ref.path}; it must be drawn on the image's grid")
    shift = np.abs(np.subtract(other.origin, ref.origin))
    if np.any(shift > _ORIGIN_VOXELS * np.asarray(ref.spacing)):
        raise ScanError(f"{pair} origin {_mm(other.origin)} is {_mm(shift)} mm away from image {ref.path} origin "
                        f"{_mm(ref.origin)}; it must be drawn on the image's voxel grid")


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _z_normalize(array: np.ndarray) -> np.ndarray:
    std = float(array.std())
    return ((array - float(array.mean())) / (std if std > 0 else 1.0)).astype(np.float32)


def _read_label(path: Path, ref: _Header, spacing: tuple[float, float, float]) -> np.ndarray:
    """The label map on the resampled image grid (nearest neighbour), as int64 (x, y, z)."""
    image = read_image_checked(path)
    if tuple(float(s) for s in image.GetSpacing()) != spacing:
        size = [int(n * s / o + 0.5) for n, s, o in zip(ref.size, ref.spacing, spacing, strict=True)]
        image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor, ref.origin, spacing,
                              ref.direction, 0, image.GetPixelID())
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            odd = array[~np.isfinite(array) | (array != np.round(array))]
            raise ScanError(f"{path}: the label map holds non-integer values (e.g. {float(odd[0]):g}); it must hold "
                            "class indices (was it resampled with linear interpolation?)")
    return np.ascontiguousarray(array.astype(np.int64))


def load_case(case: Case, prep: Preprocessing, task: str = "seg") -> LoadedCase:
    """Read one case's channels (and label map) onto one grid; see the module docstring.

    Labels are returned raw (file values); :func:`finalize_labels` maps and checks them for the whole data set.
    """
    headers = [_header(p, "image") for p in case.images]
    for other in headers[1:]:
        _check_same_grid(headers[0], other, "image channel")
    ref = headers[0]
    label_header = None
    if task == "seg":
        if not isinstance(case.label, Path):
            raise ScanError(f"{case.images[0]}: --task seg needs a label-map file, got class {case.label!r}")
        label_header = _header(case.label, "label")
        _check_same_grid(ref, label_header, "label")
    spacing = tuple(float(s) for s in (prep.spacing or ref.spacing))
    channels, modalities = [], []
    for path in case.images:
        scan = read_resampled(path, spacing=spacing, modality=prep.modality, min_shape=(1, 1, 1))
        channels.append(_z_normalize(scale_to_unit(scan.array, scan.modality, prep.hu_window)))
        modalities.append(scan.modality)
    image = np.stack(channels)
    label: np.ndarray | int = case.label if task == "cls" else _read_label(case.label, ref, spacing)
    if task == "seg" and label.shape != image.shape[1:]:
        raise ScanError(f"{case.label}: resampled label shape {label.shape} differs from the image's "
                        f"{image.shape[1:]}; check the two files' headers")
    return LoadedCase(case, image, label, spacing, tuple(modalities))


def load_cases(cases: Sequence[Case], prep: Preprocessing, task: str = "seg", progress: bool = True
               ) -> list[LoadedCase]:
    """:func:`load_case` for each case (all channels of a data set must agree in number)."""
    loaded = [load_case(c, prep, task) for c in tqdm(cases, desc="loading cases", unit="case", disable=not progress)]
    channels = {lc.image.shape[0] for lc in loaded}
    if len(channels) > 1:
        counts = {lc.case_id: lc.image.shape[0] for lc in loaded}
        raise ScanError(f"cases have different numbers of input channels: {counts}")
    return loaded


def finalize_labels(loaded: Sequence[LoadedCase], prep: Preprocessing, task: str = "seg",
                    source: str = "the data") -> int:
    """Map and check every case's labels in place; returns the number of classes (background included).

    Segmentation: with ``keep_labels`` the listed values become 1..K and all others 0; otherwise the values must
    lie in ``0..num_classes-1`` (``num_classes`` None: max value + 1, refused when fewer than half the values up to
    the maximum occur). Every label map must hold foreground unless ``allow_empty``. Classification: classes must
    lie in ``0..num_classes-1``. Problems raise ScanError naming the file.
    """
    if task == "cls":
        classes = [int(lc.label) for lc in loaded]
        n = prep.num_classes or max(classes) + 1
        bad = [lc.label_source for lc in loaded if not 0 <= int(lc.label) < n]
        if bad:
            raise ScanError(f"{bad[0]}: class outside 0..{n - 1} (num_classes {n}); {len(bad)} case(s) affected")
        return max(n, 2)
    if prep.keep_labels is not None:
        keep = list(prep.keep_labels)
        if len(set(keep)) != len(keep) or any(v <= 0 for v in keep):
            raise ValueError(f"keep_labels must be distinct positive label values, got {keep}")
        for lc in loaded:
            mapped = np.zeros(lc.label.shape, dtype=np.uint8 if len(keep) < 255 else np.int64)
            for index, value in enumerate(keep, start=1):
                mapped[lc.label == value] = index
            lc.label = mapped
        n = len(keep) + 1
    else:
        values = {lc.case_id: np.unique(lc.label) for lc in loaded}
        if prep.num_classes is not None:
            n = prep.num_classes
        else:
            present = np.unique(np.concatenate(list(values.values())))
            n = int(present.max()) + 1
            if n > 2 and len(present) < _SPARSE_SHARE * n:
                raise ScanError(
                    f"{source}: label values are sparse ({len(present)} distinct values up to {n - 1}, e.g. "
                    f"{present[:8].tolist()}); choose the classes with --keep-labels V1,V2,... or keep them all "
                    f"with --num-classes {n}")
        for lc in loaded:
            v = values[lc.case_id]
            bad = v[(v < 0) | (v >= n)]
            if bad.size:
                raise ScanError(f"{lc.label_source}: unexpected label values {bad[:8].tolist()} (expected 0..{n - 1}"
                                f" for {n} classes); pass --num-classes or --keep-labels to say which are classes")
            lc.label = lc.label.astype(np.uint8 if n <= 256 else np.int64)
    if n < 2:
        raise ValueError(f"segmentation needs at least 2 classes (background and one more), got {n}")
    if not prep.allow_empty:
        for lc in loaded:
            if not np.any(lc.label):
                how = f" after --keep-labels {','.join(map(str, prep.keep_labels))}" if prep.keep_labels else ""
                raise ScanError(f"{lc.label_source}: the label map has no foreground (every voxel is background"
                                f"{how}); remove the case or pass --allow-empty-labels if that is intended")
    return n


def resize_volume(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(C, X, Y, Z) resized trilinearly to (C, *size): the whole-volume input of classification."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0].numpy()


# ------------------------------------------------------------------------------------------------- sampling
class PatchSampler:
    """Random training patches, biased towards foreground.

    Each patch comes from a case drawn uniformly. With probability ``fg_prob`` its centre is a random voxel of a
    foreground class that the case contains (the class drawn uniformly, so small organs are seen as often as large
    ones); otherwise it is uniform over the volume. Volumes smaller than the patch are padded (image with each
    channel's minimum, label with background). ``flip`` mirrors each axis with probability 1/2; intensities get a
    random per-channel scale (0.9..1.1) and shift (-0.1..0.1) of the z-normalised values.
    """

    def __init__(self, cases: Sequence[LoadedCase], patch_size: Sequence[int], rng: np.random.Generator,
                 fg_prob: float = 0.67, flip: bool = False):
        if not cases:
            raise ValueError("no training cases to sample patches from")
        if not 0.0 <= fg_prob <= 1.0:
            raise ValueError(f"fg_prob must be in [0, 1], got {fg_prob}")
        self.patch = np.array([int(s) for s in patch_size])
        self.rng, self.fg_prob, self.flip = rng, fg_prob, flip
        self.images, self.labels, self.foreground = [], [], []
        for lc in cases:
            image, label = self._pad(lc.image, lc.label)
            self.images.append(image)
            self.labels.append(label)
            self.foreground.append([np.argwhere(label == c).astype(np.int32) for c in np.unique(label) if c > 0])

    def _pad(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extra = np.maximum(self.patch - np.array(label.shape), 0)
        if not extra.any():
            return image, label
        widths = [(0, int(e)) for e in extra]
        padded = np.stack([np.pad(ch, widths, constant_values=float(ch.min())) for ch in image])
        return padded, np.pad(label, widths)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        i = int(self.rng.integers(len(self.images)))
        image, label, fg = self.images[i], self.labels[i], self.foreground[i]
        shape = np.array(label.shape)
        if fg and self.rng.random() < self.fg_prob:
            coords = fg[int(self.rng.integers(len(fg)))]
            centre = coords[int(self.rng.integers(len(coords)))]
        else:
            centre = np.array([self.rng.integers(s) for s in shape])
        start = np.clip(centre - self.patch // 2, 0, shape - self.patch)
        box = tuple(slice(int(a), int(a + p)) for a, p in zip(start, self.patch))
        x = image[(slice(None), *box)].copy()
        y = label[box].copy()
        if self.flip:
            for axis in range(3):
                if self.rng.random() < 0.5:
                    x, y = np.flip(x, axis + 1), np.flip(y, axis)
        scale = self.rng.uniform(0.9, 1.1, size=(x.shape[0], 1, 1, 1))
        shift = self.rng.uniform(-0.1, 0.1, size=(x.shape[0], 1, 1, 1))
        return np.ascontiguousarray(x * scale + shift, dtype=np.float32), np.ascontiguousarray(y)

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, *patch) float32 images and (B, 1, *patch) int64 labels."""
        pairs = [self.sample() for _ in range(batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])[:, None].astype(np.int64)
