"""Why did this counter move?  Answers from what the SAD/SPD mirror knows at that moment.

Each explainer looks at the event's packet or flow (addresses, protocol, SPI, mark) and the
event's namespace in the :class:`XfrmDatabase`, and says what it found: the SA or policy
involved, what about it does not fit, and the history that led there (an SA deleted 16
minutes earlier and the SA installed since).  When nothing fits, it says so: an
explanation never guesses.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Optional

from xfrmtrace.context.xfrmnl.changes import XfrmChange
from xfrmtrace.context.xfrmnl.database import NamespaceState, XfrmDatabase
from xfrmtrace.context.xfrmnl.model import SA, Policy, Selector, Template
from xfrmtrace.decode.events import XfrmErrorEvent

MAX_LISTED = 3


@dataclass
class Explanation:
    """What the tool found; ``summary`` is one line, ``details`` more lines."""

    summary: str
    details: list[str] = field(default_factory=list)
    sas: list[SA] = field(default_factory=list)
    policies: list[Policy] = field(default_factory=list)
    history: list[XfrmChange] = field(default_factory=list)


# ---- matching -----------------------------------------------------------------------------------


def mark_matches(mark: Optional[int], value: int, mask: int) -> bool:
    """The kernel's xfrm mark rule: (packet mark & mask) == value."""
    return ((mark or 0) & mask) == value


def _in_prefix(addr: Optional[str], prefix: Optional[str]) -> bool:
    if prefix is None:
        return True
    if addr is None:
        return False
    try:
        return ipaddress.ip_address(addr) in ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return False


def selector_matches(sel: Selector, event: XfrmErrorEvent) -> bool:
    """The selector covers the event's addresses, and protocol and ports where both have
    them (a field the event lacks cannot rule the selector out)."""
    if not (_in_prefix(event.src, sel.src) and _in_prefix(event.dst, sel.dst)):
        return False
    if sel.proto and event.proto_num is not None and sel.proto != event.proto_num:
        return False
    if sel.dport and event.dport is not None and sel.dport != event.dport:
        return False
    return not (sel.sport and event.sport is not None and sel.sport != event.sport)


def matching_policies(state: NamespaceState, event: XfrmErrorEvent,
                      direction: str) -> list[Policy]:
    """Policies of ``direction`` whose selector and mark match, best (lowest priority) first."""
    found = [p for p in state.policies.values()
             if p.direction == direction and not p.sub
             and mark_matches(event.mark, p.mark, p.mark_mask)
             and selector_matches(p.selector, event)]
    return sorted(found, key=lambda p: p.priority)


def _ipsec_proto(event: XfrmErrorEvent) -> str:
    """The SA protocol the packet's IPsec header belongs to (ESP-in-UDP is ESP)."""
    return {"ah": "ah", "ipcomp": "comp"}.get(event.encap or "", "esp")


def _same_sa(event: XfrmErrorEvent) -> Callable[[SA], bool]:
    proto = _ipsec_proto(event)
    return lambda sa: (sa.spi == event.spi and _same_addr(sa.dst, event.dst)
                       and sa.proto == proto)


def _same_addr(a: Optional[str], b: Optional[str]) -> bool:
    try:
        return a is not None and b is not None and \
            ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _ago(change: XfrmChange, event: XfrmErrorEvent) -> str:
    seconds = (event.monotonic_ns - change.monotonic_ns) / 1e9
    if seconds < 0:
        return "just before"
    if seconds < 120:
        return f"{seconds:.1f}s before"
    return f"{seconds / 60:.1f} min before"


def _sa_added(change: XfrmChange) -> bool:
    return change.kind == "sa" and change.action in ("added", "updated") and change.sa is not None


# ---- explainers ---------------------------------------------------------------------------------


