"""Claiming a run's output folder: a fresh run never mixes its files with those an earlier run left there."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def earlier_run(out: Path, names: Sequence[str], globs: Sequence[str] = (), *, overwrite: bool,
                refusal: str) -> list[Path]:
    """The files of an earlier run in ``out`` (``names``, then the matches of ``globs``). When there are some and
    ``overwrite`` is false: ``ValueError(refusal)``, formatted with ``{out}`` and ``{files}`` (their names)."""
    found = [out / name for name in names if (out / name).exists()]
    found += [path for pattern in globs for path in sorted(out.glob(pattern))]
    if found and not overwrite:
        raise ValueError(refusal.format(out=out, files=", ".join(p.name for p in found)))
    return found


def clear_earlier_run(out: Path, found: Sequence[Path]) -> None:
    """Create ``out`` and remove the files :func:`earlier_run` found there."""
    out.mkdir(parents=True, exist_ok=True)
    for path in found:
        path.unlink(missing_ok=True)
