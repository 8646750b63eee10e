"""One IPsec scenario per XFRM counter: break one thing, send real traffic, name the result.

Each scenario builds fresh labs (pairs of network namespaces, A sends to B, see
:mod:`vmlab.guest.ipsec`), breaks exactly one thing, and sends ``count`` packets from A.
It says what the tool must report in :class:`Expect`; the host-side tests check the tool's
events against that, and every namespace's event counts against its /proc/net/xfrm_stat.

Runs INSIDE a VM lab guest, as root.  Without the tracer, for working on the lab itself::

    python -m tests.guest.scenarios in-no-states in-pol-block --count 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from vmlab.guest import ipsec, nsutil
from vmlab.guest.ipsec import Lab, LabConfig

ESP_IN_UDP = "espinudp 4500 4500 0.0.0.0"
REPLACEMENT_SPI = 0x1001


class Skip(Exception):
    """This kernel cannot provoke the scenario's counter; the message says why."""


@dataclass(frozen=True)
class Expect:
    """What the tool must report for a scenario.

    ``packet`` says which packet fields the events carry:
    ``esp``   the ESP packet A sent, outer addresses A -> B, SPI A->B, a sequence number;
    ``plain`` an unprotected (or decapsulated) ICMP packet A -> B;
    ``flow``  A's output flow A -> B (no packet yet: addresses from the flow or the skb);
    ``short`` a truncated ESP packet A -> B, too short to hold an SPI;
    ``esp-in-udp`` like ``esp``, inside UDP port 4500 (the kernel may have stripped the UDP
    header by the time the counter moves).
    """

    counter: str
    side: str  # "a" or "b": the namespace whose counter moves
    packet: str
    per_packet: bool  # exactly one increment per packet sent (else at least one)
    why: str  # what every such event's explanation must say
    family: str = "ipv4"


# Counters some kernels lack, and since when the kernel has them (a scenario that needs one is
# skipped on older kernels with this as its reason).
COUNTER_SINCE: Dict[str, str] = {
    "XfrmInStateDirError": "SA directions arrived in Linux 6.10",
    "XfrmOutStateDirError": "SA directions arrived in Linux 6.10",
    "XfrmOutNoQueueSpace": "IP-TFS arrived in Linux 6.14",
}
# The IP-TFS mode's module (CONFIG_XFRM_IPTFS).  Debian does not build it: the lab builds it
# for the kernels whose source has it (vmlab/host/extramodules.py).
IPTFS_MODULE = "xfrm_iptfs"


@dataclass(frozen=True)
class Scenario:
    name: str
    expect: Expect
    run: Callable[[Context], None]
    requires: Optional[str] = None  # a counter this kernel must have, else skipped
    module: Optional[str] = None  # a module the scenario loads, else it is skipped

    @property
    def doc(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0]


