"""What each namespace's SAD and SPD hold right now, and how they got there."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from xfrmtrace.xfrmnl.changes import XfrmChange
from xfrmtrace.xfrmnl.model import SA, Policy

#: Changes remembered per namespace: enough for hours of ordinary rekeying, bounded so a
#: flapping tunnel cannot grow memory without end.
HISTORY = 4096


@dataclass
class NamespaceState:
    sas: dict[tuple, SA] = field(default_factory=dict)
    policies: dict[tuple, Policy] = field(default_factory=dict)
    history: deque[XfrmChange] = field(default_factory=lambda: deque(maxlen=HISTORY))
    since_ns: int = 0  # monotonic time of the snapshot this state starts from


class XfrmDatabase:
    """Per-namespace SAD/SPD mirrors, fed by dumps and notifications."""

    def __init__(self) -> None:
        self._spaces: dict[int, NamespaceState] = {}

    def load(self, netns: int, sas: Iterable[SA], policies: Iterable[Policy],
             monotonic_ns: int) -> None:
        """Start (or restart, after lost notifications) from a dump."""
        state = self._spaces.setdefault(netns, NamespaceState())
        state.sas = {sa.key: sa for sa in sas}
        state.policies = {pol.key: pol for pol in policies}
        state.since_ns = state.since_ns or monotonic_ns

    def forget(self, netns: int) -> None:
        self._spaces.pop(netns, None)

    def state(self, netns: int) -> Optional[NamespaceState]:
        return self._spaces.get(netns)

    def apply(self, change: XfrmChange) -> None:
        state = self._spaces.setdefault(change.netns, NamespaceState(since_ns=change.monotonic_ns))
        state.history.append(change)
        if change.kind not in ("sa", "policy"):
            return  # tc changes are history only
        table: dict[tuple, Any] = state.sas if change.kind == "sa" else state.policies
        item = change.sa if change.kind == "sa" else change.policy
        if change.action in ("added", "updated") and item is not None:
            table[item.key] = item
        elif item is not None and (change.action == "deleted"
                                   or (change.action == "expired" and change.hard)):
            table.pop(item.key, None)  # a hard expiry removes it without a delete message
        elif change.action == "flushed":
            for key in [k for k, v in table.items()
                        if change.flushed_proto in (None, getattr(v, "proto", None))]:
                del table[key]

    def last_change(self, netns: int, match: Callable[[XfrmChange], bool],
                    before_ns: Optional[int] = None) -> Optional[XfrmChange]:
        """The most recent remembered change in ``netns`` that ``match`` accepts."""
        state = self._spaces.get(netns)
        if state is None:
            return None
        for change in reversed(state.history):
            if (before_ns is None or change.monotonic_ns <= before_ns) and match(change):
                return change
        return None

    def changes_after(self, netns: int, after_ns: int,
                      match: Callable[[XfrmChange], bool]) -> list[XfrmChange]:
        state = self._spaces.get(netns)
        if state is None:
            return []
        return [c for c in state.history if c.monotonic_ns > after_ns and match(c)]
