"""``xfrmtrace.decode.packet`` on recorded packets, cross-checked against tshark, and fuzzed."""

from __future__ import annotations

import dataclasses
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xfrmtrace.decode.packet import PacketInfo, decode_packet, protocol_name

FIXTURES = Path(__file__).parent / "fixtures" / "packets"
LINKTYPE_RAW = 101  # pcap link type: the packet starts with an IPv4 or IPv6 header

# Fields that are read from the packet (everything except the verdicts).
DECODED_FIELDS = [
    f.name for f in dataclasses.fields(PacketInfo) if f.name not in ("truncated", "malformed")
]


def read_hex_fixture(path: Path) -> bytes:
    """Bytes of a fixture file: hex digits, whitespace ignored, ``#`` lines are comments."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return bytes.fromhex("".join(lines).replace(" ", ""))


PACKETS: Dict[str, bytes] = {
    path.stem: read_hex_fixture(path) for path in sorted(FIXTURES.glob("*.hex"))
}


def write_pcap(path: Path, packets: List[bytes]) -> None:
    """A classic pcap file with one raw-IP record per packet."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        for i, data in enumerate(packets):
            f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(data), len(data)) + data)


def tshark_view(packet: ET.Element) -> Dict[str, object]:
    """The PacketInfo fields, as tshark's dissection of one PDML packet gives them."""
    fields: Dict[str, List[ET.Element]] = {}
    for field in packet.iter("field"):
        fields.setdefault(field.get("name", ""), []).append(field)
    protos = {proto.get("name") for proto in packet.iter("proto")}

    def first(name: str) -> Optional[str]:
        found = fields.get(name)
        return found[0].get("show") if found else None

    def number(name: str) -> Optional[int]:
        text = first(name)
        return None if text is None else int(text, 0)

    view: Dict[str, object] = {}
    if "ip" in protos:
        view.update(family="ipv4", src=first("ip.src"), dst=first("ip.dst"))
        offset, more = 8 * (number("ip.frag_offset") or 0), number("ip.flags.mf")
    else:
        view.update(family="ipv6", src=first("ipv6.src"), dst=first("ipv6.dst"))
        offset, more = 8 * (number("ipv6.fraghdr.offset") or 0), number("ipv6.fraghdr.more")
    # The upper-layer protocol is the "next header" field found deepest in the header chain.
    next_headers = [
        f for name, found in fields.items()
        if re.fullmatch(r"ip\.proto|ipv6(\.\w+)?\.nxt|ah\.next_header", name)
        for f in found
    ]
    view["proto_num"] = int(max(next_headers, key=lambda f: int(f.get("pos", "0"))).get("show", ""))
    view["fragment_offset"] = offset if (offset or more) else None
    view["proto"] = protocol_name(view["proto_num"])  # type: ignore[arg-type]
    for l4 in ("udp", "tcp"):
        if l4 in protos:
            view.update(sport=number(f"{l4}.srcport"), dport=number(f"{l4}.dstport"))
    for icmp in ("icmp", "icmpv6"):
        if icmp in protos:
            view.update(icmp_type=number(f"{icmp}.type"), icmp_code=number(f"{icmp}.code"))
    if "esp" in protos:
        view.update(spi=number("esp.spi"), seq=number("esp.sequence"),
                    encap="esp-in-udp" if "udp" in protos else "esp")
    elif "ah" in protos:
        view.update(spi=number("ah.spi"), seq=number("ah.sequence"), encap="ah")
    elif "ipcomp" in protos:
        view.update(spi=number("ipcomp.cpi"), encap="ipcomp")
    return view


@pytest.fixture(scope="module")
def tshark_decodes(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, object]]:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (Debian package tshark): no independent decoder")
    pcap = tmp_path_factory.mktemp("packets") / "fixtures.pcap"
    names = list(PACKETS)
    write_pcap(pcap, [PACKETS[n] for n in names])
    # Without reassembly, tshark dissects the L4 header of a lone first fragment, as we do.
    pdml = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-T", "pdml",
         "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE"],
        capture_output=True, text=True, check=True,
    ).stdout
    packets = ET.fromstring(pdml).findall("packet")
    assert len(packets) == len(names)
    return {name: tshark_view(p) for name, p in zip(names, packets)}


