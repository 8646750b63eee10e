"""Decoders fed truncated, mutated and random input: no exception escapes, bad input is marked.

Complements the fuzzing in test_packet.py (random and mutated packets, truncations without an
ethertype) and test_output.py (formatting of synthetic events).  Seeds are the recorded
packets in tests/fixtures/packets and the real NETLINK_XFRM datagrams in
tests/fixtures/netlink; the netlink input goes through ``XfrmWatcher.poll``, the path live
notifications take.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.fixtures.eventdata import COUNTER_NAMES, SITES, decoder
from xfrmtrace.bpf import abi
from xfrmtrace.context.xfrmnl import changes as xfrm_changes
from xfrmtrace.context.xfrmnl.changes import XfrmChange
from xfrmtrace.context.xfrmnl.listener import XfrmWatcher
from xfrmtrace.context.xfrmnl.socket import XfrmSocket, parse, split_messages
from xfrmtrace.context.xfrmnl.tc import TC_MESSAGES, TcSocket
from xfrmtrace.decode.events import CONTEXT_NAMES, XfrmErrorEvent
from xfrmtrace.decode.packet import ETH_P_IP, ETH_P_IPV6, PacketInfo, decode_packet
from xfrmtrace.errors import DecodeError, InputError, PermissionProblem
from xfrmtrace.kernel.kallsyms import Kallsyms
from xfrmtrace.output import changes as changes_out
from xfrmtrace.output import jsonl, text
from xfrmtrace.report import cluster
from xfrmtrace.report import reader as report
from xfrmtrace.report.html import write_html

FIXTURES = Path(__file__).parent / "fixtures"
NETNS = 4026532999
# Fuzz examples run in one test call: function-scoped fixtures are not used inside them.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def warnings_logged() -> Iterator[list[logging.LogRecord]]:
    """Every WARNING (or worse) any logger emits inside the block."""
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def messages_of(records: list[logging.LogRecord], prefix: str) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith(prefix)]


# ---- packets ------------------------------------------------------------------------------


def hex_fixture(path: Path) -> bytes:
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return bytes.fromhex("".join(lines).replace(" ", ""))


PACKETS = {p.stem: hex_fixture(p) for p in sorted((FIXTURES / "packets").glob("*.hex"))}

# Bytes from the start a fixture needs before its outermost IPsec header is read whole:
# IPv4 header (20, no options) or IPv6 header (40), UDP (8) for ESP-in-UDP, then the SPI
# and sequence number of ESP (8) or AH (12), or IPComp's 4-byte header.
IPSEC_HEADER_END = {
    "ipv4-esp": 20 + 8, "ipv4-esp-in-udp": 20 + 8 + 8, "ipv4-ah-icmp": 20 + 12,
    "ipv4-ipcomp": 20 + 4, "ipv6-esp": 40 + 8, "ipv6-esp-in-udp": 40 + 8 + 8,
    "ipv6-ah-icmpv6": 40 + 12,
}


def test_ipsec_table_covers_every_ipsec_fixture() -> None:
    assert {name for name, data in PACKETS.items()
            if decode_packet(data).spi is not None} == set(IPSEC_HEADER_END)


@pytest.mark.parametrize("ethertype", [ETH_P_IP, ETH_P_IPV6], ids=["ETH_P_IP", "ETH_P_IPV6"])
@pytest.mark.parametrize("name", sorted(PACKETS))
def test_every_truncation_with_either_ethertype(name: str, ethertype: int) -> None:
    """Cut anywhere, with the right or the wrong ethertype: no exception, a cut into a header
    the decoder needs is flagged, and one inside the IP or IPsec header leaves that header's
    fields unread rather than wrong."""
    data = PACKETS[name]
    full = decode_packet(data, ethertype)
    assert full == decode_packet(data)  # the version nibble decides, not the ethertype
    assert not full.truncated and full.malformed is None
    ip_header = 20 if full.family == "ipv4" else 40
    spi_from = IPSEC_HEADER_END.get(name)
    for cut in range(len(data)):
        part = decode_packet(data[:cut], ethertype)
        assert part.malformed is None, (cut, part)
        assert part.truncated or part == full, (cut, part)  # past the headers it reads
        if cut == 0:
            assert part.family == {ETH_P_IP: "ipv4", ETH_P_IPV6: "ipv6"}[ethertype]
        else:
            assert part.family == full.family
        if cut < ip_header:
            assert part == PacketInfo(family=part.family, truncated=True), cut
        if spi_from is not None:
            if cut < spi_from:
                assert part.truncated, cut
                assert (part.spi, part.seq, part.encap) == (None, None, None), cut
            else:
                assert (part.spi, part.encap) == (full.spi, full.encap), cut


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=80), st.integers(0, 0xFFFF).filter(
    lambda t: t not in (0, ETH_P_IP, ETH_P_IPV6)))
def test_non_ip_ethertype_is_malformed_and_nothing_is_read(data: bytes, ethertype: int) -> None:
    info = decode_packet(data, ethertype)
    assert info.malformed == f"not an IP packet (ethertype {ethertype:#06x})"
    assert info == PacketInfo(malformed=info.malformed)


# ---- ring-buffer events -------------------------------------------------------------------


@settings(FUZZ, max_examples=400)
@given(st.integers(0, 2 * abi.EVENT_SIZE).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)))
def test_random_records_decode_or_raise_decode_error(raw: bytes) -> None:
    try:
        event = decoder().decode(raw)
    except DecodeError as err:
        assert len(raw) < abi.EVENT_SIZE
        assert f"record of {len(raw)} bytes is shorter than struct xt_event" in str(err)
        return
    assert len(raw) >= abi.EVENT_SIZE
    assert event.counter and event.context
    text.format_event(event)
    json.loads(jsonl.format_event(event))


U8, U16, U32, U64 = (st.integers(0, 2**bits - 1) for bits in (8, 16, 32, 64))


@settings(FUZZ, max_examples=250)
@given(
    site_id=st.sampled_from(sorted(SITES)) | U32,
    counter=st.sampled_from(sorted(COUNTER_NAMES) + [s.counter_index for s in SITES.values()])
    | U32,
    site_addr=st.sampled_from([s.address for s in SITES.values()]) | U64,
    pkt_len=st.sampled_from([0, 1, 20, 255, 256, 257, 2**32 - 1]) | U32,
    pkt=st.binary(min_size=abi.XT_PKT_BYTES, max_size=abi.XT_PKT_BYTES),
    stack_len=st.sampled_from([0, 7, 8, 8 * abi.XT_MAX_STACK, 8 * abi.XT_MAX_STACK + 8]) | U32,
    stack=st.lists(st.sampled_from([0, 0xFFFFFFFF81A00124]) | U64,
                   min_size=abi.XT_MAX_STACK, max_size=abi.XT_MAX_STACK),
    flags=U32, context=st.sampled_from(sorted(CONTEXT_NAMES)) | U8,
    context_note=U8, netns_source=U8, skb_protocol=U16, flow_family=st.sampled_from([2, 10])
    | U16, flow_proto=U8, flow_sport=U16, flow_dport=U16, flow_spi=U32,
    flow_saddr=st.binary(min_size=16, max_size=16), flow_daddr=st.binary(min_size=16,
                                                                         max_size=16),
    ifname=st.binary(min_size=16, max_size=16), comm=st.binary(min_size=16, max_size=16),
    netns=st.sampled_from([0, 4026532285]) | U32,
)
def test_records_with_any_field_values(**fields: Any) -> None:
    """Counter indexes past the known ones, unknown sites, pkt_len past the copy, garbage
    stack_len, non-UTF-8 names: decoded without exception, each value bounded or marked."""
    event = abi.XtEvent()
    for name, value in fields.items():
        if name in ("pkt", "stack", "flow_saddr", "flow_daddr"):
            getattr(event, name)[:] = list(value)
        else:
            setattr(event, name, value)
    decoded = decoder().decode(bytes(event))

    site = SITES.get(fields["site_id"])
    if site is not None and site.counter_index == fields["counter"]:
        assert decoded.counter == site.counter
    else:
        assert decoded.counter == COUNTER_NAMES.get(fields["counter"],
                                                    f"counter#{fields['counter']}")
    assert decoded.context == CONTEXT_NAMES.get(fields["context"],
                                                f"context#{fields['context']}")
    if fields["context"] == abi.XtContext.SKB:
        copied = min(fields["pkt_len"], abi.XT_PKT_BYTES)
        assert decoded.packet_len == copied and decoded.packet == fields["pkt"][:copied]
        assert decoded.ifname is None or isinstance(decoded.ifname, str)
    else:
        assert decoded.packet_len is None and decoded.packet == b""
    if fields["flags"] & abi.XT_F_HAS_STACK:
        assert decoded.stack is not None
        assert len(decoded.stack) <= min(fields["stack_len"] // 8, abi.XT_MAX_STACK)
    else:
        assert decoded.stack is None
    assert isinstance(decoded.comm, str)
    rendered = text.format_event(decoded)
    assert decoded.counter in rendered
    record = json.loads(jsonl.format_event(decoded))
    assert record["counter"] == decoded.counter and record["comm"] == decoded.comm


# ---- netlink ------------------------------------------------------------------------------


DATAGRAMS = {f"{path.stem}#{i}": bytes.fromhex(line)
             for path in sorted((FIXTURES / "netlink").glob("*.hex"))
             for i, line in enumerate(path.read_text().split())}


class RecordedSocket(XfrmSocket):
    """An XfrmSocket whose datagrams come from a list rather than the kernel."""

    def __init__(self, chunks: list[bytes]) -> None:  # no socket: nothing to open
        self.chunks = chunks
        self.lost = False

    def receive_raw(self) -> list[bytes]:
        chunks, self.chunks = self.chunks, []
        return chunks

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class RecordedTcSocket(TcSocket):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.lost = False

    receive_raw = RecordedSocket.receive_raw
    fileno = RecordedSocket.fileno
    close = RecordedSocket.close


def watch(*chunks: bytes, tc: bool = False) -> list[XfrmChange]:
    """What XfrmWatcher.poll makes of ``chunks`` arriving on one namespace's socket, each
    change also formatted as the trace prints it."""
    watcher = XfrmWatcher()
    watcher._next_scan = math.inf  # no /run/netns rescan: only the recorded socket
    if tc:
        watcher._tc[NETNS] = RecordedTcSocket(list(chunks))
    else:
        watcher._sockets[NETNS] = RecordedSocket(list(chunks))
    found = watcher.poll()
    for change in found:
        changes_out.format_change_text(change)
        json.loads(changes_out.format_change_json(change))
    return found


def same(change: XfrmChange) -> XfrmChange:
    """A change without the receive time, to compare runs."""
    return dataclasses.replace(change, monotonic_ns=0)


def layout(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, length, type) of each message of a well-formed datagram."""
    found, offset = [], 0
    while offset < len(data):
        length, mtype = struct.unpack_from("=IH", data, offset)
        found.append((offset, length, mtype))
        offset += (length + 3) & ~3
    return found


