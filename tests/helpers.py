"""Shared test helpers."""

import numpy as np
import torch


def assert_close(actual, expected, atol: float = 1e-5, rtol: float = 0.0, what: str = "") -> None:
    """Element-wise comparison that reports how many elements differ, the worst one and where."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    bad = err > atol + rtol * expected.double().abs()
    if bad.any():
        worst = tuple(int(i) for i in np.unravel_index(int(err.argmax()), tuple(err.shape)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements differ (atol {atol}, rtol {rtol}); first at "
            f"{bad.nonzero()[:5].tolist()}; worst at {worst}: {actual[worst].item()} vs {expected[worst].item()} "
            f"(err {err.max().item():.3g})"
        )


def file_size_limit(limit: int):
    """preexec_fn for a child whose files may not grow past ``limit`` bytes (ulimit -f): writes then fail with
    EFBIG, as on a full disk (SIGXFSZ, which would kill the child instead, is ignored)."""
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def hold_folder_lock(folder, what="pretrain", seconds=60):
    """A child process holding ``folder``'s lock (pcrlv2_fast.utils.lock) as ``what``; kill it to release."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", (
        "import time; from pcrlv2_fast.utils.lock import folder_lock\n"
        f"with folder_lock({str(folder)!r}, {what!r}):\n    print('held', flush=True); time.sleep({seconds})")],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child
