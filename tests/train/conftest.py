"""Fixtures of the training tests: the phantom scans preprocessed once into a cache that every run (in this
process, in spawned processes and in command-line subprocesses) reads, so all of them draw the same samples."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def phantom_cache(phantom_dir, tmp_path_factory):
    from pcrlv2_fast.data import preprocess

    cache = tmp_path_factory.mktemp("phantom_cache")
    report = preprocess([phantom_dir], cache, progress=False)
    assert len(report.names) == 2, report.table()
    return cache


@pytest.fixture(scope="session")
def cache_volumes(phantom_cache):
    from pcrlv2_fast.data import open_cache

    return open_cache(phantom_cache)


@pytest.fixture
def one_thread():
    """One intra-op thread, as each of two processes gets on this 2-core machine: keeps in-process runs
    comparable with the 1-thread subprocesses, and fast on a loaded machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
