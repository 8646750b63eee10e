"""pcapng output (``--output-pcap``): each traced packet, with a comment saying why.

One Enhanced Packet Block per event that carried packet bytes: the bytes the kernel held at
the site, from the IP header on (at most 256), on an interface of link type RAW (IPv4 or
IPv6 by the first nibble), with nanosecond timestamps.  Its comments name the counter, the
kernel site, the network namespace, the mark and interface, and the explanation's summary,
so Wireshark shows "XfrmInNoStates at xfrm_input+0x569 ..." next to the ESP header.

Events of the flow context (output paths before a packet exists) have no bytes and are
not written.  Format: https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-03.html
"""

from __future__ import annotations

import struct
from typing import BinaryIO, List

from xfrmtrace import __version__
from xfrmtrace.decode.events import XfrmErrorEvent

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_LINKTYPE_RAW = 101  # raw IPv4/IPv6, no link-layer header
_OPT_END = 0
_OPT_COMMENT = 1
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_TSRESOL = 9
_TSRESOL_NS = 9  # 10^-9 s
SNAPLEN = 256  # XT_PKT_BYTES: the BPF program copies at most this much


def _option(code: int, value: bytes) -> bytes:
    padding = b"\0" * (-len(value) % 4)
    return struct.pack("<HH", code, len(value)) + value + padding


def _options(options: List[bytes]) -> bytes:
    return b"".join(options) + struct.pack("<HH", _OPT_END, 0) if options else b""


def _block(block_type: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


def _original_length(packet: bytes) -> int:
    """The packet's length as its IP header gives it, for Wireshark's "limited" marker."""
    if len(packet) >= 4 and packet[0] >> 4 == 4:
        return max(len(packet), struct.unpack_from("!H", packet, 2)[0])
    if len(packet) >= 6 and packet[0] >> 4 == 6:
        return max(len(packet), 40 + struct.unpack_from("!H", packet, 4)[0])
    return len(packet)


def event_comments(event: XfrmErrorEvent) -> List[str]:
    """What Wireshark shows as the packet's comments."""
    where = f"netns {event.netns}" + (f" ({event.netns_name})" if event.netns_name else "")
    first = f"{event.counter} at {event.site_label}, {where}"
    if event.mark:
        first += f", mark {event.mark:#x}"
    if event.ifindex:
        first += f", if {event.ifindex}" + (f" ({event.ifname})" if event.ifname else "")
    comments = [first]
    if event.explain is not None:
        comments.append("why: " + event.explain.summary)
    return comments


class PcapngWriter:
    """Writes a section header and one interface when created, then one block per packet."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.packets = 0
        shb = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)  # version 1.0, length unknown
        shb += _options([_option(_SHB_USERAPPL, f"xfrmtrace {__version__}".encode())])
        idb = struct.pack("<HHI", _LINKTYPE_RAW, 0, SNAPLEN)
        idb += _options([_option(_IF_NAME, b"xfrmtrace"),
                         _option(_IF_TSRESOL, bytes([_TSRESOL_NS]))])
        stream.write(_block(_SHB, shb) + _block(_IDB, idb))

    def write_event(self, event: XfrmErrorEvent) -> bool:
        """Append the event's packet; False (nothing written) when it carried no bytes."""
        packet = event.packet
        if not packet:
            return False
        ts = event.time_ns
        body = struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(packet),
                           _original_length(packet))
        body += packet + b"\0" * (-len(packet) % 4)
        body += _options([_option(_OPT_COMMENT, c.encode("utf-8", "replace"))
                          for c in event_comments(event)])
        self._stream.write(_block(_EPB, body))
        self.packets += 1
        return True

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()
