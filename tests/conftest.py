"""Shared pytest hooks: per-kernel timings of the VM suite, and skips CI does not accept.

Tests append lines to ``config.xfrmtrace_report`` (see :func:`report_line`): kept on the
pytest config, so the lines of one run are shown at the end of that run.

With ``XFRMTRACE_REQUIRE_ALL=1`` (set by ``.ci/run``) a test skipped for a missing
requirement fails instead (tests/support/require.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import require


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not require.require_all() or hasattr(report, "wasxfail"):
        return
    reason = require.skip_reason(report.longrepr)
    if require.is_accepted_skip(reason):
        return
    report.outcome = "failed"
    report.longrepr = (f"{require.REQUIRE_ALL_ENV}=1 (CI): a test may not skip for a missing "
                       f"requirement: {reason}")


def report_line(config: Any, line: str) -> None:
    """Queue ``line`` for the "kernel matrix" section of the terminal summary."""
    config.__dict__.setdefault("xfrmtrace_report", []).append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = terminalreporter.config.__dict__.get("xfrmtrace_report", [])
    if lines:
        terminalreporter.section("kernel matrix: time per kernel")
        for line in lines:
            terminalreporter.write_line(line)
