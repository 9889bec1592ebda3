"""Small helpers shared across the package."""

from .io import WriteError, atomic_torch_save, atomic_write, sha256_file

__all__ = ["WriteError", "atomic_torch_save", "atomic_write", "sha256_file"]
