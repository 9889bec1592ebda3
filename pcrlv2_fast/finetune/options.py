"""Allowed values of the fine-tuning options, in a module the command line reads without loading the data path
(SimpleITK, matplotlib); the modules that check them import them from here."""

from __future__ import annotations

TASKS = ("seg", "cls")
SPLITS = ("test", "val", "train", "all")
PRECISIONS = ("fp32", "bf16")
