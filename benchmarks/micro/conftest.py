"""Settings shared by the per-op CPU micro-benchmarks: every op runs on one thread.

Run with ``pytest benchmarks/micro`` (needs pytest-benchmark); ``pytest tests`` does not collect this folder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcrlv2_fast.data import native


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """torch's intra-op pool at one thread for the whole session (native ops get ``num_threads=1`` per call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Result rows for benchmarks/results: summary statistics only (the raw timing of every round would make the
    file megabytes long), plus the versions and settings the numbers depend on."""
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)
    output_json["environment"] = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": 1,
        "native_extension": native.available(),
    }
