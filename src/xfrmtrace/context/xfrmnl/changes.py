"""What an XFRM notification says happened: one :class:`XfrmChange` per message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from xfrmtrace.context.xfrmnl import messages as m
from xfrmtrace.context.xfrmnl.model import (
    PROTOCOLS,
    REDACT,
    SA,
    KeyPolicy,
    Policy,
    address,
    policy_from,
    sa_from,
)

#: The action of an SA or policy that a dump found (at start, or after lost notifications):
#: the state a log starts from.  Never applied to the database (it was loaded from the dump).
PRESENT = "present"

#: (message type) -> (kind, action)
_ACTIONS = {
    m.XFRM_MSG_NEWSA: ("sa", "added"),
    m.XFRM_MSG_UPDSA: ("sa", "updated"),
    m.XFRM_MSG_DELSA: ("sa", "deleted"),
    m.XFRM_MSG_EXPIRE: ("sa", "expired"),
    m.XFRM_MSG_FLUSHSA: ("sa", "flushed"),
    m.XFRM_MSG_ACQUIRE: ("sa", "acquire"),
    m.XFRM_MSG_MAPPING: ("sa", "mapping"),
    m.XFRM_MSG_NEWPOLICY: ("policy", "added"),
    m.XFRM_MSG_UPDPOLICY: ("policy", "updated"),
    m.XFRM_MSG_DELPOLICY: ("policy", "deleted"),
    m.XFRM_MSG_POLEXPIRE: ("policy", "expired"),
    m.XFRM_MSG_FLUSHPOLICY: ("policy", "flushed"),
}


@dataclass
class XfrmChange:
    """A change to one namespace's SAD or SPD, on the same clock as counter events."""

    kind: str  # "sa", "policy" or "tc"
    action: str  # added, updated, deleted, expired, flushed, acquire, mapping
    netns: int
    monotonic_ns: int
    time_ns: int = 0
    netns_name: Optional[str] = None
    sa: Optional[SA] = None
    policy: Optional[Policy] = None
    hard: Optional[bool] = None  # expired: hard (removed) or soft (rekey due)
    flushed_proto: Optional[str] = None  # flushed SAs: "esp", "ah" ... or None for all
    detail: Optional[dict[str, Any]] = None  # acquire / mapping / tc specifics


def change_from(msg: Any, netns: int, monotonic_ns: int,
                keys: KeyPolicy = REDACT) -> Optional[XfrmChange]:
    """The change a decoded message reports; None for message types we do not follow."""
    kind_action = _ACTIONS.get(msg["header"]["type"])
    if kind_action is None:
        return None
    kind, action = kind_action
    change = XfrmChange(kind=kind, action=action, netns=netns, monotonic_ns=monotonic_ns)
    attrs = m.attributes(msg)
    mtype = msg["header"]["type"]
    if mtype in (m.XFRM_MSG_NEWSA, m.XFRM_MSG_UPDSA):
        change.sa = sa_from(msg, attrs, keys)
    elif mtype == m.XFRM_MSG_DELSA:
        inner = attrs.get("XFRMA_SA")
        if inner is None:
            raise ValueError("XFRM_MSG_DELSA without XFRMA_SA")
        change.sa = sa_from(inner, attrs, keys)
    elif mtype == m.XFRM_MSG_EXPIRE:
        change.sa = sa_from(msg, attrs, keys)
        change.hard = bool(msg["hard"])
    elif mtype == m.XFRM_MSG_FLUSHSA:
        change.flushed_proto = PROTOCOLS.get(msg["proto"]) if msg["proto"] else None
    elif mtype in (m.XFRM_MSG_NEWPOLICY, m.XFRM_MSG_UPDPOLICY):
        change.policy = policy_from(msg, attrs)
    elif mtype == m.XFRM_MSG_DELPOLICY:
        inner = attrs.get("XFRMA_POLICY")
        if inner is None:
            raise ValueError("XFRM_MSG_DELPOLICY without XFRMA_POLICY")
        change.policy = policy_from(inner, attrs)
    elif mtype == m.XFRM_MSG_POLEXPIRE:
        change.policy = policy_from(msg, attrs)
        change.hard = bool(msg["hard"])
    elif mtype == m.XFRM_MSG_ACQUIRE:
        change.policy = policy_from(msg, attrs, prefix="pol_")
        family = msg["sel_family"]
        change.detail = {
            "src": address(msg["saddr"], family), "dst": address(msg["id_daddr"], family),
            "proto": PROTOCOLS.get(msg["id_proto"], str(msg["id_proto"])),
        }
    elif mtype == m.XFRM_MSG_MAPPING:
        family = msg["id_family"]
        change.detail = {
            "dst": address(msg["id_daddr"], family), "spi": msg["id_spi"],
            "old": f"{address(msg['old_saddr'], family)}:{msg['old_sport']}",
            "new": f"{address(msg['new_saddr'], family)}:{msg['new_sport']}",
        }
    return change