def per_message(data: bytes) -> list[list[XfrmChange]]:
    """The changes each message of a datagram gives on its own."""
    return [[same(c) for c in watch(data[o:o + n])] for o, n, _t in layout(data)]


def followed(data: bytes) -> int:
    """Messages of a datagram that the watcher turns into a change or reports as odd."""
    return sum(1 for mtype, _raw in split_messages(data) if mtype in xfrm_changes._ACTIONS)


def account(data: bytes) -> tuple[list[XfrmChange], list[logging.LogRecord]]:
    """Watch ``data`` and check the bookkeeping: every message the watcher follows becomes a
    change or a warning, and pyroute2 never logs (its warnings are tracebacks)."""
    with warnings_logged() as logs:
        found = watch(data)
    skipped = (messages_of(logs, "netlink: cannot decode XFRM message")
               + [m for m in messages_of(logs, "netns ") if "odd XFRM notification" in m])
    assert len(found) + len(skipped) == followed(data), [r.getMessage() for r in logs]
    assert [r.name for r in logs if r.name.startswith("pyroute2")] == []
    return found, logs


def test_fixture_datagrams_decode_cleanly() -> None:
    for name, data in DATAGRAMS.items():
        with warnings_logged() as logs:
            found = watch(data)
        assert logs == [], name
        assert len(found) == followed(data) == sum(map(len, per_message(data))), name