def test_fixtures_present() -> None:
    assert len(PACKETS) >= 15


@pytest.mark.parametrize("name", sorted(PACKETS))
def test_decode_matches_tshark(name: str, tshark_decodes: Dict[str, Dict[str, object]]) -> None:
    ours = decode_packet(PACKETS[name])
    theirs = tshark_decodes[name]
    assert not ours.truncated and ours.malformed is None
    expected = {field: theirs.get(field) for field in DECODED_FIELDS}
    assert {field: getattr(ours, field) for field in DECODED_FIELDS} == expected


# --- cases tshark cannot judge: what we promise about odd input -----------------------------


def ipv4(proto: int, payload: bytes, total: Optional[int] = None, ihl: int = 5) -> bytes:
    total = 4 * ihl + len(payload) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, 0, 64, proto, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return header + bytes(4 * ihl - 20) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def test_esp_fields() -> None:
    info = decode_packet(PACKETS["ipv4-esp"])
    assert (info.family, info.src, info.dst) == ("ipv4", "192.168.112.29", "192.168.139.255")
    assert (info.proto_num, info.proto, info.encap, info.spi, info.seq) == (50, "esp", "esp", 3, 3)
    assert info.sport is None and info.dport is None


def test_esp_in_udp_keeps_udp_as_protocol() -> None:
    info = decode_packet(PACKETS["ipv4-esp-in-udp"])
    assert (info.proto, info.sport, info.dport) == ("udp", 4500, 4500)
    assert (info.encap, info.spi, info.seq) == ("esp-in-udp", 0xC1A2B3C4, 42)


@pytest.mark.parametrize("name", ["ipv4-ike-nat-t", "ipv4-nat-keepalive"])
def test_port_4500_without_esp(name: str) -> None:
    info = decode_packet(PACKETS[name])
    assert info.encap is None and info.spi is None and info.malformed is None


def test_accepts_bytearray_and_memoryview() -> None:
    data = PACKETS["ipv6-esp"]
    assert decode_packet(bytearray(data)) == decode_packet(memoryview(data)) == decode_packet(data)


def test_skb_protocol_non_ip_stops_decoding() -> None:
    info = decode_packet(PACKETS["ipv4-esp"], skb_protocol=0x0806)
    assert info.family is None and info.malformed == "not an IP packet (ethertype 0x0806)"


@pytest.mark.parametrize("skb_protocol", [None, 0, 0x0800, 0x86DD])
def test_version_nibble_decides(skb_protocol: Optional[int]) -> None:
    assert decode_packet(PACKETS["ipv6-esp"], skb_protocol).family == "ipv6"
    assert decode_packet(PACKETS["ipv4-esp"], skb_protocol).family == "ipv4"


def test_empty_data() -> None:
    assert decode_packet(b"") == PacketInfo(truncated=True)
    assert decode_packet(b"", 0x86DD) == PacketInfo(family="ipv6", truncated=True)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x50" + bytes(39), "IP version 5 is neither 4 nor 6"),
        (b"\x44" + ipv4(50, bytes(8))[1:], "IPv4 header length 16 is below 20"),
        (ipv4(50, bytes(8), total=12), "IPv4 total length 12 is below the header length 20"),
        (ipv4(50, bytes(8), total=24), "ESP header extends past the end of the packet"),
        (ipv4(17, udp(4500, 4500, b"\x01")),
         "ESP-in-UDP SPI or non-ESP marker extends past the end of the packet"),
        (ipv4(17, udp(4500, 4500, b"\x01\x02\x03\x04")),
         "ESP-in-UDP header extends past the end of the packet"),
        (ipv4(17, struct.pack("!HHHH", 4500, 4500, 4, 0) + bytes(8)), "UDP length 4 is below 8"),
    ],
)
def test_malformed(data: bytes, reason: str) -> None:
    info = decode_packet(data)
    assert info.malformed == reason and not info.truncated