class Context:
    """Hands out labs (kept alive until :meth:`close`) and records what each one did."""

    def __init__(self, ns_prefix: str, count: int,
                 module_attached: Optional[Callable[[str], Optional[float]]] = None,
                 netns_followed: Optional[Callable[[Sequence[str]], None]] = None) -> None:
        """``module_attached(name)``: wait until the tracer has attached to a module that
        was just loaded (seconds, None on timeout); ``netns_followed(namespaces)``: wait
        until it follows the SAD/SPD of a lab's namespaces; both absent when no tracer
        runs."""
        self.ns_prefix = ns_prefix
        self.count = count
        self.module_attached = module_attached
        self.netns_followed = netns_followed
        self.labs: List[Lab] = []
        self.record: Dict[str, Any] = {"labs": []}

    def load_module(self, name: str) -> None:
        """modprobe ``name`` (Skip when the kernel has no such module), then wait for the
        tracer's probes in it: packets sent before they are attached would not be counted."""
        if os.path.isdir(f"/sys/module/{name}"):
            return
        proc = subprocess.run(["modprobe", name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise Skip(f"this kernel has no {name} module ({proc.stderr.strip()})")
        if self.module_attached is not None:
            seconds = self.module_attached(name)
            if seconds is None:
                raise ipsec.LabError(f"the tracer never reported module {name} loaded")
            self.record["module_attach_seconds"] = seconds

    def lab(self, **config: Any) -> Lab:
        n = len(self.labs)
        lab = Lab(LabConfig(ns_a=f"{self.ns_prefix}-{n}a", ns_b=f"{self.ns_prefix}-{n}b",
                            **config), when_set_up=self.netns_followed)
        self.labs.append(lab)
        return lab

    def healthy(self, lab: Lab, dst: Optional[str] = None) -> None:
        """Before breaking anything: one marked ping must make it through the tunnel."""
        if not lab.ping(lab.cfg.ns_a, dst or lab.cfg.addr_b, count=1):
            raise ipsec.LabError(f"lab {lab.cfg.ns_a}->{lab.cfg.ns_b} is broken: "
                                 "ping failed with every SA and policy in place")

    def ping(self, lab: Lab, count: Optional[int] = None, dst: Optional[str] = None) -> None:
        """Send the scenario's packets (marked ICMP echo requests) from A to B."""
        n = self.count if count is None else count
        lab.ping(lab.cfg.ns_a, dst or lab.cfg.addr_b, count=n)
        self.sent(lab, n)

    def sent(self, lab: Lab, n: int) -> None:
        c = lab.cfg
        self.record["labs"].append({
            "sent": n,
            "netns": {c.ns_a: _netns_inode(c.ns_a), c.ns_b: _netns_inode(c.ns_b)},
            "ifindex": {c.veth_a: _ifindex(c.ns_a, c.veth_a),
                        c.veth_b: _ifindex(c.ns_b, c.veth_b)},
            "config": {k: v for k, v in vars(c).items() if not k.startswith("key")},
        })

    def totals(self) -> None:
        """Final /proc counters of every namespace: a new namespace starts at zero, so these
        are the lifetime totals the tool's events must add up to."""
        for lab, facts in zip(self.labs, self.record["labs"]):
            facts["totals"] = {ns: ipsec.xfrm_stat(ns) for ns in (lab.cfg.ns_a, lab.cfg.ns_b)}

    def close(self) -> None:
        for lab in self.labs:
            lab.teardown()


def _netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def _ifindex(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", dev], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split(":", 1)[0])


def _setup_changing_sa(lab: Lab, ns: str, src: str, dst: str, **changes: Any) -> None:
    """The full lab, except that ``ns``'s SA for ``src`` -> ``dst`` has ``changes``."""
    sa = lab.sa(ns, src, dst)
    lab.setup(sas=_replaced(lab.sas(), sa, dataclasses.replace(sa, **changes)))


def _without(items: list, *drop: object) -> list:
    return [x for x in items if x not in drop]


def _replaced(items: list, old: object, new: object) -> list:
    return [new if x == old else x for x in items]


# ---- the scenarios ----------------------------------------------------------------------------


def in_no_states(ctx: Context) -> None:
    """B loses its inbound SA; A's ESP packets find no state."""
    lab = ctx.lab()
    c = lab.cfg
    lab.setup()
    ctx.healthy(lab)
    lab.delete_state(c.ns_b, c.spi_ab, c.addr_b)
    ctx.ping(lab)


def in_no_states_replaced(ctx: Context) -> None:
    """The classic: B's inbound SA is replaced by one with a new SPI that A never learns."""
    lab = ctx.lab()
    c = lab.cfg
    lab.setup()
    ctx.healthy(lab)
    lab.delete_state(c.ns_b, c.spi_ab, c.addr_b)
    dataclasses.replace(lab.sa(c.ns_b, c.addr_a, c.addr_b), spi=REPLACEMENT_SPI).install(
        c.mark, c.mask)
    ctx.ping(lab)


def in_no_states_ipv6(ctx: Context) -> None:
    """IPv6: B loses its inbound SA for the IPv6 tunnel."""
    lab = ctx.lab(ipv6=True)
    c = lab.cfg
    lab.setup()
    ctx.healthy(lab, c.addr6_b)
    lab.delete_state(c.ns_b, c.spi_ab, c.addr6_b)
    ctx.ping(lab, dst=c.addr6_b)


def in_no_states_esp_in_udp(ctx: Context) -> None:
    """ESP-in-UDP (NAT traversal, port 4500): B loses its inbound SA."""
    lab = ctx.lab()
    c = lab.cfg
    lab.setup(sas=[dataclasses.replace(sa, encap=ESP_IN_UDP) for sa in lab.sas()])
    for ns in (c.ns_a, c.ns_b):
        lab.keep(nsutil.esp_in_udp_socket(ns))
    ctx.healthy(lab)
    lab.delete_state(c.ns_b, c.spi_ab, c.addr_b)
    ctx.ping(lab)


def in_no_states_twin_netns(ctx: Context) -> None:
    """Two pairs of namespaces with identical addresses, SPIs and marks, different traffic."""
    labs = [ctx.lab(), ctx.lab()]
    for lab in labs:
        lab.setup()
        ctx.healthy(lab)
        lab.delete_state(lab.cfg.ns_b, lab.cfg.spi_ab, lab.cfg.addr_b)
    ctx.ping(labs[0], count=ctx.count)
    ctx.ping(labs[1], count=ctx.count + 2)


def in_state_proto_error(ctx: Context) -> None:
    """B's inbound SA has the wrong key: ESP authentication fails."""
    lab = ctx.lab()
    c = lab.cfg
    _setup_changing_sa(lab, c.ns_b, c.addr_a, c.addr_b, key="0x" + "5c" * 20)
    ctx.ping(lab)


def in_state_seq_error(ctx: Context) -> None:
    """Replay: A's outbound SA is re-created, so its sequence numbers start over at B."""
    lab = ctx.lab()
    c = lab.cfg
    outbound = lab.sa(c.ns_a, c.addr_a, c.addr_b)
    _setup_changing_sa(lab, c.ns_b, c.addr_a, c.addr_b, replay_window=32)
    if not lab.ping(c.ns_a, c.addr_b, count=ctx.count):  # B has now seen 1..count
        raise ipsec.LabError("lab broken: ping failed with every SA in place")
    lab.delete_state(c.ns_a, c.spi_ab, c.addr_b)
    outbound.install(c.mark, c.mask)
    ctx.ping(lab)  # sequence numbers 1..count again


def in_state_mismatch(ctx: Context) -> None:
    """B's inbound SA expects ESP-in-UDP; A sends plain ESP."""
    lab = ctx.lab()
    c = lab.cfg
    _setup_changing_sa(lab, c.ns_b, c.addr_a, c.addr_b, encap=ESP_IN_UDP)
    ctx.ping(lab)


def in_state_expired(ctx: Context) -> None:
    """B's inbound SA has a hard lifetime of 2 packets; the third one finds it expired."""
    lab = ctx.lab()
    c = lab.cfg
    _setup_changing_sa(lab, c.ns_b, c.addr_a, c.addr_b, packet_limit=2)
    ctx.ping(lab, count=ctx.count + 2)


def in_tmpl_mismatch(ctx: Context) -> None:
    """A has no outbound policy and sends in the clear; B's inbound policy wants ESP."""
    lab = ctx.lab()
    c = lab.cfg
    lab.setup(policies=_without(lab.policies(), lab.policy(c.ns_a, c.addr_a, c.addr_b, "out")))
    ctx.ping(lab)


def in_no_pols(ctx: Context) -> None:
    """B decapsulates A's tunnel packets but has no inbound policy for them."""
    lab = ctx.lab()
    c = lab.cfg
    lab.setup(policies=_without(lab.policies(), lab.policy(c.ns_b, c.addr_a, c.addr_b, "in")))
    ctx.ping(lab)


def in_no_pols_default_block(ctx: Context) -> None:
    """B's default inbound policy is block (Linux 5.17+); A sends in the clear."""
    lab = ctx.lab()
    c = lab.cfg
    lab.setup(sas=[], policies=[])
    done = ipsec.run(["ip", "-n", c.ns_b, "xfrm", "policy", "setdefault", "in", "block"],
                     check=False)
    if done.returncode != 0:
        raise Skip("no default xfrm policy on this kernel (XFRM_MSG_SETDEFAULT, Linux 5.17+): "
                   + done.stdout.strip())
    ctx.ping(lab)


def in_pol_block(ctx: Context) -> None:
    """B's inbound policy blocks A's (clear) traffic."""
    lab = ctx.lab()
    c = lab.cfg
    inbound = lab.policy(c.ns_b, c.addr_a, c.addr_b, "in")
    policies = _without(lab.policies(), lab.policy(c.ns_a, c.addr_a, c.addr_b, "out"))
    lab.setup(policies=_replaced(policies, inbound, dataclasses.replace(inbound, action="block")))
    ctx.ping(lab)


def in_hdr_error(ctx: Context) -> None:
    """A sends IPv4 packets of protocol ESP too short to hold an SPI."""
    lab = ctx.lab()
    c = lab.cfg
    lab.setup()
    nsutil.send_raw_esp(c.ns_a, c.addr_b, b"\x00\x00\x10", ctx.count)
    ctx.sent(lab, ctx.count)


def in_state_dir_error(ctx: Context) -> None:
    """B's SA for A's packets is marked as an output SA (Linux 6.10+)."""
    lab = ctx.lab()
    c = lab.cfg
    _setup_changing_sa(lab, c.ns_b, c.addr_a, c.addr_b, dir="out")
    ctx.ping(lab)


def out_no_states(ctx: Context) -> None:
    """A's outbound policy needs an SA that does not exist."""
    lab = ctx.lab()
    c = lab.cfg
    lab.setup(sas=_without(lab.sas(), lab.sa(c.ns_a, c.addr_a, c.addr_b)))
    ctx.ping(lab)


def out_pol_block(ctx: Context) -> None:
    """A's outbound policy blocks the traffic."""
    lab = ctx.lab()
    c = lab.cfg
    outbound = lab.policy(c.ns_a, c.addr_a, c.addr_b, "out")
    lab.setup(policies=_replaced(lab.policies(), outbound,
                                 dataclasses.replace(outbound, action="block")))
    ctx.ping(lab)


def out_state_expired(ctx: Context) -> None:
    """A's outbound SA has a hard lifetime of 2 packets."""
    lab = ctx.lab()
    c = lab.cfg
    _setup_changing_sa(lab, c.ns_a, c.addr_a, c.addr_b, packet_limit=2)
    ctx.ping(lab, count=ctx.count + 2)


def out_state_seq_error(ctx: Context) -> None:
    """A's outbound SA has used its last sequence number (2^32 - 1, no ESN)."""
    lab = ctx.lab()
    c = lab.cfg
    _setup_changing_sa(lab, c.ns_a, c.addr_a, c.addr_b, oseq=0xFFFFFFFF)
    ctx.ping(lab)


def out_state_dir_error(ctx: Context) -> None:
    """A's SA for its own traffic is marked as an input SA (Linux 6.10+)."""
    lab = ctx.lab()
    c = lab.cfg
    _setup_changing_sa(lab, c.ns_a, c.addr_a, c.addr_b, dir="in")
    ctx.ping(lab)


def out_no_queue_space(ctx: Context) -> None:
    """A's IP-TFS SA may queue 1 octet: every packet finds its send queue full (Linux 6.14+)."""
    ctx.load_module(IPTFS_MODULE)
    lab = ctx.lab()
    c = lab.cfg
    out_sa = dataclasses.replace(lab.sa(c.ns_a, c.addr_a, c.addr_b), mode="iptfs", dir="out",
                                 iptfs_max_qsize=1)
    out_policy = dataclasses.replace(lab.policy(c.ns_a, c.addr_a, c.addr_b, "out"),
                                     mode="iptfs")
    # Only A's output matters: its packets never leave A.
    lab.setup(sas=[out_sa], policies=[out_policy])
    ctx.ping(lab)


DELETED = "was deleted"
_ALL = [
    Scenario("in-no-states", Expect("XfrmInNoStates", "b", "esp", True, DELETED), in_no_states),
    Scenario("in-no-states-replaced", Expect("XfrmInNoStates", "b", "esp", True, DELETED),
             in_no_states_replaced),
    Scenario("in-no-states-ipv6", Expect("XfrmInNoStates", "b", "esp", True, DELETED, "ipv6"),
             in_no_states_ipv6),
    Scenario("in-no-states-esp-in-udp",
             Expect("XfrmInNoStates", "b", "esp-in-udp", True, DELETED),
             in_no_states_esp_in_udp),
    Scenario("in-no-states-twin-netns", Expect("XfrmInNoStates", "b", "esp", True, DELETED),
             in_no_states_twin_netns),
    Scenario("in-state-proto-error",
             Expect("XfrmInStateProtoError", "b", "esp", True, "could not authenticate"),
             in_state_proto_error),
    Scenario("in-state-seq-error",
             Expect("XfrmInStateSeqError", "b", "esp", True, "is a replay"),
             in_state_seq_error),
    Scenario("in-state-mismatch",
             Expect("XfrmInStateMismatch", "b", "esp", True, "expects encapsulation espinudp"),
             in_state_mismatch),
    Scenario("in-state-expired",
             Expect("XfrmInStateExpired", "b", "esp", False, "lifetime ran out"),
             in_state_expired),
    Scenario("in-tmpl-mismatch",
             Expect("XfrmInTmplMismatch", "b", "plain", True, "arrived unprotected"),
             in_tmpl_mismatch),
    Scenario("in-no-pols", Expect("XfrmInNoPols", "b", "plain", True, "no in policy matches"),
             in_no_pols),
    Scenario("in-no-pols-default-block",
             Expect("XfrmInNoPols", "b", "plain", True, "no in policy matches"),
             in_no_pols_default_block),
    Scenario("in-pol-block",
             Expect("XfrmInPolBlock", "b", "plain", True, "blocked by in policy"), in_pol_block),
    Scenario("in-hdr-error",
             Expect("XfrmInHdrError", "b", "short", True, "header could not be read"),
             in_hdr_error),
    Scenario("in-state-dir-error",
             Expect("XfrmInStateDirError", "b", "esp", True, "is marked dir out"),
             in_state_dir_error, requires="XfrmInStateDirError"),
    Scenario("out-no-states",
             Expect("XfrmOutNoStates", "a", "flow", False, "no esp SA to 10.77.0.2 exists"),
             out_no_states),
    Scenario("out-pol-block",
             Expect("XfrmOutPolBlock", "a", "flow", False, "blocked by out policy"),
             out_pol_block),
    Scenario("out-state-expired",
             Expect("XfrmOutStateExpired", "a", "flow", False, "lifetime ran out"),
             out_state_expired),
    Scenario("out-state-seq-error",
             Expect("XfrmOutStateSeqError", "a", "flow", True, "used up its sequence numbers"),
             out_state_seq_error),
    Scenario("out-state-dir-error",
             Expect("XfrmOutStateDirError", "a", "flow", False, "is marked dir in"),
             out_state_dir_error, requires="XfrmOutStateDirError"),
    Scenario("out-no-queue-space",
             Expect("XfrmOutNoQueueSpace", "a", "flow", True, "has a full send queue"),
             out_no_queue_space, requires="XfrmOutNoQueueSpace", module=IPTFS_MODULE),
]
SCENARIOS: Dict[str, Scenario] = {s.name: s for s in _ALL}

# Counters no scenario moves, and why (the matrix report lists them per kernel; a counter a
# kernel has that no scenario moves and that is not here fails tests/test_vm_trace.py).
UNMOVED_WHY: Dict[str, str] = {
    "XfrmInError": "inbound failures before or around the SA lookup that the lab does not "
                   "provoke (secpath allocation, offload/GRO errors)",
    "XfrmInBufferError": "a buffer allocation failed: needs memory pressure",
    "XfrmInStateModeError": "the SA's mode input handler failed: needs a corrupt inner "
                            "header that still authenticates",
    "XfrmInStateInvalid": "the SA went invalid between lookup and use: a race",
    "XfrmInPolError": "the inbound policy lookup itself failed (an LSM denial)",
    "XfrmOutError": "generic output failures (skb copy or GSO segmentation)",
    "XfrmOutBundleGenError": "bundle creation failed for a reason other than a missing SA "
                             "(the route to the tunnel endpoint)",
    "XfrmOutBundleCheckError": "a cached bundle failed its check: its route changed "
                               "under it, a race",
    "XfrmOutStateProtoError": "the SA's output transform failed (an ESP encryption error)",
    "XfrmOutStateModeError": "the SA's mode output handler failed",
    "XfrmOutPolDead": "a policy was deleted while a packet was routed through it: a race",
    "XfrmOutPolError": "the outbound policy lookup itself failed (an LSM denial)",
    "XfrmFwdHdrError": "a forwarded packet's headers could not be decoded for the policy "
                       "check: the lab does not forward",
    "XfrmOutStateInvalid": "the SA went invalid between lookup and output: a race",
    "XfrmAcquireError": "the acquire to the key manager could not be sent",
    "XfrmInIptfsError": "IP-TFS reassembly found a gap or corrupt inner data: needs a lost "
                        "or corrupted fragment of an inner packet split across ESP packets",
}


def moved_counters(records: Dict[str, Any]) -> tuple[set[str], set[str]]:
    """(counters the kernel has, counters some scenario moved) from run_scenarios' records."""
    present, moved = set(), set()
    for record in records.values():
        for lab in record.get("labs", []):
            for totals in lab.get("totals", {}).values():
                present |= set(totals)
                moved |= {c for c, n in totals.items() if n}
    return present, moved


def run_one(scenario: Scenario, ctx: Context, kernel_counters: set[str]) -> Dict[str, Any]:
    """Run a scenario; the record says what was sent where, or why it was skipped."""
    if scenario.requires and scenario.requires not in kernel_counters:
        return {"skipped": f"this kernel has no {scenario.requires} counter "
                           f"({COUNTER_SINCE[scenario.requires]})"}
    started = time.monotonic()
    try:
        scenario.run(ctx)
    except Skip as why:
        return {**ctx.record, "skipped": str(why)}
    except Exception as err:  # noqa: BLE001 - reported to the host test, with the lab's output
        return {**ctx.record, "error": f"{type(err).__name__}: {err}"}
    time.sleep(0.5)  # let softirq processing of the last packets finish
    return {**ctx.record, "seconds": round(time.monotonic() - started, 1)}


def main(argv: Optional[List[str]] = None) -> int:
    """Run scenarios without the tracer and print what /proc says each one moved."""
    parser = argparse.ArgumentParser(prog="python -m tests.guest.scenarios")
    parser.add_argument("scenarios", nargs="*", help="default: all")
    parser.add_argument("--count", type=int, default=3, help="packets to send")
    args = parser.parse_args(argv)
    counters = set(ipsec.parse_xfrm_stat(open("/proc/net/xfrm_stat").read()))
    for n, name in enumerate(args.scenarios or list(SCENARIOS)):
        ctx = Context(f"sc{n}", args.count)
        try:
            record = run_one(SCENARIOS[name], ctx, counters)
            if "labs" in record:
                ctx.totals()
                for facts in record["labs"]:
                    facts["moved"] = {ns: {k: v for k, v in t.items() if v}
                                      for ns, t in facts.pop("totals").items()}
                    for key in ("netns", "ifindex", "config"):
                        facts.pop(key)
        finally:
            ctx.close()
        print(json.dumps({"scenario": name, **record}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