@pytest.mark.parametrize("name", sorted(DATAGRAMS))
def test_every_truncation_of_a_datagram(name: str) -> None:
    """Whole messages before the cut give exactly their changes; a cut that is not at a
    message boundary is reported; nothing escapes."""
    data = DATAGRAMS[name]
    messages = layout(data)
    expected = per_message(data)
    boundaries = {0} | {o + n for o, n, _t in messages} | {(o + n + 3) & ~3
                                                           for o, n, _t in messages}
    for cut in range(len(data)):
        found, logs = account(data[:cut])
        whole = [i for i, (o, n, _t) in enumerate(messages) if o + n <= cut]
        assert [same(c) for c in found] == [c for i in whole for c in expected[i]], cut
        warned = [r for r in logs if r.name == "xfrmtrace.context.xfrmnl"]
        assert bool(warned) == (cut not in boundaries), (cut, [r.getMessage() for r in logs])


NETLINK_FUZZ = settings(FUZZ, max_examples=300)


@NETLINK_FUZZ
@given(st.sampled_from(sorted(DATAGRAMS)), st.data())
def test_random_byte_flips(name: str, data: st.DataObject) -> None:
    packet = bytearray(DATAGRAMS[name])
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([len(packet)]) | st.integers(0, len(packet)), label="cut")
    account(bytes(packet[:cut]))


