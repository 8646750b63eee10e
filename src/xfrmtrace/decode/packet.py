"""Pure decoders for the packet bytes carried by an event (IPv4/IPv6 and the IPsec headers).

The BPF program copies at most ``XT_PKT_BYTES`` bytes starting at the L3 header, so decoding
stops early on long IPv6 extension-header chains, and kernel paths may hand us bytes that are
not a valid IP packet at all.  The decoder therefore never raises: it fills in what it could
read, sets ``truncated`` when the captured bytes ended before a header it needed, and
``malformed`` when the packet contradicts itself (the packet's own lengths, not the capture,
rule it out).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_DSTOPTS = 60
IPPROTO_COMP = 108
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

NAT_T_PORT = 4500  # RFC 3948 UDP encapsulation of ESP
NAT_KEEPALIVE = b"\xff"  # RFC 3948 section 2.3
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 section 2.2: IKE shares port 4500

# Keywords as in the IANA registry / Linux IPPROTO_* names, lower case.
PROTOCOL_NAMES: Dict[int, str] = {
    IPPROTO_HOPOPTS: "hopopt",
    IPPROTO_ICMP: "icmp",
    2: "igmp",
    4: "ipip",
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    IPPROTO_DCCP: "dccp",
    41: "ipv6",
    IPPROTO_ROUTING: "ipv6-route",
    IPPROTO_FRAGMENT: "ipv6-frag",
    47: "gre",
    IPPROTO_ESP: "esp",
    IPPROTO_AH: "ah",
    IPPROTO_ICMPV6: "ipv6-icmp",
    59: "ipv6-nonxt",
    IPPROTO_DSTOPTS: "ipv6-opts",
    89: "ospf",
    94: "beetph",
    103: "pim",
    IPPROTO_COMP: "ipcomp",
    112: "vrrp",
    115: "l2tp",
    IPPROTO_SCTP: "sctp",
    IPPROTO_UDPLITE: "udplite",
    137: "mpls-in-ip",
    143: "ethernet",
    262: "mptcp",
}
"""IP protocol number -> name used in every output."""

# Extension headers walked to reach the upper-layer protocol (AH is walked too, on both
# families, see _walk_headers).
IPV6_EXTENSION_HEADERS = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT,
                                    IPPROTO_DSTOPTS})

PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP,
                            IPPROTO_UDPLITE})
"""Protocols whose header starts with 16-bit source and destination ports."""

ICMP_PROTOCOLS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6})


def protocol_name(proto: int) -> str:
    """``"esp"``, ``"udp"``, ... for known IP protocol numbers, else the number as text."""
    return PROTOCOL_NAMES.get(proto, str(proto))


@dataclass
class PacketInfo:
    """What could be read from a packet; fields that could not be read stay None.

    Every field is also a field of :class:`~xfrmtrace.decode.events.XfrmErrorEvent`, with the
    same name and meaning: the decoder copies them over by name."""

    family: Optional[str] = None  # "ipv4" or "ipv6"
    src: Optional[str] = None
    dst: Optional[str] = None
    proto: Optional[str] = None  # name of proto_num ("esp", "udp", ...)
    proto_num: Optional[int] = None  # innermost header reached, past IPv6 ext. headers and AH
    spi: Optional[int] = None  # of the outermost IPsec header: ESP/AH SPI, IPComp CPI
    seq: Optional[int] = None
    encap: Optional[str] = None  # "esp", "esp-in-udp", "ah", "ipcomp"
    sport: Optional[int] = None
    dport: Optional[int] = None
    icmp_type: Optional[int] = None
    icmp_code: Optional[int] = None
    fragment_offset: Optional[int] = None  # bytes; set only for fragments (0: first fragment)
    truncated: bool = False  # the captured bytes ended before a header we needed
    malformed: Optional[str] = None  # why the packet cannot be what it claims to be


class _Cursor:
    """Bounds for reading one packet: what was captured and what the packet says it holds."""

    def __init__(self, data: bytes, info: PacketInfo, limit: Optional[int] = None) -> None:
        self.data = data
        self.info = info
        self.limit = limit  # end of the packet by its own length fields; None: unknown

    def have(self, start: int, size: int, what: str) -> bool:
        """True when ``data[start:start + size]`` is there; otherwise record why it is not."""
        end = start + size
        if self.limit is not None and end > self.limit:
            self.info.malformed = f"{what} extends past the end of the packet"
            return False
        if end > len(self.data):
            self.info.truncated = True
            return False
        return True

    def u8(self, at: int) -> int:
        return self.data[at]

    def u16(self, at: int) -> int:
        return int.from_bytes(self.data[at:at + 2], "big")

    def u32(self, at: int) -> int:
        return int.from_bytes(self.data[at:at + 4], "big")


def decode_packet(data: Union[bytes, bytearray, memoryview],
                  skb_protocol: Optional[int] = None) -> PacketInfo:
    """Decode an IPv4 or IPv6 packet starting at its L3 header; never raises.

    ``skb_protocol`` is the ethertype in host byte order when known (``skb->protocol``).  The
    version nibble decides between IPv4 and IPv6, because the bytes are what the kernel will
    parse; a known non-IP ethertype stops decoding.
    """
    data = bytes(data)
    info = PacketInfo()
    if skb_protocol not in (None, 0, ETH_P_IP, ETH_P_IPV6):
        info.malformed = f"not an IP packet (ethertype {skb_protocol:#06x})"
        return info
    if not data:
        info.family = {ETH_P_IP: "ipv4", ETH_P_IPV6: "ipv6"}.get(skb_protocol or 0)
        info.truncated = True
        return info
    version = data[0] >> 4
    if version == 4:
        _decode_ipv4(data, info)
    elif version == 6:
        _decode_ipv6(data, info)
    else:
        info.malformed = f"IP version {version} is neither 4 nor 6"
    return info


def _set_proto(info: PacketInfo, proto: int) -> None:
    info.proto_num = proto
    info.proto = protocol_name(proto)


def _decode_ipv4(data: bytes, info: PacketInfo) -> None:
    info.family = "ipv4"
    if len(data) < 20:
        info.truncated = True
        return
    info.src = str(ipaddress.IPv4Address(data[12:16]))
    info.dst = str(ipaddress.IPv4Address(data[16:20]))
    _set_proto(info, data[9])
    header_len = (data[0] & 0x0F) * 4
    total_len = int.from_bytes(data[2:4], "big")
    if header_len < 20:
        info.malformed = f"IPv4 header length {header_len} is below 20"
        return
    # A zero total length is legal for TSO/BIG TCP packets: the length is then unknown.
    if total_len and total_len < header_len:
        info.malformed = f"IPv4 total length {total_len} is below the header length {header_len}"
        return
    frag = int.from_bytes(data[6:8], "big")
    offset, more_fragments = (frag & 0x1FFF) * 8, bool(frag & 0x2000)
    if offset or more_fragments:
        info.fragment_offset = offset
    if offset:
        return  # only the first fragment carries the L4 header
    _walk_headers(_Cursor(data, info, total_len or None), header_len, data[9], ipv6=False)


def _decode_ipv6(data: bytes, info: PacketInfo) -> None:
    info.family = "ipv6"
    if len(data) < 40:
        info.truncated = True
        return
    info.src = str(ipaddress.IPv6Address(data[8:24]))
    info.dst = str(ipaddress.IPv6Address(data[24:40]))
    payload_len = int.from_bytes(data[4:6], "big")
    # Zero payload length means a jumbogram (RFC 2675): the length is in hop-by-hop options.
    cur = _Cursor(data, info, 40 + payload_len if payload_len else None)
    _walk_headers(cur, 40, data[6], ipv6=True)


def _set_ipsec(info: PacketInfo, encap: str, spi: int, seq: Optional[int]) -> None:
    # With AH and ESP both applied, the outer header is the one the kernel meets first.
    if info.encap is None:
        info.encap, info.spi, info.seq = encap, spi, seq


def _walk_headers(cur: _Cursor, at: int, next_header: int, ipv6: bool) -> None:
    """Follow IPv6 extension headers and AH to the upper-layer header, then decode that.

    AH only authenticates, so what it carries is still readable: the walk goes on past it,
    keeping its SPI and sequence number.  Until a header is read, it is the innermost header
    reached, which is what ``proto`` reports when the capture ends early.
    """
    info = cur.info
    while next_header == IPPROTO_AH or (ipv6 and next_header in IPV6_EXTENSION_HEADERS):
        _set_proto(info, next_header)
        if next_header == IPPROTO_AH:
            header_len = _read_ah(cur, at)
        elif next_header == IPPROTO_FRAGMENT:
            header_len = _read_ipv6_fragment(cur, at)
        else:
            header_len = _read_ipv6_options(cur, at, next_header)
        if header_len is None:
            return
        next_header, at = cur.u8(at), at + header_len
    _set_proto(info, next_header)
    _decode_l4(cur, at, next_header)


def _read_ah(cur: _Cursor, at: int) -> Optional[int]:
    """Record AH's SPI and sequence number; its length, or None to stop the walk."""
    if not cur.have(at, 12, "AH header"):
        return None
    _set_ipsec(cur.info, "ah", cur.u32(at + 4), cur.u32(at + 8))
    header_len = (cur.u8(at + 1) + 2) * 4  # RFC 4302: in 32-bit words, minus 2
    if header_len < 12:
        cur.info.malformed = f"AH length {header_len} is below 12"
        return None
    return header_len


