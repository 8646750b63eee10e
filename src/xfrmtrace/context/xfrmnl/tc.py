"""Traffic-control changes (RTNLGRP_TC): qdiscs, classes and filters added or deleted.

CNIs such as Cilium steer IPsec traffic with tc BPF programs; a filter replaced or removed
at the wrong moment is a classic cause of packets leaving without the mark their policy
needs.  These changes go on the same timeline as the SA/policy changes.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Optional

from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_DELTCLASS,
    RTM_DELTFILTER,
    RTM_NEWQDISC,
    RTM_NEWTCLASS,
    RTM_NEWTFILTER,
    RTNLGRP_TC,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from xfrmtrace.context.xfrmnl.changes import XfrmChange
from xfrmtrace.context.xfrmnl.socket import NetlinkSubscriber, decode_attributes, split_messages

log = logging.getLogger("xfrmtrace.context.xfrmnl")

#: message type -> (what changed, action)
TC_MESSAGES = {
    RTM_NEWQDISC: ("qdisc", "added"), RTM_DELQDISC: ("qdisc", "deleted"),
    RTM_NEWTCLASS: ("class", "added"), RTM_DELTCLASS: ("class", "deleted"),
    RTM_NEWTFILTER: ("filter", "added"), RTM_DELTFILTER: ("filter", "deleted"),
}


def _handle(value: int) -> str:
    """tc's ``major:minor`` notation."""
    return f"{value >> 16:x}:{value & 0xFFFF:x}"


def tc_change_from(msg: Any, netns: int, monotonic_ns: int) -> Optional[XfrmChange]:
    what_action = TC_MESSAGES.get(msg["header"]["type"])
    if what_action is None:
        return None
    what, action = what_action
    kind = msg.get_attr("TCA_KIND")
    if isinstance(kind, bytes):  # pyroute2 leaves a name that is not UTF-8 as bytes
        kind = kind.decode("utf-8", "replace")
    detail: dict[str, Any] = {
        "object": what,
        "ifindex": msg["index"],
        "kind": kind,
        "parent": _handle(msg["parent"]),
        "handle": _handle(msg["handle"]),
    }
    if what == "filter":
        detail["priority"] = msg["info"] >> 16
        detail["protocol"] = socket.ntohs(msg["info"] & 0xFFFF)
    return XfrmChange(kind="tc", action=action, netns=netns, monotonic_ns=monotonic_ns,
                      detail=detail)


def parse_tc(data: bytes) -> list[Any]:
    marshal = MarshalRtnl()
    messages = []
    for mtype, raw in split_messages(data):
        if mtype not in TC_MESSAGES:
            continue
        try:
            for msg in marshal.parse(raw):
                decode_attributes(msg, ("TCA_KIND",))  # the one tc_change_from reads
                messages.append(msg)
        except Exception as err:  # noqa: BLE001 - one odd message must not stop the trace
            log.warning("netlink: cannot decode tc message type %d: %s", mtype, err)
    return messages


class TcSocket(NetlinkSubscriber):
    """NETLINK_ROUTE in one namespace, joined to the tc group only."""

    def __init__(self, netns_path: Optional[str] = None) -> None:
        super().__init__(socket.NETLINK_ROUTE, netns_path, groups=1 << (RTNLGRP_TC - 1))

    def receive(self) -> list[Any]:
        return [msg for chunk in self.receive_raw() for msg in parse_tc(chunk)]
