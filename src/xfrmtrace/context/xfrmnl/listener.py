"""Follow the SAD, SPD and tc of every namespace we can name: our own and /run/netns/*.

Each namespace gets a NETLINK_XFRM socket that first subscribes, then dumps, so no
change falls between the two (one seen twice is harmless).  Names that appear later are
picked up on the next rescan; a name that disappears has its socket closed at once, so
xfrmtrace never keeps a deleted (pod) namespace alive.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from xfrmtrace.context.xfrmnl import messages as m
from xfrmtrace.context.xfrmnl.changes import PRESENT, XfrmChange, change_from
from xfrmtrace.context.xfrmnl.database import XfrmDatabase
from xfrmtrace.context.xfrmnl.model import REDACT, KeyPolicy, policy_from, sa_from
from xfrmtrace.context.xfrmnl.socket import XfrmSocket
from xfrmtrace.context.xfrmnl.tc import TcSocket, tc_change_from
from xfrmtrace.kernel.nsenter import netns_inode

log = logging.getLogger("xfrmtrace.context.xfrmnl")

RUN_NETNS = Path("/run/netns")
OWN_NETNS = "/proc/self/ns/net"
RESCAN_S = 1.0


class XfrmWatcher:
    """Sockets per namespace, the database they feed, and the changes they report."""

    def __init__(self, keys: KeyPolicy = REDACT, run_netns: Path = RUN_NETNS) -> None:
        self.db = XfrmDatabase()
        self._keys = keys
        self._run_netns = run_netns
        self._sockets: dict[int, XfrmSocket] = {}  # netns inode -> socket
        # Entries that could not be opened (a name being created, a stale file): tried
        # again only when they change, so a stale name costs one warning, not one a second.
        self._failed: set[int] = set()
        self._tc: dict[int, TcSocket] = {}
        self._paths: dict[int, str] = {}
        self._next_scan = 0.0
        # What each dump found, as "present" changes: the log then says which SAs and
        # policies existed before the first change it records (a cross-node report needs
        # the state the tool started from, not only what changed after).
        self._snapshots: list[XfrmChange] = []

    def start(self) -> None:
        self._open(OWN_NETNS)
        self.rescan()

    def fds(self) -> list[int]:
        return ([sock.fileno() for sock in self._sockets.values()]
                + [sock.fileno() for sock in self._tc.values()])

    def rescan(self) -> None:
        """Open sockets for new names in /run/netns, close those whose name went away."""
        self._next_scan = time.monotonic() + RESCAN_S
        try:
            names = sorted(os.listdir(self._run_netns))
        except FileNotFoundError:
            names = []
        except OSError as err:
            log.warning("cannot list %s: %s", self._run_netns, err)
            return
        present = set()
        for name in names:
            path = str(self._run_netns / name)
            try:
                inode = netns_inode(path)
            except OSError:
                continue
            present.add(inode)
            if inode not in self._sockets and inode not in self._failed:
                self._open(path)
        self._failed &= present
        own = netns_inode(OWN_NETNS)
        for inode in [i for i in self._sockets if i not in present and i != own]:
            self._sockets.pop(inode).close()
            tc = self._tc.pop(inode, None)
            if tc is not None:
                tc.close()
            self._paths.pop(inode, None)
            self.db.forget(inode)

    def _open(self, path: str) -> None:
        try:
            inode = netns_inode(path)
        except OSError:
            return
        try:
            sock = XfrmSocket(None if path == OWN_NETNS else path)
        except OSError as err:
            log.warning("cannot follow XFRM changes in %s: %s", path, err)
            self._failed.add(inode)
            return
        try:
            sock.subscribe()
            self._load(inode, path)
        except OSError as err:
            sock.close()
            log.warning("cannot read the SAD/SPD of %s: %s", path, err)
            self._failed.add(inode)
            return
        self._sockets[inode] = sock
        self._paths[inode] = path
        try:
            self._tc[inode] = TcSocket(None if path == OWN_NETNS else path)
        except OSError as err:
            log.warning("cannot follow tc changes in %s: %s", path, err)

    def _load(self, inode: int, path: str) -> None:
        """Dump the SAD and SPD on a separate socket, so notifications cannot mix in."""
        sock = XfrmSocket(None if path == OWN_NETNS else path)
        try:
            sas = [sa_from(msg, m.attributes(msg), self._keys)
                   for msg in sock.dump(m.XFRM_MSG_GETSA)
                   if msg["header"]["type"] == m.XFRM_MSG_NEWSA]
            policies = [policy_from(msg, m.attributes(msg))
                        for msg in sock.dump(m.XFRM_MSG_GETPOLICY)
                        if msg["header"]["type"] == m.XFRM_MSG_NEWPOLICY]
        finally:
            sock.close()
        now = time.monotonic_ns()
        self.db.load(inode, sas, policies, now)
        self._snapshots += [XfrmChange(kind="sa", action=PRESENT, netns=inode, monotonic_ns=now,
                                       sa=sa) for sa in sas]
        self._snapshots += [XfrmChange(kind="policy", action=PRESENT, netns=inode,
                                       monotonic_ns=now, policy=policy) for policy in policies]
        log.info("netns %d: %d SAs, %d policies", inode, len(sas), len(policies))

    def poll(self, ready: Optional[set[int]] = None) -> list[XfrmChange]:
        """Changes waiting on the sockets (all of them, or those whose fd is ``ready``),
        applied to the database, oldest first; before them, the "present" SAs and policies
        of every dump since the last poll (already in the database)."""
        if time.monotonic() >= self._next_scan:
            self.rescan()
        changes: list[XfrmChange] = []
        for inode, sock in list(self._sockets.items()):
            if ready is None or sock.fileno() in ready:
                changes += self._receive_xfrm(inode, sock)
        for inode, tc in list(self._tc.items()):
            if ready is None or tc.fileno() in ready:
                changes += self._receive_tc(inode, tc)
        changes.sort(key=lambda c: c.monotonic_ns)
        for change in changes:
            self.db.apply(change)
        snapshots, self._snapshots = self._snapshots, []
        return snapshots + changes

    def _receive_xfrm(self, inode: int, sock: XfrmSocket) -> list[XfrmChange]:
        now = time.monotonic_ns()
        try:
            messages = sock.receive()
            if sock.lost:  # the database missed changes: start it again from a dump
                sock.lost = False
                self._load(inode, self._paths[inode])
        except OSError as err:
            log.warning("netns %d: XFRM socket failed (%s); following it again", inode, err)
            sock.close()
            self._sockets.pop(inode)
            self._open(self._paths.pop(inode, OWN_NETNS))
            return []
        found = []
        for msg in messages:
            try:
                change = change_from(msg, inode, now, self._keys)
            except (KeyError, ValueError, TypeError) as err:
                log.warning("netns %d: odd XFRM notification ignored: %s", inode, err)
                continue
            if change is not None:
                found.append(change)
        return found

    def _receive_tc(self, inode: int, tc: TcSocket) -> list[XfrmChange]:
        now = time.monotonic_ns()
        try:
            messages = tc.receive()
        except OSError as err:
            log.warning("netns %d: tc socket failed (%s); no more tc changes there", inode, err)
            self._tc.pop(inode).close()
            return []
        return [c for c in (tc_change_from(msg, inode, now) for msg in messages)
                if c is not None]

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        for tc in self._tc.values():
            tc.close()
        self._sockets.clear()
        self._tc.clear()