@NETLINK_FUZZ
@given(st.sampled_from(sorted(DATAGRAMS)), st.data())
def test_corrupt_nlmsg_len(name: str, data: st.DataObject) -> None:
    """A message whose length field lies: those before it are decoded as recorded; one
    that overruns the datagram is reported and ends it."""
    original = DATAGRAMS[name]
    messages = layout(original)
    index = data.draw(st.integers(0, len(messages) - 1), label="message")
    offset, length, _mtype = messages[index]
    bogus = data.draw(st.sampled_from([0, 1, 15, 16, 17, length - 4, length + 4, 2**32 - 1])
                      | st.integers(0, 2**32 - 1), label="nlmsg_len")
    assume(bogus != length)
    packet = bytearray(original)
    struct.pack_into("=I", packet, offset, bogus)
    found, logs = account(bytes(packet))
    before = [c for changes in per_message(original)[:index] for c in changes]
    assert [same(c) for c in found[:len(before)]] == before
    if bogus < 16 or offset + bogus > len(packet):
        assert messages_of(logs, f"netlink: message of {bogus} bytes at offset {offset} "
                                 "overruns")


def attribute_offsets(data: bytes) -> list[tuple[int, int]]:
    """(message index, absolute offset) of every attribute in a datagram."""
    found = []
    for index, (offset, length, _mtype) in enumerate(layout(data)):
        for msg in parse(data[offset:offset + length]):
            found += [(index, offset + slot.cell[1].offset) for slot in msg.get("attrs", ())]
    return found


ATTRIBUTES = {name: attribute_offsets(data) for name, data in DATAGRAMS.items()}


