"""The preprocessing cache: every scan read and resampled once, then memory-mapped by training.

Layout of a cache folder::

    CACHE/index.json          one entry per scan (see below), rewritten atomically after every scan
    CACHE/volumes/NAME.npy    C-order (x, y, z): int16 HU (CT, rounded) or float16 z-scores (MR)

An entry holds ``name``, ``file`` (relative to the cache), ``source`` (absolute path), ``source_sha256``,
``source_size``, ``source_mtime_ns``, ``spacing``, ``origin``, ``direction``, ``shape``, ``dtype``,
``modality``, ``window`` (the stored values that map to 0 and 1, see :class:`~pcrlv2_fast.data.io.Volume`)
and the ``settings`` it was made with. CT volumes keep full HU, so the window is only metadata: a new
``hu_window`` updates it without re-processing. MR volumes are z-scored over the volume (mean 0, std 1;
``zscore`` keeps the original mean and std) with their 0.5th/99.5th percentiles as window, the same
scaling :func:`~pcrlv2_fast.data.io.load_scan` applies.

Writing is crash-safe and resumable: each volume goes to a temporary file renamed into place, the index is
rewritten after each finished scan, and a later run skips every scan whose entry, volume file (shape and
dtype) and source (size and SHA-256; for a DICOM series or a detached header, every file of it) are
unchanged. A source whose content changed, or that was made with another spacing or modality setting, is
processed again. Scans that raise :class:`~pcrlv2_fast.data.io.ScanError` are reported and leave nothing
behind; the others go on. One process at a time may write a cache (an advisory lock on ``CACHE/.lock``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..utils.io import atomic_npy_save, atomic_write, sha256_file
from ..utils.lock import folder_lock
from .io import (
    MIN_SHAPE,
    MODALITIES,
    ScanError,
    Volume,
    detached_data_file,
    find_scans,
    mr_window,
    read_resampled,
    scan_name,
)

__all__ = ["PreprocessReport", "ScanResult", "preprocess", "open_cache", "is_cache", "cached_volumes"]

INDEX = "index.json"
VOLUMES = "volumes"
FORMAT = "pcrlv2_fast-cache"
FORMAT_VERSION = 1
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_ENTRY_KEYS = ("name", "file", "source", "spacing", "shape", "dtype", "modality", "window")
# What the cache stores: int16 HU (CT), float16 z-scores (MR).
_DTYPES = ("int16", "float16")


# --------------------------------------------------------------------------------------------- reports


@dataclass
class ScanResult:
    """What happened to one source: ``status`` is "processed", "skipped" (unchanged) or "failed"."""

    source: Path
    status: str
    reason: str  # why it was processed ("new", "source changed", ...), "unchanged", or the error message
    name: str | None = None
    shape: tuple[int, int, int] | None = None
    modality: str | None = None
    seconds: float = 0.0


@dataclass
class PreprocessReport:
    """The outcome of :func:`preprocess`: one :class:`ScanResult` per source scan, in source order."""

    cache: Path
    results: list[ScanResult] = field(default_factory=list)

    def _with(self, status: str) -> list[ScanResult]:
        return [r for r in self.results if r.status == status]

    @property
    def processed(self) -> list[ScanResult]:
        return self._with("processed")

    @property
    def skipped(self) -> list[ScanResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[ScanResult]:
        return self._with("failed")

    @property
    def names(self) -> list[str]:
        """Cache names of the requested scans that are in the cache now (processed or unchanged)."""
        return [r.name for r in self.results if r.status != "failed" and r.name is not None]

    def summary(self) -> str:
        return (
            f"{len(self.processed)} processed, {len(self.skipped)} skipped (unchanged), {len(self.failed)} failed; "
            f"cache: {self.cache}"
        )

    def table(self) -> str:
        """A plain-text table of every source, then the summary line."""
        rows = [("status", "name", "shape (x,y,z)", "modality", "seconds", "note")]
        for r in self.results:
            shape = "x".join(str(n) for n in r.shape) if r.shape else "-"
            note = r.reason if r.status != "failed" else r.reason.replace(str(r.source), "").lstrip(": ")
            name = r.name if r.name else str(r.source)
            rows.append((r.status, name, shape, r.modality or "-", f"{r.seconds:.1f}", note))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
        return "\n".join(line.rstrip() for line in lines) + "\n" + self.summary()


# ---------------------------------------------------------------------------------------- fingerprints


@dataclass(frozen=True)
class _Fingerprint:
    size: int
    mtime_ns: int
    sha256: str


def _source_files(source: Path) -> list[Path]:
    """The files a scan is read from: a DICOM folder's visible files, or a file plus its detached data file."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    data_file = detached_data_file(source)
    return [source] + ([data_file] if data_file is not None and data_file.is_file() else [])


