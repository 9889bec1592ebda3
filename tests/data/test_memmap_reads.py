"""Training reads only the crops of a memory-mapped cache volume, never the whole volume per sample.

Reads are counted page by page: before each measurement the mapping's page-table entries are removed
(``MADV_DONTNEED``) and the file is dropped from the page cache (``POSIX_FADV_DONTNEED``, checked with
``mincore``); with ``MADV_RANDOM`` on the mapping the kernel then reads no neighbouring pages ahead, so the
pages present in this process's page table afterwards (``/proc/self/pagemap``) are exactly the pages the code
under test read, its OpenMP threads included. Each test compares that count with the pages the sample's crop
boxes occupy; a control checks that a whole-volume reduction is seen as a read of every page, so the counter
can fail. Where the page cache cannot be dropped (e.g. tmpfs) the tests are skipped with that reason.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from pcrlv2_fast.data import BatchLoader, PretrainDataset, native, open_cache, preprocess
from tests import requirements

PAGE = mmap.PAGESIZE
SHAPE = (320, 320, 160)  # (x, y, z) int16: 32.8 MB, 8001 pages; one sample's crops cover about 15% of them
_PRESENT = np.uint64(1 << 63)  # /proc/PID/pagemap: the page is mapped in the page table

pytestmark = requirements.needs("pagemap", sys.platform.startswith("linux"), "counts pages with Linux /proc files")


class PageReadCounter:
    """Counts the distinct pages of ``array``'s memory mapping read by this process between ``reset`` and ``pages``."""

    def __init__(self, array: np.memmap):
        self.array = array
        self.path = array.filename
        self.address = array.ctypes.data
        self.start, self.end = self._vma()
        self.total = (self.end - self.start) // PAGE
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        # No readahead and no huge-page mappings: a read fault brings in and maps its own page only.
        self._madvise(mmap.MADV_RANDOM)
        self._madvise(mmap.MADV_NOHUGEPAGE)

    def _vma(self) -> tuple[int, int]:
        with open("/proc/self/maps") as fh:
            for line in fh:
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if lo <= self.address < hi:
                    return lo, hi
        raise LookupError(f"no mapping holds address {self.address:#x}")

    def _madvise(self, advice: int) -> None:
        if self._libc.madvise(self.start, self.end - self.start, advice) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"madvise({advice}): {os.strerror(errno)}")

    def resident(self) -> int:
        """Pages of the file in the page cache (``mincore`` on the mapping)."""
        vec = (ctypes.c_ubyte * self.total)()
        if self._libc.mincore(self.start, self.end - self.start, vec) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mincore: {os.strerror(errno)}")
        return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))

    def reset(self) -> None:
        """Unmap every page of the mapping and drop the file from the page cache."""
        self._madvise(mmap.MADV_DONTNEED)  # a file mapping keeps its contents: the pages are faulted in again
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        left = self.resident()
        if left:
            requirements.skip("pagemap", f"{self.path}: {left} pages stay in the page cache after "
                              "POSIX_FADV_DONTNEED on this file system (tmpfs?); page reads cannot be counted here")

    def pages(self) -> int:
        """Pages of the mapping present in this process's page table: those read since ``reset``."""
        with open("/proc/self/pagemap", "rb") as fh:
            fh.seek(self.start // PAGE * 8)
            entries = np.frombuffer(fh.read(self.total * 8), dtype="<u8")
        return int(np.count_nonzero(entries & _PRESENT))

    def pages_of_boxes(self, boxes) -> int:
        """The number of distinct pages that the voxels of ``boxes`` (N, 6) x0, y0, z0, sx, sy, sz occupy."""
        _, ny, nz = self.array.shape
        item = self.array.itemsize
        first = self.address - self.start  # byte offset of voxel (0, 0, 0) in the mapping
        pages = set()
        for x0, y0, z0, sx, sy, sz in np.asarray(boxes, dtype=np.int64).reshape(-1, 6).tolist():
            rows = (np.arange(x0, x0 + sx)[:, None] * ny + np.arange(y0, y0 + sy)[None, :]) * nz + z0
            run_start = first + rows.ravel() * item  # each z-run is contiguous
            run_end = run_start + sz * item - 1
            for lo, hi in zip((run_start // PAGE).tolist(), (run_end // PAGE).tolist()):
                pages.update(range(lo, hi + 1))
        return len(pages)


@pytest.fixture(scope="module")
def cached_volume(tmp_path_factory):
    """A 320x320x160 int16 CT volume preprocessed into a cache and memory-mapped by ``open_cache``."""
    root = tmp_path_factory.mktemp("memmap")
    rng = np.random.default_rng(0)
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[20:-20, 20:-20, 10:-10] = rng.integers(-300, 600, size=(SHAPE[0] - 40, SHAPE[1] - 40, SHAPE[2] - 20))
    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0))  # spacing 1 mm: the cache keeps the grid
    sitk.WriteImage(image, str(root / "ct.mha"))
    report = preprocess(root / "ct.mha", root / "cache", progress=False)
    assert [r.status for r in report.results] == ["processed"]
    (volume,) = open_cache(root / "cache")
    assert isinstance(volume.array, np.memmap) and volume.array.shape == SHAPE and volume.array.dtype == np.int16
    return volume


@pytest.fixture(scope="module")
def counter(cached_volume):
    if not os.access("/proc/self/pagemap", os.R_OK):
        requirements.skip("pagemap", "/proc/self/pagemap is not readable here")
    counter = PageReadCounter(cached_volume.array)
    # Calibration: one voxel read is one page, a voxel at the far end is one other page.
    counter.reset()
    _ = int(cached_volume.array[0, 0, 0]) + int(cached_volume.array[-1, -1, -1])
    if counter.pages() != 2:
        requirements.skip("pagemap",
                          f"page reads cannot be isolated here (2 voxel reads mapped {counter.pages()} pages)")
    return counter


def test_counter_sees_a_whole_volume_read(cached_volume, counter):
    counter.reset()
    assert counter.pages() == 0
    int(cached_volume.array.max())  # what a per-sample min/max over the memory map would cost
    assert counter.pages() == counter.total  # every page


def test_dataset_item_reads_only_its_crops(cached_volume, counter):
    counter.reset()
    dataset = PretrainDataset([cached_volume], seed=0)
    _, boxes, _ = dataset.sample_geometry(3)
    assert counter.pages() == 0  # constructing the dataset and drawing boxes reads no voxel
    item = dataset[3]
    read = counter.pages()
    expected = counter.pages_of_boxes(np.concatenate([boxes.global_boxes, boxes.local_boxes]))
    assert np.array_equal(item["global_boxes"].numpy(), boxes.global_boxes)
    assert read == expected, f"read {read} pages, the crops occupy {expected}"
    assert read < 0.25 * counter.total, f"one item read {read} of {counter.total} pages"


def _batch_boxes(dataset, indices) -> np.ndarray:
    boxes = [dataset.sample_geometry(i)[1] for i in indices]
    return np.concatenate([np.concatenate([b.global_boxes, b.local_boxes]) for b in boxes])


@requirements.needs("native", native.available(), f"native extension not built: {native.load_error()}")
@pytest.mark.parametrize("indices", [[5], [0, 1]])
def test_native_batch_reads_only_its_crops(cached_volume, counter, indices):
    dataset = PretrainDataset([cached_volume], seed=1)
    counter.reset()
    loader = BatchLoader(dataset, loader="native", num_threads=2)
    assert counter.pages() == 0  # the native loader reads the memory map in place, nothing up front
    batch = loader.batch(indices)
    read = counter.pages()
    expected = counter.pages_of_boxes(_batch_boxes(dataset, indices))
    assert batch["x1"].shape[0] == len(indices)
    assert read == expected, f"read {read} pages, the crops occupy {expected}"
    assert read < 0.25 * len(indices) * counter.total, f"a batch of {len(indices)} read {read} of {counter.total} pages"


def test_torch_batches_read_the_volume_bank_not_the_map(cached_volume, counter):
    dataset = PretrainDataset([cached_volume], seed=2)
    loader = BatchLoader(dataset, loader="torch")  # its bank copies each volume once, up front
    counter.reset()
    batch = loader.batch([0, 1])
    assert batch["x1"].shape[0] == 2
    assert counter.pages() == 0  # batches cut from the bank: no read of the memory map per sample