def _read_ipv6_fragment(cur: _Cursor, at: int) -> Optional[int]:
    """Record the fragment offset; 8, or None when no upper-layer header follows."""
    if not cur.have(at, 4, "IPv6 fragment header"):
        return None
    field = cur.u16(at + 2)
    offset, more_fragments = field & 0xFFF8, bool(field & 1)
    if offset or more_fragments:
        cur.info.fragment_offset = offset
    if offset:
        _set_proto(cur.info, cur.u8(at))  # only the first fragment carries the L4 header
        return None
    return 8


def _read_ipv6_options(cur: _Cursor, at: int, kind: int) -> Optional[int]:
    """Length of a hop-by-hop, routing or destination options header, or None."""
    if not cur.have(at, 2, f"IPv6 {protocol_name(kind)} header"):
        return None
    return (cur.u8(at + 1) + 1) * 8


def _decode_l4(cur: _Cursor, at: int, proto: int) -> None:
    decoder = _L4_DECODERS.get(proto)
    if decoder is not None:
        decoder(cur, at)


def _decode_esp(cur: _Cursor, at: int) -> None:
    if cur.have(at, 8, "ESP header"):
        _set_ipsec(cur.info, "esp", cur.u32(at), cur.u32(at + 4))


def _decode_ipcomp(cur: _Cursor, at: int) -> None:
    # The kernel keeps IPComp SAs under their CPI as SPI.
    if cur.have(at, 4, "IPComp header"):
        _set_ipsec(cur.info, "ipcomp", cur.u16(at + 2), None)