def _fingerprint(source: Path) -> _Fingerprint:
    """Size, newest mtime and SHA-256 of a scan's files (of the single file itself for one-file scans)."""
    try:
        files = _source_files(source)
        stats = [p.stat() for p in files]
        digests = [sha256_file(p) for p in files]
    except OSError as error:
        reason = error.strerror or error
        raise ScanError(f"{source}: cannot read it ({reason}); check that it exists and is readable.") from error
    if len(files) == 1:
        digest = digests[0]
    else:
        combined = hashlib.sha256()
        for path, file_digest in zip(files, digests):
            combined.update(f"{path.name}\0{file_digest}\n".encode())
        digest = combined.hexdigest()
    return _Fingerprint(sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats), digest)


# --------------------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _Task:
    source: Path
    name: str
    entry: dict | None  # the index entry of an earlier run, if any
    root: Path
    settings: dict  # spacing, modality, hu_window asked for
    min_shape: tuple[int, int, int] = MIN_SHAPE  # smaller resampled volumes are rejected (see read_resampled)


def _volume_file_ok(root: Path, entry: dict) -> bool:
    try:
        array = np.load(root / entry["file"], mmap_mode="r")  # reads the header only
    except Exception:  # a damaged .npy header can raise almost anything (see open_cache)
        return False
    return array.shape == tuple(entry["shape"]) and array.dtype == np.dtype(entry["dtype"])


def _stale(task: _Task, fp: _Fingerprint) -> str | None:
    """Why the scan must be (re)processed, or None when its cached volume is up to date."""
    entry, settings = task.entry, task.settings
    if entry is None:
        return "new"
    current = entry.get("settings", {})
    if current.get("spacing") != settings["spacing"]:
        return f"spacing changed ({current.get('spacing')} -> {settings['spacing']})"
    if current.get("modality") != settings["modality"]:
        return f"modality setting changed ({current.get('modality')} -> {settings['modality']})"
    if not _volume_file_ok(task.root, entry):
        return "volume file missing or damaged"
    if entry.get("source_size") != fp.size or entry.get("source_sha256") != fp.sha256:
        return "source changed"
    return None