def _in_no_states(event: XfrmErrorEvent, db: XfrmDatabase, state: NamespaceState) -> Explanation:
    if event.spi is None:
        return Explanation("the packet's SPI could not be read, so no SA can be compared")
    same = _same_sa(event)
    present = [sa for sa in state.sas.values() if same(sa)]
    if present:
        sa = present[0]
        if not mark_matches(event.mark, sa.mark, sa.mark_mask):
            return Explanation(
                f"SA spi {sa.spi:#x} dst {sa.dst} exists, but its mark "
                f"{sa.mark:#x}/{sa.mark_mask:#x} does not match the packet's mark "
                f"{event.mark or 0:#x}", sas=present)
        return Explanation(f"SA spi {sa.spi:#x} dst {sa.dst} exists now: it was installed "
                           "after this packet arrived, or matches on if_id/direction",
                           sas=present)
    gone = db.last_removal(event.netns, event.spi, same)
    if gone is None:
        others = [sa for sa in state.sas.values() if _same_addr(sa.dst, event.dst)]
        exp = Explanation(
            f"no SA with dst {event.dst} spi {event.spi:#x} was seen in this namespace "
            "since tracing started", sas=others[:MAX_LISTED])
        if others:
            exp.details.append(f"SAs for dst {event.dst} now: "
                               + ", ".join(f"spi {sa.spi:#x}" for sa in others[:MAX_LISTED]))
        else:
            exp.details.append(f"this namespace has no SA for dst {event.dst} at all")
        return exp
    assert gone.sa is not None
    verb = "deleted" if gone.action == "deleted" else "removed by its hard lifetime"
    exp = Explanation(f"SA spi {gone.sa.spi:#x} dst {gone.sa.dst} was {verb} "
                      f"{_ago(gone, event)}", sas=[gone.sa], history=[gone])
    since = db.changes_since(event.netns, gone, _sa_added)
    if since:
        listed = since[:MAX_LISTED]
        exp.details.append("installed since: " + "; ".join(
            f"spi {c.sa.spi:#x} dst {c.sa.dst}" for c in listed if c.sa is not None))
        exp.history += listed
    else:
        exp.details.append("no SA was installed since")
    return exp


def _template_candidates(tmpl: Template, event: XfrmErrorEvent,
                         state: NamespaceState) -> list[SA]:
    """SAs of the template's protocol to its destination (the flow's, when it names none)."""
    dst = tmpl.dst or event.dst
    return [sa for sa in state.sas.values() if _same_addr(sa.dst, dst) and sa.proto == tmpl.proto]


def _template_gap(tmpl: Template, policy: Policy, event: XfrmErrorEvent,
                  state: NamespaceState) -> str:
    """Why no SA of ``state`` satisfies ``tmpl`` for this flow."""
    dst = tmpl.dst or event.dst
    to_dst = _template_candidates(tmpl, event, state)
    if not to_dst:
        return f"no {tmpl.proto} SA to {dst} exists"
    reasons = []
    for sa in to_dst[:MAX_LISTED]:
        why = []
        if tmpl.reqid and sa.reqid != tmpl.reqid:
            why.append(f"reqid {sa.reqid} != {tmpl.reqid}")
        if sa.mode != tmpl.mode:
            why.append(f"mode {sa.mode} != {tmpl.mode}")
        if not mark_matches(policy.mark, sa.mark, sa.mark_mask):
            why.append(f"mark {sa.mark:#x}/{sa.mark_mask:#x} does not match the policy's "
                       f"{policy.mark:#x}")
        if tmpl.src and not _same_addr(sa.src, tmpl.src):
            why.append(f"src {sa.src} != {tmpl.src}")
        if sa.direction == "in":
            why.append("it is an input SA")
        reasons.append(f"spi {sa.spi:#x}: " + (", ".join(why) or "appears to fit (added after "
                                                "this lookup, or not yet valid)"))
    return f"SAs to {dst} do not fit: " + "; ".join(reasons)


def _out_no_states(event: XfrmErrorEvent, db: XfrmDatabase,
                   state: NamespaceState) -> Explanation:
    policies = matching_policies(state, event, "out")
    if not policies:
        return Explanation(f"no out policy matches {event.src} -> {event.dst} mark "
                           f"{event.mark or 0:#x} now")
    policy = policies[0]
    exp = Explanation(f"out policy {policy.selector.describe()} (index {policy.index}) "
                      "matched", policies=[policy])
    for tmpl in policy.templates:
        exp.details.append(f"template [{tmpl.describe()}]: "
                           + _template_gap(tmpl, policy, event, state))
    dst = policy.templates[0].dst if policy.templates else event.dst
    gone = db.last_removal_to(event.netns, dst or event.dst)
    if gone is not None and gone.sa is not None:
        exp.details.append(f"last SA to {gone.sa.dst} (spi {gone.sa.spi:#x}) was "
                           f"{gone.action} {_ago(gone, event)}")
        exp.history.append(gone)
    return exp


