"""The CI switch: with XFRMTRACE_REQUIRE_ALL=1 a skip for a missing requirement fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.require import REQUIRE_ALL_ENV

REPO = Path(__file__).resolve().parent.parent

SAMPLE = '''
import pytest
from tests.support.require import not_applicable, not_applicable_if

def test_missing_tool():
    pytest.skip("frobnicator not installed")

@pytest.mark.skipif(True, reason="needs root")
def test_missing_privilege():
    pass

def test_kernel_lacks_feature():
    not_applicable("this kernel has no such counter")

@not_applicable_if(True, "a container engine works")
def test_mark_form():
    pass

def test_runs():
    assert True
'''


def run_sample(tmp_path: Path, require_all: str) -> str:
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE)
    env = {**os.environ, REQUIRE_ALL_ENV: require_all}
    # The project's conftest hooks, loaded as a plugin for a test file outside tests/.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-rA", "-q",
                           "-p", "no:cacheprovider", str(sample)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("value", ["", "0"])
def test_developer_machine_skips_with_reason(tmp_path: Path, value: str) -> None:
    out = run_sample(tmp_path, value)
    assert "1 passed, 4 skipped" in out, out
    assert "frobnicator not installed" in out and "needs root" in out


def test_ci_fails_missing_requirements_but_not_inapplicable_tests(tmp_path: Path) -> None:
    out = run_sample(tmp_path, "1")
    # A skip in setup (a skipif mark, a fixture) fails as an error, one in the test as a failure.
    assert "1 failed, 1 passed, 2 skipped, 1 error" in out, out
    failed = {line.split("::")[1].split()[0] for line in out.splitlines()
              if line.startswith(("FAILED", "ERROR"))}
    assert failed == {"test_missing_tool", "test_missing_privilege"}, out
    assert "a test may not skip for a missing requirement: frobnicator not installed" in out