@NETLINK_FUZZ
@given(st.sampled_from(sorted(n for n, a in ATTRIBUTES.items() if a)), st.data())
def test_corrupt_attribute_header(name: str, data: st.DataObject) -> None:
    """An attribute whose length or type lies spoils its own message at most: the others
    give the changes they gave before, and the spoilt one a change or a warning."""
    original = DATAGRAMS[name]
    index, at = data.draw(st.sampled_from(ATTRIBUTES[name]), label="attribute")
    field = data.draw(st.sampled_from(["nla_len", "nla_type"]), label="field")
    at += 2 if field == "nla_type" else 0
    (value,) = struct.unpack_from("=H", original, at)
    near = [v & 0xFFFF for v in (value - 4, value + 4)]  # 16-bit fields wrap
    bogus = data.draw(st.sampled_from([0, 1, 3, 4, 5, 8, *near, 0xFFFF])
                      | st.integers(0, 0xFFFF), label=field)
    assume(bogus != value)
    packet = bytearray(original)
    struct.pack_into("=H", packet, at, bogus)
    found, _logs = account(bytes(packet))
    expected = per_message(original)
    before = [c for changes in expected[:index] for c in changes]
    after = [c for changes in expected[index + 1:] for c in changes]
    got = [same(c) for c in found]
    assert len(got) - len(before) - len(after) in (0, 1)
    assert got[:len(before)] == before
    assert got[len(got) - len(after):] == after


def test_attribute_cut_by_its_message_spoils_only_that_message() -> None:
    """sa-add-aead's message shortened to end inside its XFRMA_ALG_AEAD (bytes 240..336),
    followed by a whole message: the first is reported in one line, the second decoded."""
    short = bytearray(DATAGRAMS["sa-add-aead#0"][:300])
    struct.pack_into("=I", short, 0, len(short))
    with warnings_logged() as logs:
        found = watch(bytes(short) + DATAGRAMS["policy-add#0"])
    assert [(c.kind, c.action) for c in found] == [("policy", "added")]
    assert [r.getMessage().split(":")[:2] for r in logs] == [
        ["netlink", " cannot decode XFRM message type 0x10 (300 bytes)"]]


@pytest.mark.parametrize("name, at", [("sa-delete#0", 40), ("policy-delete#0", 80)])
def test_delete_without_what_it_deleted_is_ignored_with_a_warning(name: str, at: int) -> None:
    """The XFRMA_SA / XFRMA_POLICY of a delete notification turned into another attribute."""
    packet = bytearray(DATAGRAMS[name])
    struct.pack_into("=H", packet, at + 2, 0)  # nla_type: XFRMA_UNSPEC
    with warnings_logged() as logs:
        assert watch(bytes(packet)) == []
    what = "SA" if name.startswith("sa") else "POLICY"
    assert [r.getMessage() for r in logs] == [
        f"netns {NETNS}: odd XFRM notification ignored: XFRM_MSG_DEL{what} without "
        f"XFRMA_{what}"]


def tc_datagram() -> bytes:
    """A filter and a qdisc added, as RTNLGRP_TC announces them (built with pyroute2)."""
    from pyroute2.netlink.rtnl import RTM_NEWQDISC, RTM_NEWTFILTER
    from pyroute2.netlink.rtnl.tcmsg import tcmsg

    chunks = []
    for mtype, kind in ((RTM_NEWTFILTER, "bpf"), (RTM_NEWQDISC, "clsact")):
        msg = tcmsg()
        msg["header"]["type"] = mtype
        msg["index"], msg["handle"], msg["parent"] = 2, 0x10000, 0xFFFFFFF2
        msg["info"] = (1 << 16) | 0x0008
        msg["attrs"] = [("TCA_KIND", kind)]
        msg.encode()
        chunks.append(bytes(msg.data))
    return b"".join(chunks)


TC = tc_datagram()


def test_tc_seed_decodes() -> None:
    found = watch(TC, tc=True)
    assert [(c.kind, c.action, c.detail["object"], c.detail["kind"]) for c in found] == [
        ("tc", "added", "filter", "bpf"), ("tc", "added", "qdisc", "clsact")]


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_tc_flips_and_truncations(data: st.DataObject) -> None:
    packet = bytearray(TC)
    for _ in range(data.draw(st.integers(0, 6))):
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    chunk = bytes(packet[:data.draw(st.integers(0, len(packet)), label="cut")])
    with warnings_logged() as logs:
        found = watch(chunk, tc=True)
    skipped = messages_of(logs, "netlink: cannot decode tc message")
    assert len(found) + len(skipped) == sum(1 for mtype, _raw in split_messages(chunk)
                                            if mtype in TC_MESSAGES)
    assert [r.name for r in logs if r.name.startswith("pyroute2")] == []
    for change in found:
        assert change.kind == "tc" and change.action in ("added", "deleted")
        assert change.detail is not None and isinstance(change.detail["kind"], (str, type(None)))


