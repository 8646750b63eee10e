"""A bounded set of ``netns`` label values for the metrics, however many namespaces come and go.

On a Kubernetes node every pod has its own network namespace, and pods come and go all
day: a label value per namespace ever seen would grow the series count without bound (in
the tool, and in Prometheus).  :class:`NetnsLabeller` gives at most ``limit`` namespaces a
label of their own (their inode, as in events and JSON); namespaces beyond that share the
label ``"other"``.  A namespace that is gone gives its label back.

Counter semantics are kept: a series never goes down.

* A namespace's own series carries the kernel map's count, exact.  When the namespace is
  gone its series is no longer exported (Prometheus marks it stale, as for a gone pod);
  ``sum(rate(...))`` over the rest is unaffected.
* ``"other"`` adds, for each namespace in it, only what it counted after joining (its
  count at the previous scrape is the baseline), and keeps what gone members had counted,
  so it only ever grows.

A namespace is *gone* when no process of the host has it (``/proc/*/task/*/ns/net``), no
``ip netns`` name pins it (``/run/netns``) and its count did not change since the previous
check.  A namespace pinned only by an open file descriptor or a kernel reference looks gone:
its label is released, and if it counts again it gets a label again (a new series).  The
kernel reuses a gone namespace's inode number for a new one (nsfs ids), so a series can
continue under a new owner: events carry the inode as well, and their time tells which.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from xfrmtrace.kernel.netns import NETNS_DIRS, named_netns

OTHER_NETNS = "other"
DEFAULT_NETNS_LIMIT = 64
LIVENESS_SECONDS = 30.0  # scanning every task's namespace link is not free: not at every scrape

# (site id, netns inode) -> increments, as the BPF map netns_counts holds them
NetnsCounts = Mapping[tuple[int, int], int]


def live_netns(proc: Path = Path("/proc"), directories: Iterable[Path] = NETNS_DIRS) -> set[int]:
    """Inodes of the network namespaces some task is in or an ``ip netns`` name pins."""
    inodes: set[int] = set()
    try:
        pids = [entry for entry in os.listdir(proc) if entry.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            tids = os.listdir(proc / pid / "task")
        except OSError:
            continue  # exited meanwhile
        for tid in tids:  # a thread can setns() on its own (this tool's netlink threads do)
            try:
                link = os.readlink(proc / pid / "task" / tid / "ns" / "net")
            except OSError:
                continue
            if link.startswith("net:[") and link.endswith("]"):
                inodes.add(int(link[5:-1]))
    return inodes | set(named_netns(directories))


class NetnsLabeller:
    """Maps (site, netns inode) counts to (site, label) counts with at most ``limit`` + 1
    label values (one per namespace that has a label, and ``"other"``)."""

    def __init__(self, limit: int = DEFAULT_NETNS_LIMIT,
                 alive: Callable[[], set[int]] = live_netns,
                 clock: Callable[[], float] = time.monotonic,
                 check_every: float = LIVENESS_SECONDS) -> None:
        self.limit = limit
        self._alive = alive
        self._clock = clock
        self._check_every = check_every
        self._own: set[int] = set()  # namespaces with a label of their own
        # (site, netns) counted under "other" -> its count when it joined
        self._other_base: dict[tuple[int, int], int] = {}
        self._other_kept: dict[int, int] = {}  # site -> what gone members of "other" counted there
        self._previous: dict[tuple[int, int], int] = {}  # the counts of the previous scrape
        self._totals_at_check: dict[int, int] = {}
        self._released: dict[int, int] = {}  # gone namespace -> its total then; not exported
        self._checked_at = clock()

    def labels(self, counts: NetnsCounts) -> dict[tuple[int, str], int]:
        """(site, label) -> count for this scrape; ``counts`` holds no netns 0 entries."""
        totals: dict[int, int] = {}
        for (_site, netns), count in counts.items():
            totals[netns] = totals.get(netns, 0) + count
        if self._clock() - self._checked_at >= self._check_every:
            self._release_gone(counts, totals)
        for netns, total in list(self._released.items()):
            if totals.get(netns, total) != total:  # counted again: a newcomer (inode reused?)
                del self._released[netns]
        in_other = {netns for _site, netns in self._other_base}
        # Free labels go to the busiest newcomers first; the inode breaks ties, for stable output.
        newcomers = set(totals) - self._own - in_other - set(self._released)
        for netns in sorted(newcomers, key=lambda n: (-totals[n], n)):
            if len(self._own) < self.limit:
                self._own.add(netns)
        result: dict[tuple[int, str], int] = {}
        for key, count in counts.items():
            site, netns = key
            if netns in self._released:
                continue
            if netns in self._own:
                result[(site, str(netns))] = count
                continue
            base = self._other_base.setdefault(key, self._previous.get(key, 0))
            label_key = (site, OTHER_NETNS)
            result[label_key] = result.get(label_key, 0) + count - base
        for site, kept in self._other_kept.items():
            label_key = (site, OTHER_NETNS)
            result[label_key] = result.get(label_key, 0) + kept
        self._previous = dict(counts)
        return result

    def _release_gone(self, counts: NetnsCounts, totals: Mapping[int, int]) -> None:
        alive = self._alive()
        gone = {netns for netns, total in totals.items()
                if netns not in alive and total == self._totals_at_check.get(netns)}
        self._own -= gone
        self._released.update((netns, totals[netns]) for netns in gone)
        for key in [k for k in self._other_base if k[1] in gone]:
            self._other_kept[key[0]] = (self._other_kept.get(key[0], 0)
                                        + counts.get(key, 0) - self._other_base.pop(key))
        self._totals_at_check = dict(totals)
        self._checked_at = self._clock()
