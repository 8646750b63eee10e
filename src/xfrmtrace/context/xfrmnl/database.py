"""What each namespace's SAD and SPD hold right now, and how they got there."""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from xfrmtrace.context.xfrmnl.changes import XfrmChange
from xfrmtrace.context.xfrmnl.model import SA, Policy

#: Changes remembered per namespace: enough for hours of ordinary rekeying, bounded so a
#: flapping tunnel cannot grow memory without end.
HISTORY = 4096


@dataclass
class NamespaceState:
    sas: dict[tuple, SA] = field(default_factory=dict)
    policies: dict[tuple, Policy] = field(default_factory=dict)
    history: deque[XfrmChange] = field(default_factory=lambda: deque(maxlen=HISTORY))
    since_ns: int = 0  # monotonic time of the snapshot this state starts from
    # The SA removals still in ``history``, by SPI and by destination, oldest first: an
    # error storm (XfrmInNoStates by SPI, XfrmOutNoStates by destination) asks "was this SA
    # removed?" per packet, and must not scan the history.
    removals: dict[int, deque[XfrmChange]] = field(default_factory=dict)
    removals_to: dict[str, deque[XfrmChange]] = field(default_factory=dict)


def sa_removed(change: XfrmChange) -> bool:
    """A change that took an SA out of the SAD: deleted, or expired hard."""
    return change.kind == "sa" and change.sa is not None and (
        change.action == "deleted" or (change.action == "expired" and bool(change.hard)))


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
        if len(state.history) == state.history.maxlen:
            _forget_removal(state, state.history[0])  # about to fall out of the history
        state.history.append(change)
        if sa_removed(change):
            assert change.sa is not None
            state.removals.setdefault(change.sa.spi, deque()).append(change)
            state.removals_to.setdefault(_address_key(change.sa.dst), deque()).append(change)
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

    def last_change(self, netns: int,
                    match: Callable[[XfrmChange], bool]) -> Optional[XfrmChange]:
        """The most recent remembered change in ``netns`` that ``match`` accepts."""
        state = self._spaces.get(netns)
        if state is None:
            return None
        for change in reversed(state.history):
            if match(change):
                return change
        return None

    def last_removal(self, netns: int, spi: int,
                     match: Callable[[SA], bool]) -> Optional[XfrmChange]:
        """The most recent remembered removal of an SA with ``spi`` that ``match`` accepts."""
        state = self._spaces.get(netns)
        if state is None:
            return None
        for change in reversed(state.removals.get(spi, ())):
            if change.sa is not None and match(change.sa):
                return change
        return None

    def last_removal_to(self, netns: int, dst: Optional[str]) -> Optional[XfrmChange]:
        """The most recent remembered removal of an SA to ``dst`` (any spelling of it)."""
        state = self._spaces.get(netns)
        removals = state.removals_to.get(_address_key(dst)) if state and dst else None
        return removals[-1] if removals else None

    def changes_since(self, netns: int, since: XfrmChange,
                      match: Callable[[XfrmChange], bool]) -> list[XfrmChange]:
        """Remembered changes that arrived after ``since`` and that ``match`` accepts,
        oldest first.  By arrival order, not by time: the changes read in one batch share
        its time, and an SA deleted and replaced in one go must still show the replacement."""
        state = self._spaces.get(netns)
        if state is None:
            return []
        newer = []
        for change in reversed(state.history):
            if change is since:
                break
            if match(change):
                newer.append(change)
        return newer[::-1]  # all of the history, if ``since`` is older than what it keeps


def _forget_removal(state: NamespaceState, change: XfrmChange) -> None:
    if sa_removed(change) and change.sa is not None:
        _forget_oldest(state.removals, change.sa.spi, change)
        _forget_oldest(state.removals_to, _address_key(change.sa.dst), change)


def _forget_oldest(index: dict[Any, deque[XfrmChange]], key: Any, change: XfrmChange) -> None:
    removals = index.get(key)
    if removals and removals[0] is change:
        removals.popleft()
        if not removals:
            del index[key]


def _address_key(address: Optional[str]) -> str:
    """One spelling per address (``::1`` and ``0:0::1`` alike); other text as it is."""
    try:
        return str(ipaddress.ip_address(address or ""))
    except ValueError:
        return address or ""