# ---- report reader ------------------------------------------------------------------------


def good_event(spi: int) -> str:
    return jsonl.format_event(XfrmErrorEvent(
        time_ns=1_795_000_000_000_000_000 + spi, counter="XfrmInNoStates", netns=NETNS,
        context="skb", family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="esp",
        encap="esp", spi=spi, mark=0xD00, function="xfrm_input", offset=0x569))


GOOD_CHANGES = [changes_out.format_change_json(dataclasses.replace(c, time_ns=10**18))
                for name in ("sa-add-aead", "sa-delete", "policy-add")
                for chunk in (FIXTURES / "netlink" / f"{name}.hex").read_text().split()
                for c in watch(bytes.fromhex(chunk))]

WRONG = st.floats() | st.lists(st.integers(), max_size=2)  # no field takes these
# A field the report reads, and values of a type xfrmtrace never writes there.
EVENT_DAMAGE = st.sampled_from([
    ("time", ["", "yesterday", "2026-13-40T25:61:61Z", "2026-11-28 14:47:49Z", 5, None]),
    ("counter", [None, 5, ["XfrmInNoStates"]]), ("netns", ["blue", 1.5, [1]]),
    ("netns_name", [5, ["blue"]]), ("src", [5, ["10.0.0.1"], {"a": 1}]), ("dst", [5, []]),
    ("encap", [{"x": 1}, 7]), ("proto", [[50], 50]), ("spi", ["0x1000", 1.5, [1], {}]),
    ("mark", ["0xd00", 0.5, []]), ("function", [5, ["f"]]), ("offset", ["0x10", 1.5, []]),
    ("explain", ["why", 5, [1], {"summary": 5}, {"details": "abc"}, {"details": [1]}]),
])
CHANGE_DAMAGE = st.sampled_from([
    ("time", ["", 5, None, "2026-11-28"]), ("netns", ["blue", 2.5]),
    ("sa", ["sa", 5, [1], {"spi": "0x10"}, {"dst": 5}, {"spi": 1.5}]),
    ("policy", ["p", [1], {"selector": "x"}, {"selector": {"dst": 5}}]),
])


@st.composite
def damaged(draw: st.DrawFn, line: str, damage: st.SearchStrategy) -> str:
    record = json.loads(line)
    key, values = draw(damage)
    record[key] = draw(st.sampled_from(values) | WRONG)
    return json.dumps(record)


JUNK_BYTES = st.binary(min_size=1, max_size=60).map(
    lambda b: b"\xff" + b.replace(b"\n", b"").replace(b"\r", b""))
NOT_OBJECTS = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3), max_leaves=5).map(
    json.dumps)

LINE = st.one_of(
    st.tuples(st.just("event"), st.integers(0, 2**32 - 1).map(good_event)),
    st.tuples(st.just("change"), st.sampled_from(GOOD_CHANGES)),
    st.tuples(st.just("ignored"), st.sampled_from(
        ["", "   ", json.dumps({"type": "summary", "counters": {}}),
         json.dumps({"type": "tc", "action": "added", "time": "x"})])),
    st.tuples(st.just("junk"), JUNK_BYTES),
    st.tuples(st.just("junk"), NOT_OBJECTS),
    st.tuples(st.just("junk"), st.sampled_from(["{", "{}", '{"type": 5}', '{"type": "sa"',
                                                "[" * 5000, "NaN"])),
    st.tuples(st.just("junk"), st.integers(0, 2**32 - 1).map(good_event).flatmap(
        lambda line: damaged(line, EVENT_DAMAGE))),
    st.tuples(st.just("junk"), st.sampled_from(GOOD_CHANGES).flatmap(
        lambda line: damaged(line, CHANGE_DAMAGE))),
)


