"""Fixtures of the training tests (the phantom cache they share is in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """One intra-op thread, as each of two processes gets on this 2-core machine: keeps in-process runs
    comparable with the 1-thread subprocesses, and fast on a loaded machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