def _encode(array: np.ndarray, modality: str, hu_window: list[float]) -> tuple[np.ndarray, list[float], dict]:
    """The stored array, its window and extra entry fields: int16 HU for CT, float16 z-scores for MR."""
    if modality == "ct":
        hu = np.rint(array)
        np.clip(hu, -32768, 32767, out=hu)
        return hu.astype(np.int16), list(hu_window), {}
    mean = float(array.mean(dtype=np.float64))
    std = float(array.std(dtype=np.float64))  # > 0: constant scans were rejected when read
    z = ((array - mean) / std).astype(np.float32)
    lo, hi = mr_window(z)
    stored = np.clip(z, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
    return stored, [lo, hi], {"zscore": {"mean": mean, "std": std}}


def _write_volume(path: Path, array: np.ndarray) -> None:
    # Temporary file + fsync + rename: an interrupted write never leaves a partial .npy under the final name.
    atomic_npy_save(array, path)


def _run(task: _Task) -> tuple[ScanResult, dict | None]:
    """Skip, process or fail one scan; returns its result and its new index entry (None when it failed)."""
    start = time.perf_counter()
    settings = task.settings
    try:
        fp = _fingerprint(task.source)
        reason = _stale(task, fp)
        if reason is None:
            entry = dict(task.entry, source_mtime_ns=fp.mtime_ns)
            if entry["modality"] == "ct":
                entry["window"] = list(settings["hu_window"])  # HU are stored in full: only the window moves
                entry["settings"] = dict(entry["settings"], hu_window=settings["hu_window"])
            result = ScanResult(task.source, "skipped", "unchanged", task.name, tuple(entry["shape"]),
                                entry["modality"])
            return result, entry
        scan = read_resampled(task.source, spacing=tuple(settings["spacing"]), modality=settings["modality"],
                              min_shape=task.min_shape)
        stored, window, extra = _encode(scan.array, scan.modality, settings["hu_window"])
        file = f"{VOLUMES}/{task.name}.npy"
        _write_volume(task.root / file, stored)
    except ScanError as error:
        return ScanResult(task.source, "failed", str(error), seconds=time.perf_counter() - start), None
    entry = {
        "name": task.name,
        "file": file,
        "source": str(task.source),
        "source_sha256": fp.sha256,
        "source_size": fp.size,
        "source_mtime_ns": fp.mtime_ns,
        "spacing": list(scan.spacing),
        "origin": list(scan.origin),
        "direction": list(scan.direction),
        "shape": list(stored.shape),
        "dtype": stored.dtype.name,
        "modality": scan.modality,
        "window": window,
        **extra,
        "settings": dict(settings),
    }
    result = ScanResult(task.source, "processed", reason, task.name, stored.shape, scan.modality,
                        time.perf_counter() - start)
    return result, entry


def _init_worker(threads: int) -> None:
    import SimpleITK as sitk

    # N worker processes share the cores: ITK's own threading would otherwise oversubscribe them N times.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


# ------------------------------------------------------------------------------------------- the index


def is_cache(path: str | os.PathLike) -> bool:
    """True when ``path`` is a preprocessing cache folder (holds an index.json)."""
    path = Path(path)
    return path.is_dir() and (path / INDEX).is_file()


class _DamagedIndex(ScanError):
    """index.json cannot be parsed or is not a cache index; preprocess rebuilds it."""


def _damaged(root: Path, what: str) -> ScanError:
    return _DamagedIndex(
        f"{root / INDEX}: {what}. The cache index is damaged; re-run `pcrlv2-fast preprocess SRC... --out {root}` "
        "(finished volumes are reused when their sources are unchanged) or delete the folder."
    )


def _read_index(root: Path) -> list[dict]:
    try:
        index = json.loads((root / INDEX).read_text())
    except FileNotFoundError:
        raise ScanError(
            f"{root}: not a preprocessing cache (no {INDEX}); "
            f"create it with `pcrlv2-fast preprocess SRC... --out {root}`."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(root, f"cannot be parsed ({error})") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("scans"), list):
        raise _damaged(root, f"not a {FORMAT} index")
    if index.get("version") != FORMAT_VERSION:
        raise ScanError(
            f"{root / INDEX}: cache format version {index.get('version')}, this pcrlv2_fast reads version "
            f"{FORMAT_VERSION}; re-run `pcrlv2-fast preprocess` into a new folder."
        )
    for i, entry in enumerate(index["scans"]):
        missing = [k for k in _ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise _damaged(root, f"entry {i} lacks {', '.join(missing)}")
        problem = _entry_problem(entry)
        if problem:
            raise _damaged(root, f"entry {i} ({str(entry['name'])[:80]!r}) {problem}")
    return index["scans"]


def _numbers(value, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in value))


def _entry_problem(entry: dict) -> str | None:
    """What is wrong with an index entry's fields (types, ranges, a file outside the cache), or None."""
    file = entry["file"]
    if not isinstance(entry["name"], str) or not entry["name"] or not isinstance(entry["source"], str):
        return "has a name or source that is not a non-empty string"
    if not isinstance(file, str) or Path(file).is_absolute() or Path(file).parts[:1] != (VOLUMES,) \
            or ".." in Path(file).parts or not file.endswith(".npy"):
        return f"names the file {str(file)[:200]!r}, which is not a volumes/*.npy file inside the cache"
    shape = entry["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        return f"has the shape {str(shape)[:80]}, not three positive integers"
    if entry["dtype"] not in _DTYPES:
        return f"has the dtype {str(entry['dtype'])[:40]!r}, not one of {_DTYPES}"
    if entry["modality"] not in ("ct", "mr"):
        return f"has the modality {str(entry['modality'])[:40]!r}, not ct or mr"
    if not _numbers(entry["spacing"], 3) or min(entry["spacing"]) <= 0:
        return f"has the spacing {str(entry['spacing'])[:80]}, not three positive numbers"
    if not _numbers(entry["window"], 2) or not entry["window"][0] < entry["window"][1]:
        return f"has the window {str(entry['window'])[:80]}, not two numbers low < high"
    for key, n in (("origin", 3), ("direction", 9)):
        if entry.get(key) is not None and not _numbers(entry[key], n):
            return f"has the {key} {str(entry[key])[:80]}, not {n} finite numbers"
    return None


def _write_index(root: Path, entries: dict[str, dict]) -> None:
    # One line per scan keeps the file short and readable for large collections; it is valid JSON either way.
    scans = ",\n".join(json.dumps(e) for e in sorted(entries.values(), key=lambda e: e["name"]))
    head = json.dumps({"format": FORMAT, "version": FORMAT_VERSION})[:-1]
    with atomic_write(root / INDEX, "w") as fh:
        fh.write(f'{head}, "scans": [\n{scans}\n]}}\n' if scans else f'{head}, "scans": []}}\n')


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary files left by a killed run (a crash or Ctrl-C removes its own)."""
    for folder in (root, root / VOLUMES):
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)


def _existing_entries(root: Path) -> list[dict]:
    if not (root / INDEX).exists():
        return []
    try:
        return _read_index(root)
    except _DamagedIndex as error:
        print(f"warning: {error}\nRebuilding the index: every scan is processed again.", file=sys.stderr)
        return []


def _unique_name(source: Path, taken: set[str]) -> str:
    stem = scan_name(source)
    if stem not in taken:
        return stem
    # Two sources with one stem (e.g. case1/ct.nii.gz and case2/ct.nii.gz): a short hash of the path decides.
    return f"{stem}-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------- public


def preprocess(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    modality: str = "auto",
    workers: int = 1,
    progress: bool = True,
    min_shape: tuple[int, int, int] = MIN_SHAPE,
) -> PreprocessReport:
    """Resample every scan under ``sources`` (files or folders, see :func:`find_scans`) into the cache ``out``.

    Scans smaller than ``min_shape`` (x, y, z voxels, after resampling) fail: the official crops' smallest size by
    default, ``CropConfig.scaled(s).min_volume`` for a smaller crop geometry.

    Unchanged scans already in the cache are skipped; scans that cannot be used are reported as failed and
    the rest go on. ``workers`` > 1 processes scans in that many processes. Returns the report; raises only
    for invalid arguments, a cache locked by another run, or errors that are not about a scan (a full disk).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if len(hu_window) != 2 or not hu_window[0] < hu_window[1]:
        raise ValueError(f"hu_window must be (low, high) with low < high, got {tuple(hu_window)}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers, got {tuple(spacing)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    root = Path(out).resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a folder; --out must name a cache folder")
    report = PreprocessReport(root)
    scans: list[Path] = []
    for source in sources:
        try:
            scans.extend(p.resolve() for p in find_scans(source))
        except ScanError as error:
            report.results.append(ScanResult(Path(source), "failed", str(error)))
    scans = list(dict.fromkeys(scans))  # a scan named twice (a folder and a file in it) is done once
    settings = {
        "spacing": [float(s) for s in spacing],
        "modality": modality,
        "hu_window": [float(v) for v in hu_window],
    }
    (root / VOLUMES).mkdir(parents=True, exist_ok=True)
    with folder_lock(root, "preprocess", hint="wait for it to end, then run preprocess again"):
        _remove_stale_temporaries(root)
        entries = {e["source"]: e for e in _existing_entries(root)}
        taken = {e["name"] for e in entries.values()}
        tasks = []
        for scan in scans:
            entry = entries.get(str(scan))
            name = entry["name"] if entry else _unique_name(scan, taken)
            taken.add(name)
            tasks.append(_Task(scan, name, entry, root, settings, tuple(min_shape)))
        results = _run_all(tasks, root, entries, workers, progress)
    report.results.extend(results[t.source] for t in tasks)
    return report


def _run_all(tasks: list[_Task], root: Path, entries: dict, workers: int, progress: bool) -> dict[Path, ScanResult]:
    results: dict[Path, ScanResult] = {}
    bar = tqdm(total=len(tasks), desc="preprocess", unit="scan", disable=not progress, file=sys.stderr)

    def record(result: ScanResult, entry: dict | None) -> None:
        results[result.source] = result
        key = str(result.source)
        if entry is not None:
            if entries.get(key) != entry:
                entries[key] = entry
                _write_index(root, entries)  # after every scan: an interrupted run keeps what is finished
        elif key in entries:
            # A source that no longer reads cleanly must not keep its old volume in use: index first, then file.
            stale = entries.pop(key)
            _write_index(root, entries)
            (root / stale["file"]).unlink(missing_ok=True)
        bar.set_postfix_str(f"{result.status} {result.name or result.source.name}")
        bar.update(1)

    try:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                record(*_run(task))
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(threads,)) as pool:
                futures = [pool.submit(_run, task) for task in tasks]
                try:
                    for future in as_completed(futures):
                        record(*future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    if not (root / INDEX).exists():
        _write_index(root, entries)  # even a run where everything failed leaves a valid (empty) cache
    return results


def open_cache(path: str | os.PathLike, names: Iterable[str] | None = None) -> list[Volume]:
    """Memory-map the volumes of a cache (all, or those in ``names``, in that order).

    Only the .npy headers are read here; voxels are paged in when crops are cut. Raises :class:`ScanError`
    naming the file when the index is missing or damaged, or a volume file is missing or does not match it.
    """
    root = Path(path)
    entries = _read_index(root)
    if names is not None:
        by_name = {e["name"]: e for e in entries}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ScanError(f"{root}: no scan named {', '.join(unknown)} in the cache")
        entries = [by_name[n] for n in names]
    if not entries:
        raise ScanError(f"{root}: the cache holds no scans; add some with `pcrlv2-fast preprocess SRC... --out {root}`")
    redo = f"re-run `pcrlv2-fast preprocess SRC... --out {root}` to rebuild it"
    volumes = []
    for entry in entries:
        file = root / entry["file"]
        try:
            array = np.load(file, mmap_mode="r")
        except FileNotFoundError:
            raise ScanError(f"{file}: the volume of scan {entry['name']!r} is missing from the cache; {redo}") from None
        except Exception as error:
            # numpy parses the .npy header with Python's tokenizer and ast.literal_eval: a damaged header raises
            # EOFError, ValueError, SyntaxError, tokenize.TokenError, ... (found by tests/fuzz).
            raise ScanError(f"{file}: unreadable or truncated volume file ({error}); {redo}.") from error
        expected = (tuple(entry["shape"]), np.dtype(entry["dtype"]))
        if (array.shape, array.dtype) != expected or not array.flags.c_contiguous:
            raise ScanError(
                f"{file}: holds {array.dtype} {array.shape}, the index says {expected[1]} {expected[0]} (C-order); "
                f"{redo}."
            )
        volumes.append(
            Volume(
                name=entry["name"],
                source=Path(entry["source"]),
                array=array,
                spacing=tuple(float(s) for s in entry["spacing"]),
                modality=entry["modality"],
                window=tuple(float(v) for v in entry["window"]),
                origin=tuple(entry["origin"]) if entry.get("origin") else None,
                direction=tuple(entry["direction"]) if entry.get("direction") else None,
            )
        )
    return volumes


def cached_volumes(
    data: str | os.PathLike,
    cache_dir: str | os.PathLike,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    modality: str = "auto",
    workers: int = 1,
    progress: bool = True,
    min_shape: tuple[int, int, int] = MIN_SHAPE,
) -> list[Volume]:
    """Training's volumes: ``data`` itself when it is a cache, else ``data`` preprocessed into ``cache_dir``.

    Scans that fail are reported on stderr and left out; when none is usable, a ScanError lists why.
    """
    if is_cache(data):
        volumes = open_cache(data)
        other = sorted({v.spacing for v in volumes if v.spacing != tuple(spacing)})
        if other:
            print(f"note: the cache {data} holds spacings {other} mm; they are used as they are "
                  f"(the spacing setting {tuple(spacing)} applies to raw scans only)", file=sys.stderr)
        return volumes
    report = preprocess([data], cache_dir, spacing=spacing, modality=modality, workers=workers, progress=progress,
                        min_shape=min_shape)
    for result in report.failed:
        print(f"warning: skipped {result.reason}", file=sys.stderr)
    if not report.names:
        reasons = "; ".join(r.reason for r in report.failed)
        raise ScanError(f"{data}: no scan could be preprocessed: {reasons}")
    return open_cache(cache_dir, names=report.names)