@settings(FUZZ, max_examples=300)
@given(st.lists(LINE, max_size=12))
def test_report_reads_any_log(tmp_path_factory: pytest.TempPathFactory, lines: list) -> None:
    """Each line that is not xfrmtrace JSON is skipped and counted; the rest is reported;
    text, JSON and HTML are written; nothing raises."""
    path = tmp_path_factory.mktemp("log") / "trace.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode()
                                for _kind, line in lines) + b"\n")
    result = report.build(report.read_log(path))
    kinds = [kind for kind, _line in lines]
    assert result.skipped_lines == kinds.count("junk")
    assert sum(g.count for g in result.groups) == kinds.count("event")
    assert result.changes == kinds.count("change")
    out = io.StringIO()
    report.write_text(result, out)
    assert ("were not xfrmtrace JSON" in out.getvalue()) == ("junk" in kinds)
    nodes = cluster.join(result)
    write_html(result, nodes, io.StringIO())
    cluster.text_lines(nodes)
    json.dumps(cluster.to_dict(nodes))
    json.dumps([dataclasses.asdict(g) for g in result.groups])


def test_report_of_nothing_but_junk(tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(bytes(range(256)) * 8)
    result = report.build(report.read_log(path))
    assert result.groups == [] and result.changes == 0 and result.skipped_lines > 0


# ---- kallsyms -----------------------------------------------------------------------------

SYMBOL = st.tuples(st.integers(1, 2**64 - 1), st.sampled_from("tT"),
                   st.integers(0, 50).map(lambda n: f"sym_{n}"),
                   st.sampled_from([None, "esp4", "xfrm_interface"]))
JUNK_TOKEN = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="_\n\r", blacklist_categories=["Cs"]),
            max_size=8),
    st.sampled_from(["t", "T", "d", "ffffffff81000000", "0", "-1", "0x10", "1_0", "[esp4]",
                     "[]", "_etext", "_stext", "\t", "\x00", "\ufeff"]))
JUNK_LINE = st.lists(JUNK_TOKEN, max_size=5).map(" ".join)


def symbol_line(symbol: tuple) -> str:
    address, kind, name, module = symbol
    return f"{address:016x} {kind} {name}" + (f"\t[{module}]" if module else "")


@settings(FUZZ, max_examples=300)
@given(st.lists(SYMBOL, max_size=8), st.lists(JUNK_LINE, max_size=8), st.randoms(),
       st.integers(-2**64, 2**65))
def test_kallsyms_parse_random_lines(symbols: list, junk: list[str], rnd: Any,
                                     probe: int) -> None:
    """Junk lines are ignored: the file parses to its symbols, or (no symbol at all) is an
    InputError; all-zero addresses are a PermissionProblem; nothing else is raised."""
    lines = [symbol_line(s) for s in symbols] + junk
    rnd.shuffle(lines)
    try:
        syms = Kallsyms.parse("\n".join(lines))
    except InputError as err:
        assert symbols == [] and "has no text symbols" in str(err)
        return
    except PermissionProblem as err:
        assert symbols == [] and "only zero addresses" in str(err)
        return
    for address, _kind, name, module in symbols:
        obj = module or "vmlinux"
        first = min(a for a, _k, n, m in symbols if (n, m or "vmlinux") == (name, obj))
        assert syms.address(name, obj) == first
        found = syms.lookup(address)
        assert found is not None and found.start == address
    syms.symbolize(probe)
    list(syms.functions())
    try:
        syms.core_text_range()
    except InputError:
        pass


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, bytes(range(256)) * 4,
                                     b"0000000000000000 T f\n0000000000000000 t g\n"])
def test_kallsyms_load_of_junk_is_a_typed_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "kallsyms"
    path.write_bytes(content)
    with pytest.raises((InputError, PermissionProblem)):
        Kallsyms.load(path)
