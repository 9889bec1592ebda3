"""Data path: scan loading (io), preprocessing cache, crop-box geometry, augmentations, pretraining dataset."""

from .augment import AugmentConfig, draw_sample_params
from .cache import PreprocessReport, cached_volumes, is_cache, open_cache, preprocess
from .dali import DaliLoader, dali_available, dali_load_error
from .dataset import PretrainDataset, cut_and_resize
from .geometry import CropConfig, SampleBoxes, box_iou, draw_sample_boxes
from .io import MIN_SHAPE, SCAN_SUFFIXES, ScanError, Volume, find_scans, load_scan, load_volumes
from .loader import (
    LOADERS,
    BatchLoader,
    bank_bytes,
    default_loader,
    gpu_cache_choice,
    resolve_loader,
)

__all__ = [
    "ScanError",
    "Volume",
    "find_scans",
    "load_scan",
    "load_volumes",
    "SCAN_SUFFIXES",
    "MIN_SHAPE",
    "CropConfig",
    "SampleBoxes",
    "draw_sample_boxes",
    "box_iou",
    "AugmentConfig",
    "PretrainDataset",
    "cut_and_resize",
    "LOADERS",
    "BatchLoader",
    "DaliLoader",
    "dali_available",
    "dali_load_error",
    "default_loader",
    "bank_bytes",
    "gpu_cache_choice",
    "draw_sample_params",
    "resolve_loader",
    "preprocess",
    "PreprocessReport",
    "open_cache",
    "is_cache",
    "cached_volumes",
]
