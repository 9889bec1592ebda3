"""Small helpers shared across the package."""

from .io import atomic_torch_save, atomic_write, sha256_file

__all__ = ["atomic_torch_save", "atomic_write", "sha256_file"]
