"""Turn ring-buffer records (``struct xt_event``) into ``XfrmErrorEvent`` values for the outputs.

The decoder owns every lookup an output needs (site, counter name, wall-clock time, netns
name, stack symbols), so outputs only format.  Byte order: the BPF program copies
``skb->protocol``, the flowi ports and the flowi SPI as the kernel stores them (network byte
order) into fields that ctypes reads in host order; ``_be`` undoes that.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from xfrmtrace.bpf import abi
from xfrmtrace.decode.packet import (
    ICMP_PROTOCOLS,
    IPPROTO_AH,
    IPPROTO_COMP,
    IPPROTO_ESP,
    PORT_PROTOCOLS,
    PacketInfo,
    decode_packet,
    protocol_name,
)
from xfrmtrace.errors import DecodeError
from xfrmtrace.kernel.kallsyms import code_location
from xfrmtrace.resolve.model import Site

AF_INET = 2
AF_INET6 = 10

CONTEXT_NAMES: Dict[int, str] = {
    abi.XtContext.NONE: "none",
    abi.XtContext.SKB: "skb",
    abi.XtContext.FLOW: "flow",
}

CONTEXT_NOTES: Dict[int, str] = {
    abi.XtContextNote.NO_ARGS: "function has no skb/flowi argument",
    abi.XtContextNote.DEPTH_UNKNOWN: "stack depth at the site is unknown",
    abi.XtContextNote.FRAME_MISSING: "entry of the function was not seen",
    abi.XtContextNote.READ_FAILED: "kernel memory read failed",
}
"""``enum xt_context_note`` -> the text outputs show as ``context_note``."""

NOTE_NO_CONTEXT = "no packet or flow could be found"
NOTE_FROM_DATA = "packet copied from skb->data: no network header set"
NOTE_FLOW_FAMILY = "flow address family unknown"

_ENCAP_BY_PROTO = {IPPROTO_ESP: "esp", IPPROTO_AH: "ah", IPPROTO_COMP: "ipcomp"}

# "func+0x12", "func+0x12/0x340", optionally followed by " [module]".
_SYMBOL_RE = re.compile(
    r"^(?P<function>[^\s+]+)\+0x(?P<offset>[0-9a-fA-F]+)(?:/0x[0-9a-fA-F]+)?"
    r"(?:\s+\[(?P<object>[^\]]+)\])?$"
)


@dataclass
class XfrmErrorEvent:
    """One XFRM error counter increment, with everything the outputs report."""

    time_ns: int = 0  # wall clock, ns since the Unix epoch
    monotonic_ns: int = 0  # CLOCK_MONOTONIC as recorded by the BPF program
    counter: str = ""  # /proc/net/xfrm_stat name, e.g. "XfrmInNoStates"
    counter_index: int = 0  # LINUX_MIB_XFRM* value
    site_id: int = 0
    object: str = "vmlinux"  # "vmlinux" or the module holding the site
    function: str = ""
    offset: int = 0  # bytes from the function's start
    address: int = 0
    netns: int = 0  # inode of the network namespace, 0 unknown
    netns_name: Optional[str] = None
    netns_verified: bool = False
    netns_source: str = "unknown"  # how the BPF program found the netns (enum xt_netns_source)
    cpu: int = 0
    pid: int = 0  # thread id, as the kernel's task pid
    tgid: int = 0  # process id
    comm: str = ""
    context: str = "none"  # "skb", "flow" or "none"
    context_note: Optional[str] = None  # why context is missing or partial
    mark: Optional[int] = None
    ifindex: Optional[int] = None
    ifname: Optional[str] = None
    family: Optional[str] = None  # "ipv4" or "ipv6"
    src: Optional[str] = None
    dst: Optional[str] = None
    proto: Optional[str] = None  # protocol name ("esp", "udp", ...)
    proto_num: Optional[int] = None
    spi: Optional[int] = None
    seq: Optional[int] = None
    encap: Optional[str] = None  # "esp", "esp-in-udp", "ah", "ipcomp"
    sport: Optional[int] = None
    dport: Optional[int] = None
    icmp_type: Optional[int] = None
    icmp_code: Optional[int] = None
    fragment_offset: Optional[int] = None
    skb_len: Optional[int] = None  # skb->len
    packet_len: Optional[int] = None  # bytes of the packet carried in the event
    truncated: bool = False
    malformed: Optional[str] = None
    stack: Optional[List[str]] = None  # symbolized kernel stack, innermost first
    packet: bytes = b""  # the copied bytes, from the L3 header on (for pcap outputs)
    mib_ptr: int = 0
    # xfrmtrace.context.explain.Explanation, when the SAD/SPD is followed
    explain: Optional[Any] = None

    @property
    def site_label(self) -> str:
        """``function+0xoff``, with ``[module]`` for module sites, as in ``Site.label``."""
        return code_location(self.function, self.offset, self.object)


#: What an skb event takes from its decoded packet: every PacketInfo field, by name.
PACKET_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PacketInfo))


class EventDecoder:
    """Decodes raw ``struct xt_event`` records; one instance per tracing session."""

    def __init__(
        self,
        sites: Mapping[int, Site],
        counter_names: Mapping[int, str],
        clock: Callable[[int], int],
        netns_name: Callable[[int], Optional[str]],
        symbolize: Callable[[int], str],
    ) -> None:
        """``sites`` by site_id; ``counter_names`` by LINUX_MIB_XFRM* value; ``clock`` maps
        CLOCK_MONOTONIC ns to wall-clock ns since the epoch; ``netns_name`` maps a netns inode
        to its name (or None); ``symbolize`` maps a kernel address to ``func+0x12 [module]``."""
        self.sites = sites
        self.counter_names = counter_names
        self.clock = clock
        self.netns_name = netns_name
        self.symbolize = symbolize

    def decode(self, raw: Union[bytes, bytearray, memoryview]) -> XfrmErrorEvent:
        """Decode one ring-buffer record; raises DecodeError when it is too short."""
        if len(raw) < abi.EVENT_SIZE:
            raise DecodeError(
                f"ring-buffer record of {len(raw)} bytes is shorter than struct xt_event "
                f"({abi.EVENT_SIZE} bytes): the BPF object does not match this xfrmtrace, "
                "rebuild it with `make bpf`"
            )
        raw_event = abi.XtEvent.from_buffer_copy(bytes(raw[:abi.EVENT_SIZE]))
        event = self._common(raw_event)
        if raw_event.context == abi.XtContext.SKB:
            _fill_skb(event, raw_event)
        elif raw_event.context == abi.XtContext.FLOW:
            _fill_flow(event, raw_event)
        if event.context_note is None and event.context == "none":
            event.context_note = NOTE_NO_CONTEXT
        return event

    def _common(self, raw: abi.XtEvent) -> XfrmErrorEvent:
        event = XfrmErrorEvent(
            time_ns=self.clock(raw.time_ns),
            monotonic_ns=raw.time_ns,
            counter_index=raw.counter,
            site_id=raw.site_id,
            address=raw.site_addr,
            netns=raw.netns,
            netns_name=self.netns_name(raw.netns) if raw.netns else None,
            netns_verified=bool(raw.flags & abi.XT_F_NETNS_VERIFIED),
            netns_source=_enum_name(abi.XtNetnsSource, raw.netns_source),
            cpu=raw.cpu,
            pid=raw.pid,
            tgid=raw.tgid,
            comm=_text(raw.comm),
            context=CONTEXT_NAMES.get(raw.context, f"context#{raw.context}"),
            context_note=_context_note(raw.context_note),
            mib_ptr=raw.mib_ptr,
        )
        self._locate(event, raw)
        if raw.flags & abi.XT_F_HAS_STACK:
            event.stack = self._stack(raw)
        return event

    def _locate(self, event: XfrmErrorEvent, raw: abi.XtEvent) -> None:
        """Site and counter names: from the registered site, else from symbols and BTF."""
        site = self.sites.get(raw.site_id)
        if site is not None and site.address == raw.site_addr:
            event.object, event.function, event.offset = site.object, site.function, site.offset
        else:
            event.object, event.function, event.offset = _parse_symbol(
                self.symbolize(raw.site_addr), raw.site_addr)
        if site is not None and site.counter_index == raw.counter:
            event.counter = site.counter
        else:
            event.counter = self.counter_names.get(raw.counter, f"counter#{raw.counter}")

    def _stack(self, raw: abi.XtEvent) -> List[str]:
        frames = min(raw.stack_len // 8, abi.XT_MAX_STACK)
        addrs = [addr for addr in raw.stack[:frames] if addr]
        # A kprobe's saved ip points just past its int3: show the probed instruction itself.
        if addrs and addrs[0] == raw.site_addr + 1:
            addrs[0] = raw.site_addr
        return [self.symbolize(addr) for addr in addrs]


def _fill_skb(event: XfrmErrorEvent, raw: abi.XtEvent) -> None:
    """Packet fields from the skb part of the record."""
    packet = bytes(raw.pkt[:min(raw.pkt_len, abi.XT_PKT_BYTES)])
    ethertype = _be(raw.skb_protocol, 2)
    info = decode_packet(packet, ethertype or None)
    event.mark = raw.mark
    event.ifindex = raw.ifindex or None
    event.ifname = _text(raw.ifname) or None
    event.skb_len, event.packet_len, event.packet = raw.skb_len, len(packet), packet
    for name in PACKET_FIELDS:
        setattr(event, name, getattr(info, name))
    event.truncated = info.truncated or bool(raw.flags & abi.XT_F_PKT_TRUNCATED)
    if raw.flags & abi.XT_F_PKT_FROM_DATA and event.context_note is None:
        event.context_note = NOTE_FROM_DATA


def _fill_flow(event: XfrmErrorEvent, raw: abi.XtEvent) -> None:
    """Flow fields from the ``struct flowi`` part of the record."""
    event.mark = raw.flow_mark
    event.ifindex = raw.flow_oif or None
    if raw.flow_family == AF_INET:
        event.family = "ipv4"
        event.src = str(IPv4Address(bytes(raw.flow_saddr[:4])))
        event.dst = str(IPv4Address(bytes(raw.flow_daddr[:4])))
    elif raw.flow_family == AF_INET6:
        event.family = "ipv6"
        event.src = str(IPv6Address(bytes(raw.flow_saddr)))
        event.dst = str(IPv6Address(bytes(raw.flow_daddr)))
    elif event.context_note is None:
        event.context_note = NOTE_FLOW_FAMILY
    proto = raw.flow_proto
    if not proto:
        return  # flowi_proto 0 means "any protocol", not IPv6 hop-by-hop
    event.proto, event.proto_num = protocol_name(proto), proto
    if proto in PORT_PROTOCOLS:
        event.sport, event.dport = _be(raw.flow_sport, 2), _be(raw.flow_dport, 2)
    elif proto in ICMP_PROTOCOLS:
        # struct flowi_uli overlays icmpt.type and icmpt.code on the bytes of ports.dport.
        event.icmp_type, event.icmp_code = _memory(raw.flow_dport, 2)
    elif proto in _ENCAP_BY_PROTO:
        event.encap, event.spi = _ENCAP_BY_PROTO[proto], _be(raw.flow_spi, 4)


def _memory(value: int, size: int) -> bytes:
    """The bytes of a native integer field as they lie in memory."""
    return value.to_bytes(size, sys.byteorder)


def _be(value: int, size: int) -> int:
    """A network-byte-order field that ctypes read in host order, as its numeric value."""
    return int.from_bytes(_memory(value, size), "big")


def _text(raw: bytes) -> str:
    # comm and ifname are arbitrary bytes to the kernel; outputs need text.
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _context_note(note: int) -> Optional[str]:
    if note == abi.XtContextNote.OK:
        return None
    return CONTEXT_NOTES.get(note, f"context note {note}")


def _enum_name(enum: type, value: int) -> str:
    try:
        return enum(value).name.lower()  # type: ignore[no-any-return]
    except ValueError:
        return str(value)


def _parse_symbol(text: str, address: int) -> Tuple[str, str, int]:
    """(object, function, offset) from ``func+0x12 [module]``; the address when unparsable."""
    match = _SYMBOL_RE.match(text.strip())
    if match is None:
        return "vmlinux", text.strip() or f"{address:#x}", 0
    return match["object"] or "vmlinux", match["function"], int(match["offset"], 16)