def test_ipv4_zero_total_length_is_unknown_length() -> None:
    # TSO and BIG TCP packets carry tot_len 0: decode up to the end of the capture.
    info = decode_packet(ipv4(50, struct.pack("!II", 7, 8), total=0))
    assert (info.spi, info.seq, info.malformed) == (7, 8, None)


def test_udp_4500_empty_payload() -> None:
    info = decode_packet(ipv4(17, udp(4500, 4500, b"")))
    assert (info.sport, info.encap, info.truncated, info.malformed) == (4500, None, False, None)


def test_ipv6_truncated_in_extension_chain_reports_header_reached() -> None:
    data = PACKETS["ipv6-hbh-dstopts-udp"][:49]  # ends inside the destination options header
    info = decode_packet(data)
    assert info.truncated and info.proto == "ipv6-opts" and info.sport is None


def test_protocol_names() -> None:
    assert [protocol_name(n) for n in (1, 6, 17, 50, 51, 58, 108, 253)] == [
        "icmp", "tcp", "udp", "esp", "ah", "ipv6-icmp", "ipcomp", "253"]


# --- truncation and fuzzing -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PACKETS))
def test_every_truncation_is_flagged_or_harmless(name: str) -> None:
    """A prefix decodes to the full packet's fields, or says it is truncated and is a subset."""
    data = PACKETS[name]
    full = decode_packet(data)
    for cut in range(len(data)):
        part = decode_packet(data[:cut])
        assert part.malformed is None, (cut, part)
        if not part.truncated:
            assert part == full, cut
            continue
        for field in DECODED_FIELDS:
            value = getattr(part, field)
            if field not in ("proto", "proto_num"):  # the header reached, by design
                assert value is None or value == getattr(full, field), (cut, field)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_random_bytes_never_raise(data: bytes, skb_protocol: Optional[int]) -> None:
    info = decode_packet(data, skb_protocol)
    assert isinstance(info, PacketInfo)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(sorted(PACKETS)), st.data())
def test_mutated_packets_never_raise(name: str, data: st.DataObject) -> None:
    packet = bytearray(PACKETS[name])
    for _ in range(data.draw(st.integers(1, 8))):
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(packet)))
    info = decode_packet(bytes(packet[:cut]))
    assert info.truncated or info.malformed is not None or info.family is not None


IPV6_EXTENSIONS = st.sampled_from([0, 43, 51, 60])


def extension_header(kind: int, following: int, units: int) -> bytes:
    """An IPv6 extension header (or AH) of ``kind`` whose size grows with ``units``."""
    if kind == 51:
        length_field = 1 + 2 * units  # AH: (field + 2) 32-bit words, from 12 bytes up
        return bytes([following, length_field]) + bytes(4 * (length_field + 2) - 2)
    return bytes([following, units]) + bytes(6 + 8 * units)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(IPV6_EXTENSIONS, st.integers(0, 3)), max_size=6),
       st.sampled_from([6, 17, 50, 58, 59]), st.integers(0, 400))
def test_ipv6_extension_chains(chain: list, last: int, cut: int) -> None:
    """Any chain of extension headers and AH is walked to the upper-layer header, or flagged."""
    kinds = [kind for kind, _ in chain] + [last]
    body = b"".join(
        extension_header(kind, following, units)
        for (kind, units), following in zip(chain, kinds[1:])
    )
    body += bytes(range(1, 13))  # ports, SPI and sequence of whatever comes last
    packet = struct.pack("!IHBB", 6 << 28, len(body), kinds[0], 64) + bytes(32) + body
    info = decode_packet(packet[:cut])
    if cut >= len(packet):
        assert (info.proto_num, info.truncated, info.malformed) == (last, False, None)
        assert info.encap == ("ah" if 51 in kinds else "esp" if last == 50 else None)
    else:
        assert info.malformed is None
        assert info.truncated or info.proto_num == last