def _policy_check(direction: str) -> Callable[..., Explanation]:
    def explain(event: XfrmErrorEvent, db: XfrmDatabase, state: NamespaceState) -> Explanation:
        policies = matching_policies(state, event, direction)
        if not policies:
            return Explanation(f"no {direction} policy matches {event.src} -> {event.dst} "
                               f"mark {event.mark or 0:#x}")
        policy = policies[0]
        if policy.action == "block":
            return Explanation(f"blocked by {direction} policy {policy.selector.describe()} "
                               f"(index {policy.index}, priority {policy.priority})",
                               policies=[policy])
        exp = Explanation(f"{direction} policy {policy.selector.describe()} (index "
                          f"{policy.index}) requires " + "; ".join(
                              t.describe() for t in policy.templates), policies=[policy])
        if event.proto not in ("esp", "ah", "comp") and event.spi is None:
            exp.details.append(f"the packet was checked as plain {event.proto or 'IP'}: it "
                               "arrived unprotected or its SA did not match the template")
        return exp
    return explain


def _in_no_pols(event: XfrmErrorEvent, db: XfrmDatabase, state: NamespaceState) -> Explanation:
    policies = matching_policies(state, event, "in")
    if policies:
        return Explanation(f"in policy {policies[0].selector.describe()} matches now",
                           policies=policies[:1])
    return Explanation(f"no in policy matches {event.src} -> {event.dst} mark "
                       f"{event.mark or 0:#x}: the packet was IPsec-decapsulated (or the "
                       "default inbound policy is block) and nothing allows it")


def _by_spi(describe: Callable[[SA, XfrmErrorEvent], str]) -> Callable[..., Explanation]:
    def explain(event: XfrmErrorEvent, db: XfrmDatabase, state: NamespaceState) -> Explanation:
        if event.spi is None:
            return Explanation("the packet's SPI could not be read")
        same = _same_sa(event)
        found = [sa for sa in state.sas.values() if same(sa)]
        if not found:
            gone = db.last_removal(event.netns, event.spi, same)
            if gone is not None and gone.sa is not None:
                return Explanation(describe(gone.sa, event) + f" (SA {gone.action} "
                                   f"{_ago(gone, event)})", sas=[gone.sa], history=[gone])
            return Explanation(f"SA spi {event.spi:#x} dst {event.dst} is not in this "
                               "namespace's SAD")
        return Explanation(describe(found[0], event), sas=found[:1])
    return explain


def _proto_error(sa: SA, event: XfrmErrorEvent) -> str:
    algos = ", ".join(f"{a.kind} {a.name}" for a in sa.algorithms) or "no algorithm"
    return (f"SA spi {sa.spi:#x} ({algos}) could not authenticate or decrypt the packet: "
            f"a key that differs from the peer's, or a corrupted packet "
            f"(integrity failures on this SA so far: {sa.integrity_failed})")


def _seq_error(sa: SA, event: XfrmErrorEvent) -> str:
    seq = f"seq {event.seq}" if event.seq is not None else "its sequence number"
    return (f"SA spi {sa.spi:#x}: {seq} is a replay or older than the replay window "
            f"({sa.replay_window} packets{', ESN' if sa.esn else ''}; highest seen "
            f"{sa.seq}; replays counted on this SA: {sa.replay_errors})")


def _mismatch(sa: SA, event: XfrmErrorEvent) -> str:
    arrived = "ESP-in-UDP" if event.encap == "esp-in-udp" else "plain " + (event.proto or "")
    expected = f"encapsulation {sa.encap}" if sa.encap else "no encapsulation"
    return f"SA spi {sa.spi:#x} expects {expected}, the packet arrived as {arrived}"


def _direction(sa: SA, event: XfrmErrorEvent) -> str:
    return f"SA spi {sa.spi:#x} is marked dir {sa.direction}"


