"""2D images (chest X-rays) for PCRLv2 pretraining and classification: finding them, reading them, keeping them.

Sources: a folder of PNG/JPEG/DICOM files (searched recursively), or a CSV in the NIH ChestX-ray14 ``Data_Entry``
format (an ``Image Index`` column; the images are looked up by file name under the CSV's folder).

Reading: every image becomes one grayscale channel. 8-bit files (PNG/JPEG ``L``; RGB/palette files are converted
to luminance, which for the grey-replicated RGB the official code reads is the same image) keep their 0-255
values. 16-bit PNGs and DICOMs (after the rescale slope/intercept; MONOCHROME1 shown bright = dense) are mapped
to [0, 1] by their own minimum and maximum, since their bit depth (10, 12, 14 or 16 bits used) varies between sources.

Storage: an :class:`ImageBank` keeps the images as uint8 (8-bit sources) or float16 in [0, 1] (the others), padded
to the largest height and width, with each image's own size; views never read the padding.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import ScanError

__all__ = ["IMAGE_SUFFIXES", "ImageBank", "ImageError", "find_images", "is_image_source", "load_images",
           "read_csv_rows", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MIN_SIDE = 32  # the smallest image side accepted: the network divides by 32


class ImageError(ScanError):
    """A 2D image that cannot be used; the message names the file and what to do about it."""


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not p.name.startswith("."))


def is_image_source(path: str | Path) -> bool:
    """Whether ``path`` is a source of 2D images: a CSV with an ``Image Index`` column, or a folder that holds
    PNG/JPEG/DICOM files and no 3D scans."""
    from .io import SCAN_SUFFIXES

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return "Image Index" in _csv_header(path)
    if not path.is_dir():
        return False
    scans = any(p.name.lower().endswith(tuple(SCAN_SUFFIXES)) for p in path.rglob("*") if p.is_file())
    return not scans and next(iter(_image_files(path)), None) is not None


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"{path}: cannot read the CSV ({exc})") from exc


def read_csv_rows(path: str | Path, required: tuple[str, ...] = ("Image Index",)) -> list[dict[str, str]]:
    """The rows of an NIH-style CSV as dicts; a missing column or an empty file is one ImageError naming it."""
    path = Path(path)
    header = _csv_header(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise ImageError(f"{path}: the CSV has no column {', '.join(map(repr, missing))} (columns: {header[:10]}); "
                         "expected the NIH ChestX-ray14 Data_Entry format")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ImageError(f"{path}: the CSV has a header and no rows")
    return rows


def find_images(source: str | Path) -> list[Path]:
    """The image files of a folder (recursively, sorted) or of an NIH CSV (in its row order)."""
    source = Path(source)
    if not source.exists():
        raise ImageError(f"{source}: no such file or folder")
    if source.is_dir():
        files = _image_files(source)
        if not files:
            raise ImageError(f"{source}: no PNG, JPEG or DICOM images in this folder (looked for "
                             f"{', '.join(IMAGE_SUFFIXES)}, recursively)")
        return files
    if source.suffix.lower() != ".csv":
        raise ImageError(f"{source}: expected a folder of images or an NIH Data_Entry CSV")
    names = [row["Image Index"].strip() for row in read_csv_rows(source)]
    by_name = {p.name: p for p in _image_files(source.parent)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ImageError(f"{source}: {len(missing)} of its {len(names)} images are not under {source.parent} "
                         f"(first: {missing[:3]}); put the image folders beside the CSV")
    return [by_name[n] for n in names]


def _read_pil(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImageError(f"{path}: reading PNG/JPEG needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as im:
            im.load()  # decodes now: a truncated file fails here, not later
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return _min_max(np.asarray(im, dtype=np.float64), path)
            if im.mode != "L":
                im = im.convert("L")
            return np.asarray(im, dtype=np.uint8).copy()
    except ImageError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise ImageError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); re-export the file or "
                         "remove it from the data") from exc


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise ImageError(f"{path}: reading DICOM needs SimpleITK: pip install SimpleITK") from exc
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        # GDCM hands MONOCHROME1 images over inverted already (bright = dense, as MONOCHROME2).
        array = sitk.GetArrayFromImage(reader.Execute()).astype(np.float64)
    except RuntimeError as exc:
        raise ImageError(f"{path}: cannot read the DICOM file ({str(exc).strip().splitlines()[-1]}); check that "
                         "it is a complete DICOM image") from exc
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ImageError(f"{path}: a 2D image was expected, the DICOM holds an array of shape {array.shape} (a 3D "
                         "series belongs to 3D pretraining)")
    return _min_max(array, path)


def _min_max(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim != 2:
        raise ImageError(f"{path}: a 2D grayscale image was expected, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ImageError(f"{path}: the image holds NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        raise ImageError(f"{path}: the image is constant ({lo}); it holds no picture")
    return ((array - lo) / (hi - lo)).astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """One image as a 2D array: uint8 (0-255) for 8-bit files, float32 in [0, 1] for 16-bit PNGs and DICOMs."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        image = _read_dicom(path)
    else:
        image = _read_pil(path)
    if min(image.shape) < MIN_SIDE:
        raise ImageError(f"{path}: the image is {image.shape[1]} x {image.shape[0]} pixels; at least {MIN_SIDE} "
                         "per side are needed")
    return image


