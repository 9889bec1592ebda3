"""Patient-level train/validation/test splits and the paper's label fractions of the training split.

The split depends only on the patients and the seed, never on the label fraction, so runs with 5%, 10%, 20% and
100% of the labels (and random vs pretrained initialisation) are validated and tested on the same patients. The
labelled training patients are a prefix of one seeded permutation of the training patients, so a smaller
fraction's patients are a subset of every larger fraction's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Split", "parse_fraction", "labelled_count", "make_split"]

#: The label fractions of the PCRLv2 paper's fine-tuning experiments.
PAPER_FRACTIONS = (0.05, 0.1, 0.2, 1.0)
# Separate random streams for the split and for the labelled subset (so changing one leaves the other alone).
_SPLIT_STREAM, _SUBSET_STREAM = 0, 1


@dataclass(frozen=True)
class Split:
    """Case ids per part; ``train`` holds the labelled training cases, ``unlabelled`` the rest of the training
    split (left out by the label fraction)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    unlabelled: tuple[str, ...]
    seed: int
    label_fraction: float
    subset_seed: int | None = None  # the labelled subset's seed when it differs from the split's

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Split:
        subset_seed = d.get("subset_seed")
        return cls(tuple(d["train"]), tuple(d["val"]), tuple(d["test"]), tuple(d.get("unlabelled", ())),
                   int(d["seed"]), float(d["label_fraction"]), None if subset_seed is None else int(subset_seed))


def parse_fraction(text: str | float) -> float:
    """A label fraction from ``0.05``, ``5%`` or ``1``; must lie in (0, 1]."""
    value = str(text).strip()
    try:
        fraction = float(value[:-1]) / 100.0 if value.endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"label fraction must be a number in (0, 1] or a percentage like 5%, got {text!r}") from None
    if not 0.0 < fraction <= 1.0 or not math.isfinite(fraction):
        raise ValueError(f"label fraction must be in (0, 1] (or 1%..100%), got {text!r}")
    return fraction


def labelled_count(n_train: int, fraction: float) -> int:
    """Training patients kept for a label fraction: round half up, at least one."""
    return max(1, min(n_train, math.floor(fraction * n_train + 0.5)))


def make_split(
    patients: Mapping[str, str],
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    label_fraction: float = 1.0,
    subset_seed: int | None = None,
) -> Split:
    """Split cases by patient. ``patients`` maps case id -> patient id.

    ``seed`` draws the split; ``subset_seed`` (default: ``seed``) draws the labelled subset, so that runs with
    different seeds can share one split (a fixed test set) and still label different training patients.

    Validation and test get ``round(fraction * n_patients)`` patients each, at least one, and training at least
    one; ``label_fraction`` then keeps :func:`labelled_count` of the training patients. Fewer than 3 patients
    cannot be split and raise ValueError.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < f < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {f}")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    ids = sorted(set(patients.values()))
    n = len(ids)
    if n < 3:
        raise ValueError(f"a train/val/test split needs at least 3 patients (cases), found {n}")
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} patients leave none for training with val_fraction {val_fraction} and test_fraction "
                         f"{test_fraction}; lower them or add cases")
    order = [ids[i] for i in np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)]
    test_p, val_p, train_p = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    # The labelled subset: a prefix of a permutation of the sorted training patients (nested across fractions).
    train_sorted = sorted(train_p)
    subset_rng = np.random.default_rng([seed if subset_seed is None else subset_seed, _SUBSET_STREAM])
    subset_order = [train_sorted[i] for i in subset_rng.permutation(len(train_p))]
    kept = set(subset_order[:labelled_count(len(train_p), label_fraction)])

    def cases_of(group: Sequence[str] | set[str]) -> tuple[str, ...]:
        group = set(group)
        return tuple(sorted(c for c, p in patients.items() if p in group))

    return Split(
        train=cases_of(kept),
        val=cases_of(val_p),
        test=cases_of(test_p),
        unlabelled=cases_of(set(train_p) - kept),
        seed=seed,
        label_fraction=label_fraction,
        subset_seed=None if subset_seed in (None, seed) else subset_seed,
    )
