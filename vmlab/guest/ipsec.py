"""IPsec labs in network namespaces, for use INSIDE a VM lab guest (as root).

The classic lab: two namespaces (``xt-a`` sends, ``xt-b`` receives) joined by a veth pair,
one ESP tunnel SA per direction in each namespace, and matching policies.  Everything carries
the mark ``0xd00/0xf00``: the output SA lookup matches the *policy's* mark, so the sender sets
the socket mark (``ping -m 3328``) and each namespace marks inbound packets in mangle
PREROUTING.  ``net.ipv4.fwmark_reflect`` makes echo replies carry the request's mark, so the
replies are protected as well and a plain ping works end to end before anything is broken.

Scenarios that break one thing each live in :mod:`tests.guest.scenarios`; :class:`SA` and
:class:`Policy` carry the knobs they need (``encap``, ``replay_window``, lifetimes, a
different ``key``, a block action, an SA direction).  iproute2 6.1 syntax throughout
(``mark 0xd00 mask 0xf00``, not ``0xd00/0xf00``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from vmlab.guest import nsutil, xfrm_netlink

AEAD_ALGO = "rfc4106(gcm(aes))"
# 20 bytes each: a 16-byte AES key plus the 4-byte GCM salt.
KEY_AB = "0x" + "a1" * 20
KEY_BA = "0x" + "b2" * 20


class LabError(RuntimeError):
    """A lab command failed (message has the command and its output)."""


# XFRMTRACE_LAB_TRACE=1 logs every command with its duration (guest runs are slow under TCG;
# this shows where the time goes).
TRACE = os.environ.get("XFRMTRACE_LAB_TRACE", "") not in ("", "0")


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise LabError with that output if it fails."""
    t0 = time.monotonic()
    proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    if TRACE:
        print(f"+ {time.monotonic() - t0:5.2f}s [{proc.returncode}] {' '.join(argv)}",
              file=sys.stderr, flush=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> exit {proc.returncode}\n{proc.stdout}")
    return proc


def in_ns(ns: str, *argv: str) -> List[str]:
    """``argv`` wrapped to run inside network namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def run_batch(ns: str, commands: Sequence[Sequence[str]]) -> None:
    """Run ``ip`` commands (without the leading ``ip``) in namespace ``ns``, in one process.

    Every exec costs a quarter to half a second in the lab's guests (TCG, a 9p root), and a
    lab needs a few dozen: one ``ip -batch`` per namespace instead of one ``ip`` per
    command.  It stops at the first command that fails and names its line.
    """
    if not commands:
        return
    script = "".join(" ".join(command) + "\n" for command in commands)
    t0 = time.monotonic()
    proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input=script,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    if TRACE:
        print(f"+ {time.monotonic() - t0:5.2f}s [{proc.returncode}] ip -n {ns} -batch:\n"
              f"{script}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise LabError(f"ip -n {ns} -batch -> exit {proc.returncode}\n{script}{proc.stdout}")


def sysctl(ns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl of ``ns`` from this process (no ``ip netns exec``)."""
    with nsutil.entered(ns):
        # /proc/sys/net resolves to the opening thread's namespace.
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


def xfrm_stat(ns: str) -> Dict[str, int]:
    """The XFRM MIB counters (``/proc/net/xfrm_stat``) of namespace ``ns``."""
    with nsutil.entered(ns):
        # thread-self: /proc/self/net would be the main thread's namespace.
        with open("/proc/thread-self/net/xfrm_stat") as f:
            text = f.read()
    return parse_xfrm_stat(text)


def parse_xfrm_stat(text: str) -> Dict[str, int]:
    """Parse ``/proc/net/xfrm_stat`` lines such as ``XfrmInNoStates   3``."""
    stats = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


def counter_delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    """Counters that changed between two :func:`xfrm_stat` snapshots."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def ping(ns: str, dst: str, count: int = 3, mark: Optional[int] = None,
         interval: float = 0.2, wait: float = 1.0) -> bool:
    """Ping ``dst`` from ``ns`` (socket mark ``mark``); True if every reply came back.

    Failure is an expected outcome in the scenarios, so it is returned, not raised.
    """
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait)]
    if mark is not None:
        argv += ["-m", str(mark)]  # iputils wants decimal
    return run(in_ns(ns, *argv, dst), check=False).returncode == 0


@dataclass(frozen=True)
class SA:
    """One xfrm state, installed in namespace ``ns``."""

    ns: str
    src: str
    dst: str
    spi: int
    key: str
    proto: str = "esp"
    mode: str = "tunnel"
    reqid: int = 1
    replay_window: int = 0
    encap: Optional[str] = None  # e.g. "espinudp 4500 4500 0.0.0.0" for ESP-in-UDP
    packet_limit: Optional[int] = None  # hard lifetime in packets
    oseq: Optional[int] = None  # starting output sequence number
    dir: Optional[str] = None  # "in" or "out" (Linux 6.10+): installed over raw netlink
    # mode "iptfs" (Linux 6.14+, needs dir): installed over raw netlink; for an out SA, the
    # octets that may wait in its send queue (XFRMA_IPTFS_MAX_QSIZE)
    iptfs_max_qsize: Optional[int] = None

    def install(self, mark: int, mask: int) -> None:
        if not self.over_netlink:
            run(self.add_argv(mark, mask))
            return
        message = xfrm_netlink.new_sa_message(self.src, self.dst, self.spi, AEAD_ALGO,
                                              self.key, 128, mark, mask, self.dir,
                                              reqid=self.reqid, mode=self.mode,
                                              iptfs_max_qsize=self.iptfs_max_qsize)
        try:
            xfrm_netlink.send(self.ns, message)
        except OSError as err:
            raise LabError(f"netlink NEWSA {self} -> {err}") from err

    @property
    def over_netlink(self) -> bool:
        """iproute2 6.1 cannot say this SA: :meth:`install` builds the netlink request."""
        return self.dir is not None or self.mode == "iptfs"

    def add_argv(self, mark: int, mask: int) -> List[str]:
        """``ip xfrm state add`` for this SA."""
        argv = ["ip", "-n", self.ns, "xfrm", "state", "add",
                "src", self.src, "dst", self.dst, "proto", self.proto, "spi", hex(self.spi),
                "reqid", str(self.reqid), "mode", self.mode,
                "mark", hex(mark), "mask", hex(mask),
                "aead", AEAD_ALGO, self.key, "128"]
        if self.replay_window:
            argv += ["replay-window", str(self.replay_window)]
        if self.encap:
            argv += ["encap", *self.encap.split()]
        if self.packet_limit is not None:
            argv += ["limit", "packet-hard", str(self.packet_limit)]
        if self.oseq is not None:
            argv += ["replay-oseq", str(self.oseq)]
        return argv


@dataclass(frozen=True)
class Policy:
    """One xfrm policy (host-to-host selector, one ESP tunnel template) in namespace ``ns``."""

    ns: str
    src: str
    dst: str
    dir: str  # "out", "in" or "fwd"
    proto: str = "esp"
    mode: str = "tunnel"
    reqid: int = 1
    action: str = "allow"  # "block" drops matching traffic (no template then)

    @property
    def over_netlink(self) -> bool:
        """iproute2 6.1 knows no template mode iptfs: :meth:`install` builds the request."""
        return self.mode == "iptfs"

    def install(self, mark: int, mask: int) -> None:
        if not self.over_netlink:
            run(self.add_argv(mark, mask))
            return
        message = xfrm_netlink.new_policy_message(self.src, self.dst, self.dir, mark, mask,
                                                  reqid=self.reqid, mode=self.mode)
        try:
            xfrm_netlink.send(self.ns, message)
        except OSError as err:
            raise LabError(f"netlink NEWPOLICY {self} -> {err}") from err

    def add_argv(self, mark: int, mask: int) -> List[str]:
        """``ip xfrm policy add`` for this policy (tunnel endpoints = selector addresses)."""
        argv = ["ip", "-n", self.ns, "xfrm", "policy", "add",
                "src", _host_prefix(self.src), "dst", _host_prefix(self.dst), "dir", self.dir,
                "mark", hex(mark), "mask", hex(mask)]
        if self.action != "allow":
            return [*argv, "action", self.action]
        return [*argv, "tmpl", "src", self.src, "dst", self.dst, "proto", self.proto,
                "reqid", str(self.reqid), "mode", self.mode]


def _host_prefix(addr: str) -> str:
    return f"{addr}/128" if ":" in addr else f"{addr}/32"


@dataclass
class LabConfig:
    """Names, addresses, SPIs and mark of a two-namespace lab.  A sends to B."""

    ns_a: str = "xt-a"
    ns_b: str = "xt-b"
    veth_a: str = "xt-va"
    veth_b: str = "xt-vb"
    addr_a: str = "10.77.0.1"
    addr_b: str = "10.77.0.2"
    ipv6: bool = False
    addr6_a: str = "fd00:77::1"
    addr6_b: str = "fd00:77::2"
    spi_ab: int = 0x1000  # A -> B
    spi_ba: int = 0x2000  # B -> A
    key_ab: str = KEY_AB
    key_ba: str = KEY_BA
    mark: int = 0xD00
    mask: int = 0xF00


class Lab:
    """Build and tear down the two-namespace IPsec lab described by a :class:`LabConfig`.

    ``setup()`` installs :meth:`sas` and :meth:`policies` unless told otherwise, so a scenario
    can drop or alter one SA/policy (``setup(sas=[...])``) instead of re-implementing setup.
    """

    def __init__(self, config: Optional[LabConfig] = None,
                 when_set_up: Optional[Callable[[Sequence[str]], None]] = None) -> None:
        """``when_set_up(namespaces)`` runs after every :meth:`setup` (the tracer's harness
        waits there until the tool follows the new namespaces)."""
        self.cfg = config or LabConfig()
        self._when_set_up = when_set_up
        self._sockets: List[socket.socket] = []

    def keep(self, sock: socket.socket) -> None:
        """Hold a socket the lab needs (e.g. an ESP-in-UDP one) until teardown."""
        self._sockets.append(sock)

    # ---- description --------------------------------------------------------------------

    def address_pairs(self) -> List[Tuple[str, str]]:
        """(A address, B address) per enabled address family."""
        pairs = [(self.cfg.addr_a, self.cfg.addr_b)]
        if self.cfg.ipv6:
            pairs.append((self.cfg.addr6_a, self.cfg.addr6_b))
        return pairs

    def sas(self) -> List[SA]:
        """Both directions' SAs, installed in both namespaces (each needs its in and out SA)."""
        c = self.cfg
        result = []
        for a, b in self.address_pairs():
            for ns in (c.ns_a, c.ns_b):
                result.append(SA(ns, a, b, c.spi_ab, c.key_ab))
                result.append(SA(ns, b, a, c.spi_ba, c.key_ba))
        return result

    def policies(self) -> List[Policy]:
        """Out and in policies for the A<->B traffic in both namespaces."""
        c = self.cfg
        result = []
        for a, b in self.address_pairs():
            result += [Policy(c.ns_a, a, b, "out"), Policy(c.ns_a, b, a, "in"),
                       Policy(c.ns_b, b, a, "out"), Policy(c.ns_b, a, b, "in")]
        return result

    def policy(self, ns: str, src: str, dst: str, direction: str) -> Policy:
        """The default policy of ``ns`` for ``src`` -> ``dst`` in ``direction``."""
        for pol in self.policies():
            if (pol.ns, pol.src, pol.dst, pol.dir) == (ns, src, dst, direction):
                return pol
        raise KeyError((ns, src, dst, direction))

    def sa(self, ns: str, src: str, dst: str) -> SA:
        """The default SA of ``ns`` for ``src`` -> ``dst`` (to derive a modified copy)."""
        for sa in self.sas():
            if (sa.ns, sa.src, sa.dst) == (ns, src, dst):
                return sa
        raise KeyError((ns, src, dst))

    # ---- building -----------------------------------------------------------------------

    def setup(self, sas: Optional[Sequence[SA]] = None,
              policies: Optional[Sequence[Policy]] = None) -> None:
        """Create namespaces, link, addresses and marking, then the SAs and policies."""
        self.teardown()
        self.create_network()
        c = self.cfg
        items: List[SA | Policy] = [*(self.sas() if sas is None else sas),
                                    *(self.policies() if policies is None else policies)]
        # What iproute2 can say goes in one batch per namespace (the kernel does not care in
        # which order SAs and policies arrive); the rest over netlink.
        batches: Dict[str, List[List[str]]] = {}
        for item in items:
            if not item.over_netlink:
                batches.setdefault(item.ns, []).append(item.add_argv(c.mark, c.mask)[3:])
        for ns, commands in batches.items():
            run_batch(ns, commands)
        for item in items:
            if item.over_netlink:
                item.install(c.mark, c.mask)
        if self._when_set_up is not None:
            self._when_set_up((c.ns_a, c.ns_b))

    def create_network(self) -> None:
        """Namespaces, veth pair, addresses, mark-reflection sysctls and the inbound marking."""
        c = self.cfg
        for ns in (c.ns_a, c.ns_b):
            run(["ip", "netns", "add", ns])
        run(["ip", "-n", c.ns_a, "link", "add", c.veth_a, "type", "veth",
             "peer", "name", c.veth_b, "netns", c.ns_b])
        for ns, dev, addr, addr6 in ((c.ns_a, c.veth_a, c.addr_a, c.addr6_a),
                                     (c.ns_b, c.veth_b, c.addr_b, c.addr6_b)):
            commands = [["link", "set", "lo", "up"], ["addr", "add", f"{addr}/24", "dev", dev]]
            # Replies (ICMP echo reply, TCP RST ...) inherit the request's mark, so they
            # match the marked policies on the way back.
            sysctl(ns, "net.ipv4.fwmark_reflect", "1")
            if c.ipv6:
                sysctl(ns, "net.ipv6.fwmark_reflect", "1")
                # nodad: the address is usable at once, no 1-2 s duplicate detection wait.
                commands.append(["addr", "add", f"{addr6}/64", "dev", dev, "nodad"])
            commands.append(["link", "set", dev, "up"])
            run_batch(ns, commands)
            # Mark everything inbound, so the (marked) inbound SA and policy lookups match.
            run(in_ns(ns, "iptables", "-t", "mangle", "-A", "PREROUTING",
                      "-j", "MARK", "--set-mark", hex(c.mark)))
            if c.ipv6:
                # Except neighbour discovery: the kernel sends it in the clear, and a marked
                # advertisement would hit the marked "in" policy and be dropped
                # (XfrmInTmplMismatch), leaving the neighbour unresolved.
                for icmp_type in ("neighbour-solicitation", "neighbour-advertisement"):
                    run(in_ns(ns, "ip6tables", "-t", "mangle", "-A", "PREROUTING",
                              "-p", "ipv6-icmp", "--icmpv6-type", icmp_type, "-j", "RETURN"))
                run(in_ns(ns, "ip6tables", "-t", "mangle", "-A", "PREROUTING",
                          "-j", "MARK", "--set-mark", hex(c.mark)))

    def teardown(self) -> None:
        """Delete both namespaces (and with them the veth pair, SAs, policies and rules)."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for ns in (self.cfg.ns_a, self.cfg.ns_b):
            run(["ip", "netns", "del", ns], check=False)

    # ---- actions --------------------------------------------------------------------------

    def delete_state(self, ns: str, spi: int, dst: str, proto: str = "esp") -> None:
        """Delete one SA.  The lab's SAs are marked, and a delete must name the mark too."""
        run(["ip", "-n", ns, "xfrm", "state", "delete", "dst", dst, "proto", proto,
             "spi", hex(spi), "mark", hex(self.cfg.mark), "mask", hex(self.cfg.mask)])

    def ping(self, ns: str, dst: str, count: int = 3, mark: Optional[int] = None) -> bool:
        """Ping from ``ns`` with the lab's mark (unless another ``mark`` is given)."""
        return ping(ns, dst, count, self.cfg.mark if mark is None else mark)

    def xfrm_stat(self, ns: str) -> Dict[str, int]:
        """Counters of one of the lab's namespaces."""
        return xfrm_stat(ns)
