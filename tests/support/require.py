"""Skips that CI does not accept: a missing requirement fails when XFRMTRACE_REQUIRE_ALL=1.

On a developer machine a test whose requirement is missing (no tshark, no VM lab, no
Chromium...) skips with the reason printed.  In CI that would hide a test that silently
stopped running, so `.ci/run` sets ``XFRMTRACE_REQUIRE_ALL=1`` and the hook in
``tests/conftest.py`` turns every such skip into a failure (drgn does the same with
``DRGN_RUN_LINUX_KERNEL_TESTS``).

Only a test that does not apply to this machine at all may still skip there: the negative
"no kprobes" test on a kernel that has kprobes, a scenario for a counter the kernel under
test does not have.  Those skip through :func:`not_applicable` (or :func:`not_applicable_if`),
whose reason carries :data:`NOT_APPLICABLE`; everything else (``pytest.skip``,
``skipif`` marks, ``importorskip``) counts as a missing requirement.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

import pytest

REQUIRE_ALL_ENV = "XFRMTRACE_REQUIRE_ALL"
# The prefix of every skip reason that CI accepts.
NOT_APPLICABLE = "not applicable here: "


def require_all() -> bool:
    """True when a missing requirement must fail (CI), False when it skips (a developer)."""
    return os.environ.get(REQUIRE_ALL_ENV, "") not in ("", "0")


def not_applicable(reason: str) -> NoReturn:
    """Skip a test that has nothing to check on this machine; allowed in CI too."""
    pytest.skip(NOT_APPLICABLE + reason)


def not_applicable_if(condition: bool, reason: str) -> Any:
    """The ``skipif`` mark form of :func:`not_applicable`."""
    return pytest.mark.skipif(condition, reason=NOT_APPLICABLE + reason)


def skip_reason(longrepr: Any) -> str:
    """The reason of a skipped test's report (pytest keeps it as (path, line, reason))."""
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr
    return str(reason).removeprefix("Skipped: ")


def is_accepted_skip(reason: str) -> bool:
    """Whether a skip with ``reason`` (from :func:`skip_reason`) may stand in CI."""
    return reason.startswith(NOT_APPLICABLE)
