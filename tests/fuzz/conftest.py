"""Fuzz tests: hypothesis draws hostile inputs (scan headers, cache indexes, checkpoints); every one must end in
the loader's own error naming the file, never another exception, a hang or a multi-GB allocation.

``make test`` runs a bounded number of examples (profile "ci"); ``make fuzz`` runs many more (profile "long",
``HYPOTHESIS_PROFILE=long``)."""

from __future__ import annotations

import os
from datetime import timedelta

from tests import requirements

hypothesis = requirements.importorskip("hypothesis", "hypothesis")

_COMMON = dict(deadline=timedelta(seconds=20), derandomize=False, print_blob=True,
               suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
hypothesis.settings.register_profile("ci", max_examples=40, **_COMMON)
hypothesis.settings.register_profile("long", max_examples=2000, **_COMMON)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