@dataclass
class ImageBank:
    """The images of a run, padded into one array: ``pixels`` (N, H, W) uint8 (values / 255) or float16 ([0, 1]),
    ``sizes`` (N, 2) int64 (each image's height and width), ``names`` (file names), ``paths`` (the files)."""

    pixels: np.ndarray
    sizes: np.ndarray
    names: list[str]
    paths: list[str] | None = None  # the files, when read from files (the DALI loader decodes them itself)

    def __post_init__(self):
        if self.pixels.ndim != 3 or len(self.pixels) != len(self.sizes) or len(self.names) != len(self.sizes):
            raise ValueError(f"an ImageBank needs (N, H, W) pixels, (N, 2) sizes and N names, got "
                             f"{self.pixels.shape}, {self.sizes.shape}, {len(self.names)}")
        if len(self.names) == 0:
            raise ValueError("an ImageBank needs at least one image")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def scale(self) -> float:
        """The factor that maps stored values to [0, 1]."""
        return 1.0 / 255.0 if self.pixels.dtype == np.uint8 else 1.0

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as float32 in [0, 1], at its own size."""
        h, w = (int(v) for v in self.sizes[index])
        return self.pixels[index, :h, :w].astype(np.float32) * np.float32(self.scale)

    @classmethod
    def from_arrays(cls, images: list[np.ndarray], names: list[str], paths: list[str] | None = None) -> ImageBank:
        """A bank of uint8 arrays (kept as uint8) or float arrays in [0, 1] (stored as float16; mixed banks are
        float16 throughout)."""
        if not images:
            raise ValueError("an ImageBank needs at least one image")
        sizes = np.array([im.shape for im in images], dtype=np.int64)
        eight_bit = all(im.dtype == np.uint8 for im in images)
        pixels = np.zeros((len(images), *sizes.max(axis=0)), dtype=np.uint8 if eight_bit else np.float16)
        for k, im in enumerate(images):
            pixels[k, :im.shape[0], :im.shape[1]] = im if eight_bit or im.dtype != np.uint8 else im / 255.0
        return cls(pixels, sizes, list(names), None if paths is None else [str(p) for p in paths])


def _header_shape(path: Path) -> tuple[int, int, int] | None:
    """(height, width, bytes per stored pixel) from the file's header, without decoding; None when unreadable here
    (the decoding step then names the problem)."""
    try:
        if path.suffix.lower() in (".dcm", ".dicom"):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            w, h = reader.GetSize()[:2]
            return h, w, 2
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width, 2 if im.mode in ("I;16", "I;16B", "I;16L", "I", "F") else 1
    except Exception:
        return None


def available_memory() -> int | None:
    """Bytes of physical memory free now (Linux/macOS sysconf), or None where the system does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(files: list[Path], source) -> None:
    """An ImageError before any decoding when the bank of ``files`` (padded to the largest image; float16 as soon as
    one image is not 8-bit) would not fit in the free memory."""
    shapes = [s for s in map(_header_shape, files) if s is not None]
    free = available_memory()
    if not shapes or free is None:
        return
    h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
    need = len(files) * h * w * max(s[2] for s in shapes)
    if need > 0.8 * free:
        raise ImageError(f"{source}: its {len(files)} images need {need / 2**30:.1f} GiB decoded in memory (up to "
                         f"{w} x {h} pixels each), more than the {free / 2**30:.1f} GiB free; pretrain on fewer images "
                         "(a CSV listing a subset), downscale them, or use a machine with more memory")


def load_images(source: str | Path, progress: bool = True) -> ImageBank:
    """Read every image of a folder or NIH CSV into an :class:`ImageBank`; the first bad file ends it with one
    ImageError naming that file, and a bank too large for the free memory is refused before decoding."""
    from tqdm.auto import tqdm

    files = find_images(source)
    check_fits_in_memory(files, source)
    images = [read_image(p) for p in tqdm(files, desc="images", unit="img", disable=not progress or len(files) < 50)]
    return ImageBank.from_arrays(images, [p.name for p in files], files)
