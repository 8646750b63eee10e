"""JSON Lines output: one object per counter increment, keys always in the same order.

Every key is present in every object (``null`` when unknown), except ``stack``, which appears
only when stacks were captured.  The keys, in order:

"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional

from xfrmtrace.decode.events import XfrmErrorEvent
from xfrmtrace.output.changes import explanation_to_dict
from xfrmtrace.output.safetext import json_line
from xfrmtrace.output.timefmt import rfc3339_ns

EVENT_TYPE = "xfrm_error"


class JsonField(NamedTuple):
    """One key of the JSON object: its name, JSON type and meaning."""

    name: str
    type: str
    description: str


JSON_FIELDS: List[JsonField] = [
    JsonField("time", "string", "Wall-clock time of the increment, RFC 3339 in UTC with "
              "nanoseconds: `2026-11-28T14:47:49.123456789Z`."),
    JsonField("type", "string", 'Always `"xfrm_error"`.'),
    JsonField("node", "string or null", "Name of the node the tool ran on (`--node-name`, "
              "default the host name; the chart passes the Kubernetes node name), in every "
              "JSON object, so `xfrmtrace report` can join several nodes' logs."),
    JsonField("counter", "string", "Counter as named in `/proc/net/xfrm_stat`, e.g. "
              "`XfrmInNoStates`."),
    JsonField("counter_index", "integer", "The counter's `LINUX_MIB_XFRM*` enum value."),
    JsonField("object", "string", '`"vmlinux"` or the kernel module holding the site.'),
    JsonField("function", "string", "Kernel function containing the incrementing instruction."),
    JsonField("offset", "integer", "Byte offset of the instruction in `function`."),
    JsonField("address", "integer", "Kernel address of the instruction."),
    JsonField("netns", "integer", "Inode number of the network namespace; 0 when unknown."),
    JsonField("netns_name", "string or null", "Name of the namespace (`ip netns`), if it has "
              "one."),
    JsonField("netns_verified", "boolean", "True when the namespace was confirmed by matching "
              "its statistics pointer, false when it is the best guess."),
    JsonField("cpu", "integer", "CPU the increment happened on."),
    JsonField("pid", "integer", "Thread id of the task running at the time (kernel pid); may "
              "be unrelated to the packet, e.g. in softirq."),
    JsonField("tgid", "integer", "Process id (thread group id) of that task."),
    JsonField("comm", "string", "Command name of that task."),
    JsonField("context", "string", '`"skb"`: fields below come from the packet; `"flow"`: from '
              'the routing flow (`struct flowi`); `"none"`: no packet fields.'),
    JsonField("context_note", "string or null", "Why packet fields are missing or partial, "
              'e.g. `"function has no skb/flowi argument"`.'),
    JsonField("mark", "integer or null", "`skb->mark`, or the flow's mark."),
    JsonField("ifindex", "integer or null", "Interface of the packet; for flows the output "
              "interface (`flowi_oif`). Null when there is none."),
    JsonField("ifname", "string or null", "Name of that interface, when the kernel had it."),
    JsonField("family", "string or null", '`"ipv4"` or `"ipv6"`.'),
    JsonField("src", "string or null", "Source address."),
    JsonField("dst", "string or null", "Destination address."),
    JsonField("proto", "string or null", 'Innermost protocol reached: `"esp"`, `"udp"`, '
              '`"ipv6-icmp"`, ... (past IPv6 extension headers and AH), or the number as '
              "text when it has no name. ESP-in-UDP reports `\"udp\"`."),
    JsonField("proto_num", "integer or null", "The same as an IP protocol number."),
    JsonField("spi", "integer or null", "SPI of the outermost ESP or AH header (IPComp: CPI)."),
    JsonField("seq", "integer or null", "Sequence number of that ESP or AH header."),
    JsonField("encap", "string or null", '`"esp"`, `"esp-in-udp"` (RFC 3948), `"ah"` or '
              '`"ipcomp"`; null for packets without IPsec headers.'),
    JsonField("sport", "integer or null", "Source port (TCP, UDP, SCTP, DCCP, UDP-Lite); "
              "ports inside ESP are encrypted and not reported."),
    JsonField("dport", "integer or null", "Destination port."),
    JsonField("icmp_type", "integer or null", "ICMP or ICMPv6 type."),
    JsonField("icmp_code", "integer or null", "ICMP or ICMPv6 code."),
    JsonField("fragment_offset", "integer or null", "For IP fragments, the offset in bytes "
              "(0 for the first fragment); only first fragments carry ports."),
    JsonField("skb_len", "integer or null", "`skb->len` (skb context only)."),
    JsonField("packet_len", "integer or null", "Bytes of the packet, from the IP header on, "
              "carried in the event (skb context only; at most 256)."),
    JsonField("truncated", "boolean", "True when the carried bytes are shorter than the packet "
              "or ended before a header the decoder needed."),
    JsonField("malformed", "string or null", "Why the packet's own headers are inconsistent."),
    JsonField("stack", "list of strings", "Kernel stack, innermost frame first, as "
              "`func+0x12 [module]`. Only present when stacks are captured."),
    JsonField("explain", "object", "Why the counter moved, from the namespace's SAD/SPD at "
              "that moment: `summary` (one line), `details` (lines), the `sas` and `policies` "
              "involved (keys `<redacted>`), and the `history` of changes that led there. "
              "Absent with `--no-xfrm-state`."),
]
"""The keys of each JSON object, in output order."""


def format_event(event: XfrmErrorEvent, node: Optional[str] = None) -> str:
    """The event as one line of JSON (no trailing newline), safe to print (safetext)."""
    return json_line(event_to_dict(event, node))


def event_to_dict(event: XfrmErrorEvent, node: Optional[str] = None) -> Dict[str, Any]:
    """The JSON object of an event, keys in ``JSON_FIELDS`` order."""
    record: Dict[str, Any] = {}
    for field in JSON_FIELDS:
        if (field.name == "stack" and event.stack is None) or (
                field.name == "explain" and event.explain is None):
            continue
        if field.name == "node":
            record["node"] = node
            continue
        getter = _SPECIAL.get(field.name)
        record[field.name] = getter(event) if getter else getattr(event, field.name)
    return record


def json_fields_markdown() -> str:
    """The key reference as a Markdown table, for the README."""
    rows = ["| Key | Type | Meaning |", "| --- | --- | --- |"]
    rows += [f"| `{f.name}` | {f.type} | {f.description} |" for f in JSON_FIELDS]
    return "\n".join(rows) + "\n"


_SPECIAL: Dict[str, Callable[[XfrmErrorEvent], Any]] = {
    "time": lambda event: rfc3339_ns(event.time_ns),
    "type": lambda event: EVENT_TYPE,
    "stack": lambda event: list(event.stack or []),
    "explain": lambda event: _explanation(event.explain),
}


def _explanation(exp: Any) -> Any:
    return explanation_to_dict(exp)

__doc__ = (__doc__ or "") + json_fields_markdown()
