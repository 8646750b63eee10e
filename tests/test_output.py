"""Text and JSON Lines formatting of decoded events."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterator, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.eventdata import WALL_NS, decoder, net16, packet, raw_event
from xfrmtrace.bpf import abi
from xfrmtrace.decode.events import XfrmErrorEvent
from xfrmtrace.errors import InputError
from xfrmtrace.output import LINE_FORMATS, jsonl, line_formatter, text

EXPECTED_KEYS = [
    "time", "type", "node", "counter", "counter_index", "object", "function", "offset", "address",
    "netns", "netns_name", "netns_verified", "cpu", "pid", "tgid", "comm", "context",
    "context_note", "mark", "ifindex", "ifname", "family", "src", "dst", "proto", "proto_num",
    "spi", "seq", "encap", "sport", "dport", "icmp_type", "icmp_code", "fragment_offset",
    "skb_len", "packet_len", "truncated", "malformed",
]
JSON_TYPES = {
    "string": (str,), "integer": (int,), "boolean": (bool,), "string or null": (str, type(None)),
    "integer or null": (int, type(None)), "list of strings": (list,),
}


def skb_event(name: str, **fields: Any) -> XfrmErrorEvent:
    """An skb-context event carrying fixture packet ``name``."""
    pkt = packet(name)
    fields.setdefault("mark", 0xD00)
    fields.setdefault("ifindex", 2)
    fields.setdefault("ifname", b"eth0")
    return decoder().decode(raw_event(pkt=pkt, skb_len=len(pkt), **fields))


def line(event: XfrmErrorEvent) -> str:
    return text.format_event(event, utc=True)


PREFIX = "2026-11-28 14:47:49.123456 netns=4026532285(blue) XfrmInNoStates++ xfrm_input+0x123"


# --- text -------------------------------------------------------------------------------------


def test_text_skb_ipv4_esp_matches_the_documented_example() -> None:
    event = skb_event("ipv4-esp", skb_protocol=net16(0x0800))
    assert line(event) == (
        PREFIX + " mark=0xd00 if=2(eth0) IPv4=192.168.112.29>192.168.139.255 ESP=spi:0x3,seq:3")


@pytest.mark.parametrize(
    "name, tail",
    [
        ("ipv6-esp", "IPv6=fd00::1>fd00::2 ESP=spi:0x100,seq:1"),
        ("ipv4-esp-in-udp", "IPv4=10.0.0.1>203.0.113.7 UDP=4500>4500 ESP=spi:0xc1a2b3c4,seq:42"),
        ("ipv6-esp-in-udp",
         "IPv6=2001:db8::1>2001:db8:0:1::2 UDP=4500>4500 ESP=spi:0x7f000001,seq:1000"),
        ("ipv4-ike-nat-t", "IPv4=10.0.0.1>203.0.113.7 UDP=4500>4500"),
        ("ipv4-ah-icmp", "IPv4=172.16.0.1>172.16.0.2 AH=spi:0x1000,seq:5 ICMP=type:8,code:0"),
        ("ipv6-ah-icmpv6", "IPv6=fd00::1>fd00::2 AH=spi:0x2000,seq:77 ICMPv6=type:128,code:0"),
        ("ipv4-ipcomp", "IPv4=10.9.0.1>10.9.0.2 IPComp=cpi:0x1234"),
        ("ipv4-options-tcp", "IPv4=192.0.2.10>198.51.100.20 TCP=40000>443"),
        ("ipv4-frag-first-udp", "IPv4=192.0.2.1>192.0.2.53 UDP=40001>5001 frag=0"),
        ("ipv4-frag-later", "IPv4=192.0.2.1>192.0.2.53 proto=udp frag=1480"),
        ("ipv6-frag-later", "IPv6=2001:db8::a>2001:db8::b proto=udp frag=1448"),
    ],
)
def test_text_skb_packets(name: str, tail: str) -> None:
    assert line(skb_event(name)) == f"{PREFIX} mark=0xd00 if=2(eth0) {tail}"


def test_text_truncated_and_malformed() -> None:
    event = skb_event("ipv4-esp", pkt_len=22)
    assert line(event).endswith(" IPv4=192.168.112.29>192.168.139.255 proto=esp [truncated]")
    event = skb_event("ipv4-esp", skb_protocol=net16(0x0806))
    assert line(event).endswith(" if=2(eth0) [malformed: not an IP packet (ethertype 0x0806)]")


def test_text_skb_note_and_no_mark_or_device() -> None:
    event = skb_event("ipv4-icmp-echo", mark=0, ifindex=0, ifname=b"",
                      flags=abi.XT_F_PKT_FROM_DATA)
    assert line(event) == (PREFIX + " IPv4=10.1.1.1>10.1.1.2 ICMP=type:8,code:0"
                           " (packet copied from skb->data: no network header set)")


def test_text_flow() -> None:
    event = decoder().decode(raw_event(
        context=abi.XtContext.FLOW, flow_family=2, flow_saddr=[10, 0, 0, 1],
        flow_daddr=[10, 0, 0, 2], flow_proto=1, flow_dport=net16(0x0800), flow_oif=3,
        flow_mark=0xD00))
    assert line(event) == (
        PREFIX + " flow: IPv4=10.0.0.1>10.0.0.2 proto=icmp type=8 code=0 oif=3 mark=0xd00")


def test_text_flow_ports_and_spi() -> None:
    udp = decoder().decode(raw_event(
        context=abi.XtContext.FLOW, flow_family=2, flow_saddr=[10, 0, 0, 1],
        flow_daddr=[10, 0, 0, 2], flow_proto=17, flow_sport=net16(1234),
        flow_dport=net16(4500)))
    assert line(udp) == PREFIX + " flow: IPv4=10.0.0.1>10.0.0.2 proto=udp ports=1234>4500"
    esp = decoder().decode(raw_event(context=abi.XtContext.FLOW, flow_proto=50,
                                     flow_spi=0x03000000))
    assert line(esp) == PREFIX + " flow: proto=esp spi=0x3 (flow address family unknown)"


def test_text_no_context() -> None:
    event = decoder().decode(raw_event(context=abi.XtContext.NONE,
                                       context_note=abi.XtContextNote.NO_ARGS))
    assert line(event) == PREFIX + " (no packet: function has no skb/flowi argument)"


def test_text_unknown_netns_and_module_site() -> None:
    event = decoder().decode(raw_event(netns=0, site_id=8, site_addr=0xFFFFFFFFC0400A5C,
                                       counter=22, context=abi.XtContext.NONE))
    assert line(event) == ("2026-11-28 14:47:49.123456 XfrmOutStateProtoError++ "
                           "esp_output+0x5c [esp4] (no packet: no packet or flow could be found)")


def test_text_netns_without_name() -> None:
    event = decoder(names={}).decode(raw_event(context=abi.XtContext.NONE))
    assert " netns=4026532285 XfrmInNoStates++ " in line(event)


def test_text_stack_lines() -> None:
    event = decoder().decode(raw_event(context=abi.XtContext.NONE,
                                       stack=[0xFFFFFFFF81A00123, 0xFFFFFFFFC0400010]))
    first, *frames = line(event).split("\n")
    assert first.startswith(PREFIX)
    assert frames == ["    func_123+0x10", "    esp_input+0x10 [esp4]"]


@pytest.fixture
def berlin_time() -> Iterator[None]:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


def test_text_time_is_local_by_default(berlin_time: None) -> None:
    assert text.format_time(WALL_NS) == "2026-11-28 15:47:49.123456"  # CET, UTC+1
    assert text.format_time(WALL_NS, utc=True) == "2026-11-28 14:47:49.123456"


# --- JSON -------------------------------------------------------------------------------------


def test_json_keys_order_and_types() -> None:
    event = skb_event("ipv4-esp-in-udp")
    record = json.loads(jsonl.format_event(event))
    assert list(record) == EXPECTED_KEYS
    assert record["time"] == "2026-11-28T14:47:49.123456789Z"
    assert record["type"] == "xfrm_error" and record["node"] is None
    assert json.loads(jsonl.format_event(event, node="worker-3"))["node"] == "worker-3"
    assert (record["counter"], record["counter_index"]) == ("XfrmInNoStates", 2)
    assert (record["object"], record["function"], record["offset"]) == (
        "vmlinux", "xfrm_input", 0x123)
    assert record["address"] == 0xFFFFFFFF81A00123
    assert (record["netns"], record["netns_name"], record["netns_verified"]) == (
        4026532285, "blue", True)
    assert (record["context"], record["context_note"]) == ("skb", None)
    assert (record["proto"], record["proto_num"], record["encap"]) == ("udp", 17, "esp-in-udp")
    assert (record["spi"], record["seq"], record["sport"], record["dport"]) == (
        0xC1A2B3C4, 42, 4500, 4500)
    assert (record["skb_len"], record["packet_len"], record["truncated"]) == (116, 116, False)
    assert "stack" not in record
    fields = {f.name: f for f in jsonl.JSON_FIELDS}
    for key, value in record.items():
        allowed = JSON_TYPES[fields[key].type]
        assert isinstance(value, allowed), key
        assert not (isinstance(value, bool) and bool not in allowed), key  # bool is an int


def test_json_no_context_has_nulls() -> None:
    event = decoder(names={}).decode(raw_event(netns=0, context=abi.XtContext.NONE,
                                               flags=0))
    record = json.loads(jsonl.format_event(event))
    assert list(record) == EXPECTED_KEYS
    assert record["netns"] == 0 and record["netns_name"] is None
    assert record["netns_verified"] is False
    nulls = ["mark", "ifindex", "ifname", "family", "src", "dst", "proto", "proto_num", "spi",
             "seq", "encap", "sport", "dport", "skb_len", "packet_len", "malformed"]
    assert all(record[key] is None for key in nulls)
    assert record["context"] == "none" and record["context_note"]


def test_json_stack_only_when_present() -> None:
    event = decoder().decode(raw_event(stack=[0xFFFFFFFF81A00123]))
    record = json.loads(jsonl.format_event(event))
    assert list(record) == EXPECTED_KEYS + ["stack"]
    assert record["stack"] == ["func_123+0x10"]


def test_json_is_one_line_with_unicode_kept() -> None:
    event = skb_event("ipv4-esp", comm="k\u00e4se\nworker".encode())
    out = jsonl.format_event(event)
    assert "\n" not in out and "käse" in out
    assert json.loads(out)["comm"] == "käse\nworker"


@pytest.mark.parametrize(
    "ns, expected",
    [
        (0, "1970-01-01T00:00:00.000000000Z"),
        (1, "1970-01-01T00:00:00.000000001Z"),
        (WALL_NS, "2026-11-28T14:47:49.123456789Z"),
        (1_700_000_000_999_999_999, "2023-11-14T22:13:20.999999999Z"),
    ],
)
def test_rfc3339_ns(ns: int, expected: str) -> None:
    assert jsonl.rfc3339_ns(ns) == expected


def test_json_time_is_utc_whatever_the_local_zone(berlin_time: None) -> None:
    assert json.loads(jsonl.format_event(XfrmErrorEvent(time_ns=WALL_NS)))["time"] == (
        "2026-11-28T14:47:49.123456789Z")


def test_json_fields_markdown() -> None:
    table = jsonl.json_fields_markdown()
    rows = table.strip().split("\n")
    assert rows[0] == "| Key | Type | Meaning |" and len(rows) == 2 + len(EXPECTED_KEYS) + 2
    assert [row.split("`")[1] for row in rows[2:]] == EXPECTED_KEYS + ["stack", "explain"]
    assert table in (jsonl.__doc__ or "")


def test_json_fields_cover_the_event() -> None:
    # Every JSON key maps to an event attribute (or is computed), so nothing is silently null.
    names = {f.name for f in dataclasses.fields(XfrmErrorEvent)}
    assert {f.name for f in jsonl.JSON_FIELDS} - names == {"time", "type", "node"}


# --- both formats -----------------------------------------------------------------------------


def test_line_formatter() -> None:
    assert line_formatter("json") is jsonl.format_event
    assert set(LINE_FORMATS) == {"text", "json"}
    with pytest.raises(InputError, match="unknown output format 'xml': choose one of json, text"):
        line_formatter("xml")


OPTIONAL_INTS = st.one_of(st.none(), st.integers(0, 2**32 - 1))
OPTIONAL_TEXT = st.one_of(st.none(), st.sampled_from(["", "eth0", "udp", "blue", "10.0.0.1"]))


@settings(max_examples=200, deadline=None)
@given(
    context=st.sampled_from(["skb", "flow", "none"]),
    family=st.sampled_from([None, "ipv4", "ipv6"]),
    ints=st.fixed_dictionaries({name: OPTIONAL_INTS for name in (
        "mark", "ifindex", "spi", "seq", "sport", "dport", "icmp_type", "icmp_code",
        "fragment_offset", "skb_len", "packet_len", "proto_num")}),
    texts=st.fixed_dictionaries({name: OPTIONAL_TEXT for name in (
        "netns_name", "context_note", "ifname", "src", "dst", "proto", "malformed")}),
    encap=st.sampled_from([None, "esp", "esp-in-udp", "ah", "ipcomp"]),
    netns=st.sampled_from([0, 4026531840]),
    stack=st.one_of(st.none(), st.lists(st.sampled_from(["a+0x1", "b+0x2 [esp4]"]))),
)
def test_never_prints_none(context: str, family: Optional[str], ints: dict, texts: dict,
                           encap: Optional[str], netns: int, stack: Optional[list]) -> None:
    event = XfrmErrorEvent(time_ns=WALL_NS, counter="XfrmInError", function="f", netns=netns,
                           context=context, family=family, encap=encap, stack=stack,
                           **ints, **texts)
    rendered = text.format_event(event)
    assert "None" not in rendered and "null" not in rendered
    record = json.loads(jsonl.format_event(event))
    assert "None" not in json.dumps(record)
    assert list(record)[: len(EXPECTED_KEYS)] == EXPECTED_KEYS
