"""Human-readable output: one line per counter increment, stack frames indented below.

Example::

    2026-11-28 14:47:49.123456 netns=4026532285(blue) XfrmInNoStates++ xfrm_input+0x123 \
mark=0xd00 if=2(eth0) IPv4=192.168.112.29>192.168.139.255 ESP=spi:0x3,seq:3

Fields that are absent are left out, never printed as "None"; a zero mark is left out too, as
it is the default of every packet.  Every line goes through
:func:`~xfrmtrace.output.safetext.printable`: interface and namespace names are chosen by
whoever runs a pod.
"""

from __future__ import annotations

from typing import List, Optional

from xfrmtrace.decode.events import XfrmErrorEvent
from xfrmtrace.output.safetext import printable
from xfrmtrace.output.timefmt import format_time

STACK_INDENT = "    "
WHY_INDENT = "    why: "
MORE_INDENT = "         "

_FAMILY_LABELS = {"ipv4": "IPv4", "ipv6": "IPv6"}
_ICMP_LABELS = {"icmp": "ICMP", "ipv6-icmp": "ICMPv6"}


def format_event(event: XfrmErrorEvent, *, utc: bool = False) -> str:
    """The event as one line (plus one indented line per stack frame, when captured).

    Times are local unless ``utc``; microseconds are enough to order events by eye.
    """
    parts = [
        format_time(event.time_ns, utc=utc),
        _netns(event),
        f"{event.counter}++",
        event.site_label,
    ]
    if event.context == "skb":
        parts += _skb(event)
    elif event.context == "flow":
        parts += _flow(event)
    else:
        parts.append(f"(no packet: {event.context_note or 'unknown reason'})")
    lines = [" ".join(part for part in parts if part)]
    lines += [STACK_INDENT + frame for frame in event.stack or []]
    if event.explain is not None:
        lines.append(WHY_INDENT + event.explain.summary)
        lines += [MORE_INDENT + detail for detail in event.explain.details]
    return "\n".join(printable(line) for line in lines)


def _netns(event: XfrmErrorEvent) -> str:
    if not event.netns:
        return ""
    name = f"({event.netns_name})" if event.netns_name else ""
    return f"netns={event.netns}{name}"


def _skb(event: XfrmErrorEvent) -> List[str]:
    parts = [_mark(event.mark), _interface("if", event.ifindex, event.ifname)]
    parts += _addresses(event) + _headers(event)
    if event.fragment_offset is not None:
        parts.append(f"frag={event.fragment_offset}")
    parts += _verdicts(event)
    return parts


def _flow(event: XfrmErrorEvent) -> List[str]:
    parts = ["flow:"] + _addresses(event)
    if event.proto:
        parts.append(f"proto={event.proto}")
    if event.sport is not None and event.dport is not None:
        parts.append(f"ports={event.sport}>{event.dport}")
    if event.icmp_type is not None:
        parts.append(f"type={event.icmp_type}")
    if event.icmp_code is not None:
        parts.append(f"code={event.icmp_code}")
    if event.spi is not None:
        parts.append(f"spi={event.spi:#x}")
    parts += [_interface("oif", event.ifindex, event.ifname), _mark(event.mark)]
    if event.context_note:
        parts.append(f"({event.context_note})")
    return parts


def _mark(mark: Optional[int]) -> str:
    return f"mark={mark:#x}" if mark else ""


def _interface(label: str, ifindex: Optional[int], ifname: Optional[str]) -> str:
    if ifindex is None:
        return f"{label}={ifname}" if ifname else ""
    return f"{label}={ifindex}({ifname})" if ifname else f"{label}={ifindex}"


def _addresses(event: XfrmErrorEvent) -> List[str]:
    label = _FAMILY_LABELS.get(event.family or "")
    if label is None:
        return []
    if event.src is None or event.dst is None:
        return [label]
    return [f"{label}={event.src}>{event.dst}"]


def _headers(event: XfrmErrorEvent) -> List[str]:
    """Transport and IPsec headers, outermost first: ``UDP=4500>4500 ESP=spi:0x3,seq:3``."""
    parts: List[str] = []
    ipsec = _ipsec(event)
    if event.encap == "ah":
        parts.append(ipsec)  # AH sits before the header it protects
    shown = event.encap in ("esp", "ipcomp")
    if event.sport is not None and event.dport is not None:
        parts.append(f"{(event.proto or 'ports').upper()}={event.sport}>{event.dport}")
        shown = True
    elif event.icmp_type is not None or event.icmp_code is not None:
        label = _ICMP_LABELS.get(event.proto or "", "ICMP")
        parts.append(f"{label}={_pairs(type=event.icmp_type, code=event.icmp_code)}")
        shown = True
    if event.encap in ("esp", "esp-in-udp", "ipcomp"):
        parts.append(ipsec)
    if not shown and event.proto and (event.encap != "ah" or event.proto != "ah"):
        parts.append(f"proto={event.proto}")
    return parts


def _ipsec(event: XfrmErrorEvent) -> str:
    if event.encap == "ipcomp":
        return f"IPComp=cpi:{event.spi:#x}" if event.spi is not None else "IPComp"
    label = "AH" if event.encap == "ah" else "ESP"
    spi = None if event.spi is None else f"{event.spi:#x}"
    fields = _pairs(spi=spi, seq=event.seq)
    return f"{label}={fields}" if fields else label


def _pairs(**values: object) -> str:
    """``spi:0x3,seq:3`` from the values that are present."""
    return ",".join(f"{key}:{value}" for key, value in values.items() if value is not None)


def _verdicts(event: XfrmErrorEvent) -> List[str]:
    parts = []
    if event.truncated:
        parts.append("[truncated]")
    if event.malformed:
        parts.append(f"[malformed: {event.malformed}]")
    if event.context_note:
        parts.append(f"({event.context_note})")
    return parts
