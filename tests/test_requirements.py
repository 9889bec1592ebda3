"""The CI rule of tests/requirements.py: in CI a skip for want of a required part of the environment fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.requirements import REQUIREMENTS, ci_failure, ci_required, reason

ROOT = Path(__file__).resolve().parents[1]

SKIPPING_TESTS = '''
import pytest
from tests import requirements

needs_native = requirements.needs("native", False, "pretend the C++ extension was not built")

@needs_native
def test_marked():
    pass

def test_skips_inside():
    requirements.skip("shared-data", "pretend ../shared/data is absent")

def test_plain_skip():
    pytest.skip("a skip that names no requirement")

def test_passes():
    assert 1 + 1 == 2
'''


def test_ci_required_reads_the_environment():
    assert ci_required({}) == set()
    assert ci_required({"CI": "false", "PCRLV2_CI_REQUIRES": "native"}) == set()
    assert ci_required({"CI": "true"}) == set(REQUIREMENTS)
    assert ci_required({"CI": "true", "PCRLV2_CI_REQUIRES": "native pagemap"}) == {"native", "pagemap"}
    with pytest.raises(pytest.UsageError, match="unknown requirements"):
        ci_required({"CI": "1", "PCRLV2_CI_REQUIRES": "native gpu"})
    with pytest.raises(KeyError, match="unknown test requirement"):
        reason("gpu", "no GPU")


def test_ci_failure_names_the_requirement_and_the_fix():
    message = ci_failure("Skipped: " + reason("native", "extension unavailable: no g++"), {"native"})
    assert message.startswith("CI requires native: the C++ extension pcrlv2_fast._C built")
    assert "extension unavailable: no g++" in message and ".ci/run" in message
    assert ci_failure(reason("native", "x"), {"shared-data"}) is None
    assert ci_failure("Skipped: needs a CUDA device", set(REQUIREMENTS)) is None


def _run_child(tmp_path, environ: dict) -> subprocess.CompletedProcess:
    (tmp_path / "test_child.py").write_text(SKIPPING_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PCRLV2_CI_REQUIRES")}
    env.update(environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.requirements", "-p", "no:cacheprovider",
                           "-rA", "-q", str(tmp_path / "test_child.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_in_ci_an_unbuilt_extension_fails_the_run(tmp_path):
    result = _run_child(tmp_path, {"CI": "true", "PCRLV2_CI_REQUIRES": "native shared-data"})
    assert result.returncode == 1, result.stdout + result.stderr
    # A mark skips in setup (an error), a call inside the test in its body (a failure).
    assert "1 failed, 1 passed, 1 skipped, 1 error" in result.stdout, result.stdout
    assert "CI requires native: the C++ extension pcrlv2_fast._C built" in result.stdout
    assert "CI requires shared-data" in result.stdout


def test_outside_ci_the_same_tests_skip_with_their_reason(tmp_path):
    result = _run_child(tmp_path, {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 3 skipped" in result.stdout, result.stdout
    assert "[needs native] pretend the C++ extension was not built" in result.stdout
