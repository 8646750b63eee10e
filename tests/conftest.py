"""Shared pytest hooks: the VM suite's per-kernel timings are printed at the end of every run.

Tests append lines to ``config.xfrmtrace_report`` (see :func:`report_line`): kept on the
pytest config, so the lines of one run are shown at the end of that run.
"""

from __future__ import annotations

from typing import Any


def report_line(config: Any, line: str) -> None:
    """Queue ``line`` for the "kernel matrix" section of the terminal summary."""
    config.__dict__.setdefault("xfrmtrace_report", []).append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = terminalreporter.config.__dict__.get("xfrmtrace_report", [])
    if lines:
        terminalreporter.section("kernel matrix: time per kernel")
        for line in lines:
            terminalreporter.write_line(line)
