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