def _decode_ports(cur: _Cursor, at: int) -> None:
    if cur.have(at, 4, f"{cur.info.proto} ports"):
        cur.info.sport, cur.info.dport = cur.u16(at), cur.u16(at + 2)


def _decode_icmp(cur: _Cursor, at: int) -> None:
    if cur.have(at, 2, f"{cur.info.proto} header"):
        cur.info.icmp_type, cur.info.icmp_code = cur.u8(at), cur.u8(at + 1)


def _decode_udp(cur: _Cursor, at: int) -> None:
    _decode_ports(cur, at)
    if NAT_T_PORT not in (cur.info.sport, cur.info.dport):
        return
    if not cur.have(at, 8, "UDP header"):
        return
    udp_len = cur.u16(at + 4)
    if udp_len == 0:
        end = cur.limit  # IPv6 jumbogram (RFC 2675): the IP length rules
    elif udp_len < 8:
        cur.info.malformed = f"UDP length {udp_len} is below 8"
        return
    else:
        end = at + udp_len if cur.limit is None else min(at + udp_len, cur.limit)
    _decode_nat_t(_Cursor(cur.data, cur.info, end), at + 8)


def _decode_nat_t(cur: _Cursor, at: int) -> None:
    """RFC 3948 port 4500 payload: NAT-keepalive, IKE (non-ESP marker) or ESP."""
    if cur.limit is not None and cur.limit <= at:
        return  # empty datagram: nothing to classify
    if not cur.have(at, 1, "UDP payload"):
        return
    if cur.limit == at + 1 and cur.data[at:at + 1] == NAT_KEEPALIVE:
        return
    if not cur.have(at, 4, "ESP-in-UDP SPI or non-ESP marker"):
        return
    if cur.data[at:at + 4] == NON_ESP_MARKER:
        return  # IKE
    if cur.have(at, 8, "ESP-in-UDP header"):
        _set_ipsec(cur.info, "esp-in-udp", cur.u32(at), cur.u32(at + 4))


_L4_DECODERS: Dict[int, Callable[[_Cursor, int], None]] = {
    IPPROTO_ESP: _decode_esp,
    IPPROTO_COMP: _decode_ipcomp,
    IPPROTO_UDP: _decode_udp,
    IPPROTO_TCP: _decode_ports,
    IPPROTO_DCCP: _decode_ports,
    IPPROTO_SCTP: _decode_ports,
    IPPROTO_UDPLITE: _decode_ports,
    IPPROTO_ICMP: _decode_icmp,
    IPPROTO_ICMPV6: _decode_icmp,
}
