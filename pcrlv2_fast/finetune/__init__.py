"""Fine-tuning and evaluation of PCRLv2 encoders on labelled CT/MR volumes (segmentation and classification).

Names are imported on first use, so that registering the command-line subcommands (``finetune.cli``) does not load
SimpleITK, matplotlib and MONAI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "data": ("Case", "LoadedCase", "PatchSampler", "Preprocessing", "find_cases", "finalize_labels", "load_case",
             "load_cases"),
    "evaluate": ("evaluate_checkpoint", "evaluate_loaded", "load_finetuned"),
    "metrics": ("classification_metrics", "segmentation_metrics"),
    "model": ("MODES", "build_model", "model_from_arch"),
    "probe": ("ProbeSet", "VoxelProbe", "load_probe_set"),
    "split": ("PAPER_FRACTIONS", "Split", "make_split", "parse_fraction"),
    "train": ("FinetuneConfig", "finetune"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
