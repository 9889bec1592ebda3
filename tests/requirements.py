"""What the test suite needs from its environment, and which of it CI insists on.

A test that cannot run for want of an optional part of the environment skips through this module
(``skip``, ``needs``, ``importorskip``): its skip reason starts with ``[needs NAME]``. On a user's machine that
stays a skip with the reason. In CI (``CI=true``) every requirement listed in ``PCRLV2_CI_REQUIRES`` (set by
``.ci/run``; all of ``REQUIREMENTS`` when unset) turns such a skip into a failure, so a broken C++ build,
missing shared data or a file system that cannot count page reads cannot leave CI green with the default
loader or the real-data tests silently untested.

The two pytest hooks at the bottom do the conversion; ``tests/conftest.py`` imports them, and a test runs them in
a child pytest (``-p tests.requirements``).
"""

from __future__ import annotations

import os
import re

import pytest

REQUIREMENTS = {
    "native": "the C++ extension pcrlv2_fast._C built (`make install` with a C++ compiler)",
    "shared-data": "the real sample data in ../shared/data beside the checkout (or $PCRLV2_SHARED_DATA)",
    "pagemap": "page-read counting: /proc/self/pagemap readable and a file system that drops cached pages "
               "(not tmpfs)",
    "triton": "triton installed (the dev requirements)",
    "dali": "NVIDIA DALI installed (pip install nvidia-dali-cuda120)",
    "torchio": "torchio installed (the dev requirements)",
    "skimage": "scikit-image installed (the dev requirements): the official pipeline of the end-to-end benchmark",
    "tensorboard": "tensorboard installed (the dev requirements)",
    "hypothesis": "hypothesis installed (the dev requirements): the fuzz tests",
    "safetensors": "the safetensors package installed (the dev requirements): interop of our reader and writer",
}
_TAG = re.compile(r"\[needs ([a-z-]+)\]")
_TRUE = ("1", "true", "yes")


def reason(name: str, why: str) -> str:
    if name not in REQUIREMENTS:
        raise KeyError(f"unknown test requirement {name!r}; known: {sorted(REQUIREMENTS)}")
    return f"[needs {name}] {why}"


def skip(name: str, why: str):
    """Skip the calling test (or module) for want of requirement ``name``."""
    pytest.skip(reason(name, why), allow_module_level=True)


def needs(name: str, available: bool, why: str):
    """A skipif mark for requirement ``name``."""
    return pytest.mark.skipif(not available, reason=reason(name, why))


def importorskip(module: str, name: str):
    """Import ``module`` or skip for want of requirement ``name``."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        skip(name, f"{module} is not importable: {exc}")


def ci_required(environ=os.environ) -> set[str]:
    """The requirements whose skips fail this run: none outside CI."""
    if environ.get("CI", "").strip().lower() not in _TRUE:
        return set()
    listed = environ.get("PCRLV2_CI_REQUIRES")
    names = set(listed.split()) if listed is not None else set(REQUIREMENTS)
    unknown = names - set(REQUIREMENTS)
    if unknown:
        raise pytest.UsageError(f"PCRLV2_CI_REQUIRES names unknown requirements {sorted(unknown)}; "
                                f"known: {sorted(REQUIREMENTS)}")
    return names


def ci_failure(skip_reason: str, required: set[str]) -> str | None:
    """The failure message for a skip that this run must not accept, else None."""
    match = _TAG.search(skip_reason)
    if match is None or match.group(1) not in required:
        return None
    name = match.group(1)
    return (f"CI requires {name}: {REQUIREMENTS[name]}, but this test skipped: {skip_reason} "
            f"(.ci/run sets PCRLV2_CI_REQUIRES; fix the environment, not the test)")


def _skip_reason(longrepr) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason"); a collection skip may carry a plain string.
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def _fail_if_required(report) -> None:
    required = ci_required()
    if report.skipped and required:
        message = ci_failure(_skip_reason(report.longrepr), required)
        if message:
            report.outcome = "failed"
            report.longrepr = message


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_required(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_required(outcome.get_result())
