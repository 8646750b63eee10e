"""Shared pytest hooks: the VM suite's per-kernel timings are printed at the end of every run."""

from __future__ import annotations

from typing import Any

#: One line per kernel booted by the VM suite (appended by tests/test_vm_trace.py).
VM_TIMINGS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if VM_TIMINGS:
        terminalreporter.section("kernel matrix: time per kernel")
        for line in VM_TIMINGS:
            terminalreporter.write_line(line)