def _lifetime(sa: SA, event: XfrmErrorEvent) -> str:
    lft = sa.lifetime
    # Usage is not shown: the kernel reports it only with the SA's last notification.
    limits = [f"{what} {limit}" for what, limit in (
        ("hard packets", lft.hard_packets), ("hard bytes", lft.hard_bytes),
        ("hard seconds since add", lft.hard_add_seconds),
        ("hard seconds since use", lft.hard_use_seconds)) if limit is not None]
    return f"SA spi {sa.spi:#x} lifetime ran out: " + (", ".join(limits) or "no hard limit known")


def _out_state(describe: Callable[[SA, XfrmErrorEvent], str]) -> Callable[..., Explanation]:
    """Output errors name no SPI: the SA is the one the matching policy's template uses."""
    def explain(event: XfrmErrorEvent, db: XfrmDatabase, state: NamespaceState) -> Explanation:
        for policy in matching_policies(state, event, "out"):
            for tmpl in policy.templates:
                for sa in _template_candidates(tmpl, event, state):
                    if not tmpl.reqid or sa.reqid == tmpl.reqid:
                        return Explanation(describe(sa, event), sas=[sa], policies=[policy])
        gone = db.last_change(event.netns, lambda c: c.kind == "sa" and c.action == "expired"
                              and c.sa is not None and _same_addr(c.sa.dst, event.dst))
        if gone is not None and gone.sa is not None:
            return Explanation(describe(gone.sa, event), sas=[gone.sa], history=[gone])
        return Explanation(f"no SA to {event.dst} is known for this flow")
    return explain


def _out_seq(sa: SA, event: XfrmErrorEvent) -> str:
    return (f"SA spi {sa.spi:#x} has used up its sequence numbers (last sent {sa.oseq}"
            f"{', ESN' if sa.esn else ', no ESN'}): it must be rekeyed")


def _queue_full(sa: SA, event: XfrmErrorEvent) -> str:
    limit = (f"at most {sa.iptfs_max_qsize} octets" if sa.iptfs_max_qsize is not None
             else "a limit not known here")
    return (f"SA spi {sa.spi:#x} (mode {sa.mode}) has a full send queue ({limit}, "
            "XFRMA_IPTFS_MAX_QSIZE): packets arrive faster than the SA sends them")


def _hdr_error(event: XfrmErrorEvent, db: XfrmDatabase, state: NamespaceState) -> Explanation:
    size = f"{event.packet_len} bytes" if event.packet_len is not None else "unknown size"
    return Explanation(f"the packet's {(event.proto or 'IPsec').upper()} header could not be "
                       f"read: the packet ({size}) is too short or malformed; no SA lookup "
                       "was possible")


EXPLAINERS: dict[str, Callable[..., Explanation]] = {
    "XfrmInHdrError": _hdr_error,
    "XfrmInNoStates": _in_no_states,
    "XfrmOutNoStates": _out_no_states,
    "XfrmInTmplMismatch": _policy_check("in"),
    "XfrmInPolBlock": _policy_check("in"),
    "XfrmOutPolBlock": _policy_check("out"),
    "XfrmInNoPols": _in_no_pols,
    "XfrmInStateProtoError": _by_spi(_proto_error),
    "XfrmInStateSeqError": _by_spi(_seq_error),
    "XfrmInStateMismatch": _by_spi(_mismatch),
    "XfrmInStateExpired": _by_spi(_lifetime),
    "XfrmInStateDirError": _by_spi(_direction),
    "XfrmOutStateExpired": _out_state(_lifetime),
    "XfrmOutStateSeqError": _out_state(_out_seq),
    "XfrmOutStateDirError": _out_state(_direction),
    "XfrmOutNoQueueSpace": _out_state(_queue_full),
}


def explain(event: XfrmErrorEvent, db: XfrmDatabase) -> Explanation:
    """The explanation for one counter event, as of now."""
    state = db.state(event.netns)
    if state is None:
        return Explanation("this namespace's SAD/SPD is not followed (it has no name in "
                           "/run/netns), so there is nothing to compare with")
    if event.context == "none":
        return Explanation("the increment carried no packet or flow to compare with the "
                           "SAD/SPD")
    explainer = EXPLAINERS.get(event.counter)
    if explainer is None:
        return Explanation(f"no explanation is implemented for {event.counter}; the namespace "
                           f"has {len(state.sas)} SAs and {len(state.policies)} policies")
    return explainer(event, db, state)
