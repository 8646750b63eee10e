"""``xfrmtrace.decode.events``: raw ``struct xt_event`` records to ``XfrmErrorEvent``."""

from __future__ import annotations

import dataclasses
from typing import List

import pytest

from tests.fixtures.eventdata import (
    MONO_NS,
    NETNS,
    SITES,
    WALL_NS,
    decoder,
    net16,
    net32,
    packet,
    raw_event,
)
from xfrmtrace.bpf import abi
from xfrmtrace.decode.events import (
    NOTE_FLOW_FAMILY,
    NOTE_FROM_DATA,
    NOTE_NO_CONTEXT,
    PACKET_FIELDS,
    EventDecoder,
    XfrmErrorEvent,
)
from xfrmtrace.decode.packet import PacketInfo
from xfrmtrace.errors import DecodeError, XfrmtraceError
from xfrmtrace.kernel import counters


def ipv4_bytes(text: str) -> List[int]:
    return [int(part) for part in text.split(".")] + [0] * 12


def test_short_record_is_a_typed_error() -> None:
    raw = raw_event()
    with pytest.raises(DecodeError, match=r"record of 100 bytes .* \(672 bytes\)"):
        decoder().decode(raw[:100])
    assert issubclass(DecodeError, XfrmtraceError)


def test_longer_record_is_accepted() -> None:
    # Ring-buffer records are 8-byte aligned; a larger struct from a newer object still decodes.
    assert decoder().decode(raw_event() + bytes(8)).counter == "XfrmInNoStates"


def test_memoryview_and_bytearray() -> None:
    raw = raw_event(pkt=packet("ipv4-esp"))
    assert decoder().decode(memoryview(raw)) == decoder().decode(bytearray(raw))


def test_skb_esp_event_every_field() -> None:
    pkt = packet("ipv4-esp")
    event = decoder().decode(raw_event(
        pkt=pkt, skb_len=len(pkt), mark=0xD00, ifindex=2, ifname=b"eth0",
        skb_protocol=net16(0x0800), mib_ptr=0xFFFF888000123000,
    ))
    assert event == XfrmErrorEvent(
        time_ns=WALL_NS, monotonic_ns=MONO_NS, counter="XfrmInNoStates", counter_index=2,
        site_id=7, object="vmlinux", function="xfrm_input", offset=0x123,
        address=SITES[7].address, netns=NETNS, netns_name="blue", netns_verified=True,
        netns_source="site_reg", cpu=1, pid=4242, tgid=4240, comm="ping", context="skb",
        context_note=None, mark=0xD00, ifindex=2, ifname="eth0", family="ipv4",
        src="192.168.112.29", dst="192.168.139.255", proto="esp", proto_num=50, spi=3, seq=3,
        encap="esp", skb_len=len(pkt), packet_len=len(pkt), truncated=False, packet=pkt,
        mib_ptr=0xFFFF888000123000,
    )
    assert event.site_label == "xfrm_input+0x123"


def test_skb_protocol_is_read_in_network_byte_order() -> None:
    # An ARP ethertype stops decoding: proves the byte swap, which 0x0800 could not.
    event = decoder().decode(raw_event(pkt=packet("ipv4-esp"), skb_protocol=net16(0x0806)))
    assert event.malformed == "not an IP packet (ethertype 0x0806)" and event.src is None


def test_skb_esp_in_udp_ipv6() -> None:
    event = decoder().decode(raw_event(pkt=packet("ipv6-esp-in-udp"),
                                       skb_protocol=net16(0x86DD)))
    assert (event.family, event.src, event.dst) == ("ipv6", "2001:db8::1", "2001:db8:0:1::2")
    assert (event.proto, event.sport, event.dport) == ("udp", 4500, 4500)
    assert (event.encap, event.spi, event.seq) == ("esp-in-udp", 0x7F000001, 1000)


def test_skb_only_valid_packet_bytes_are_used() -> None:
    raw = bytearray(raw_event(pkt=packet("ipv4-esp")[:24]))
    offset = abi.XtEvent.pkt.offset
    raw[offset + 24:offset + 256] = b"\xee" * 232  # not zeroed by the BPF program
    event = decoder().decode(bytes(raw))
    assert event.packet_len == 24 and event.truncated and event.spi is None


def test_skb_bogus_pkt_len_is_clamped() -> None:
    event = decoder().decode(raw_event(pkt=packet("ipv4-esp"), pkt_len=100_000))
    assert event.packet_len == abi.XT_PKT_BYTES


def test_skb_truncated_flag_and_packet_from_data() -> None:
    flags = abi.XT_F_PKT_TRUNCATED | abi.XT_F_PKT_FROM_DATA
    event = decoder().decode(raw_event(pkt=packet("ipv4-esp"), flags=flags))
    assert event.truncated and event.spi == 3
    assert event.context_note == NOTE_FROM_DATA
    assert not event.netns_verified


def test_skb_read_failed() -> None:
    event = decoder().decode(raw_event(context_note=abi.XtContextNote.READ_FAILED))
    assert event.context == "skb" and event.context_note == "kernel memory read failed"
    assert event.packet_len == 0 and event.family is None


def test_skb_without_device() -> None:
    event = decoder().decode(raw_event(pkt=packet("ipv4-esp")))
    assert (event.ifindex, event.ifname, event.mark) == (None, None, 0)


def test_flow_ipv4_udp() -> None:
    event = decoder().decode(raw_event(
        context=abi.XtContext.FLOW, flow_family=2, flow_saddr=ipv4_bytes("10.0.0.1"),
        flow_daddr=ipv4_bytes("10.0.0.2"), flow_proto=17, flow_sport=net16(33333),
        flow_dport=net16(4500), flow_mark=0xD00, flow_oif=3,
    ))
    assert (event.context, event.family, event.src, event.dst) == (
        "flow", "ipv4", "10.0.0.1", "10.0.0.2")
    assert (event.proto, event.proto_num, event.sport, event.dport) == ("udp", 17, 33333, 4500)
    assert (event.mark, event.ifindex, event.skb_len, event.packet_len) == (0xD00, 3, None, None)
    assert event.spi is None and event.encap is None and event.context_note is None


def test_flow_icmp_type_and_code_overlay_dport() -> None:
    # struct flowi_uli: icmpt.type and .code are the first and second bytes of ports.dport.
    event = decoder().decode(raw_event(
        context=abi.XtContext.FLOW, flow_family=2, flow_proto=1,
        flow_dport=net16(0x0800 | 3),
    ))
    assert (event.proto, event.icmp_type, event.icmp_code) == ("icmp", 8, 3)
    assert event.sport is None and event.dport is None


def test_flow_ipv6_esp_spi() -> None:
    saddr = list(bytes.fromhex("fd000000000000000000000000000001"))
    daddr = list(bytes.fromhex("fd000000000000000000000000000002"))
    event = decoder().decode(raw_event(
        context=abi.XtContext.FLOW, flow_family=10, flow_saddr=saddr, flow_daddr=daddr,
        flow_proto=50, flow_spi=net32(0xC0FFEE01),
    ))
    assert (event.family, event.src, event.dst) == ("ipv6", "fd00::1", "fd00::2")
    assert (event.proto, event.encap, event.spi, event.seq) == ("esp", "esp", 0xC0FFEE01, None)
    assert event.ifindex is None and event.mark == 0


def test_flow_unknown_family_and_any_protocol() -> None:
    event = decoder().decode(raw_event(context=abi.XtContext.FLOW, flow_family=0, flow_proto=0))
    assert event.family is None and event.src is None
    assert event.proto is None and event.proto_num is None
    assert event.context_note == NOTE_FLOW_FAMILY


@pytest.mark.parametrize(
    "note, text",
    [
        (abi.XtContextNote.OK, NOTE_NO_CONTEXT),
        (abi.XtContextNote.NO_ARGS, "function has no skb/flowi argument"),
        (abi.XtContextNote.DEPTH_UNKNOWN, "stack depth at the site is unknown"),
        (abi.XtContextNote.FRAME_MISSING, "entry of the function was not seen"),
        (abi.XtContextNote.READ_FAILED, "kernel memory read failed"),
        (99, "context note 99"),
    ],
)
def test_no_context(note: int, text: str) -> None:
    event = decoder().decode(raw_event(pkt=packet("ipv4-esp"), context=abi.XtContext.NONE,
                                       context_note=note, mark=5))
    assert (event.context, event.context_note) == ("none", text)
    # Nothing from the skb/flow part leaks into a no-context event.
    packet_fields = ["mark", "ifindex", "family", "src", "proto", "spi", "skb_len", "packet_len"]
    assert all(getattr(event, name) is None for name in packet_fields)


def test_every_context_note_has_text() -> None:
    for note in abi.XtContextNote:
        if note != abi.XtContextNote.OK:
            text = decoder().decode(raw_event(context_note=note)).context_note
            assert text and not text.startswith("context note")


def test_unregistered_site_falls_back_to_symbols_and_counter_names() -> None:
    event = decoder().decode(raw_event(site_id=500, site_addr=0xFFFFFFFFC0401F2A, counter=13))
    assert (event.object, event.function, event.offset) == ("esp4", "esp_input", 0xF2A)
    assert event.counter == "XfrmOutNoStates"
    assert event.site_label == "esp_input+0xf2a [esp4]"


def test_counter_names_are_spelled_as_proc_spells_them() -> None:
    """Linux 7.2's enum (BTF) as the kernel numbers it: every name as /proc/net/xfrm_stat
    shows it, even the one whose enumerator is spelled otherwise (LINUX_MIB_XFRMOUTNOQSPACE
    is "XfrmOutNoQueueSpace"), with or without /proc at hand."""
    enum = {"LINUX_MIB_XFRMNUM": 0, "__LINUX_MIB_XFRMMAX": len(counters.KNOWN_NAMES) + 1}
    enum.update({"LINUX_MIB_" + name.upper(): n
                 for n, name in enumerate(counters.KNOWN_NAMES, start=1)})
    enum["LINUX_MIB_XFRMOUTNOQSPACE"] = enum.pop("LINUX_MIB_XFRMOUTNOQUEUESPACE")
    expected = dict(enumerate(counters.KNOWN_NAMES, start=1))
    assert counters.counter_names(enum) == expected
    assert counters.counter_names(enum, proc_names=counters.KNOWN_NAMES) == expected
    # A counter no list knows yet is spelled from its words.
    assert counters.counter_names({"LINUX_MIB_XFRMOUTPOLMODEERROR": 40}) == {
        40: "XfrmOutPolModeError"}


def test_site_id_with_other_address_is_not_trusted() -> None:
    event = decoder().decode(raw_event(site_id=7, site_addr=0xFFFFFFFF81000500))
    assert (event.function, event.offset) == ("func_500", 0x10)


def test_unknown_counter() -> None:
    event = decoder().decode(raw_event(site_id=500, counter=99))
    assert (event.counter, event.counter_index) == ("counter#99", 99)


def test_unparsable_symbol() -> None:
    dec = EventDecoder({}, {}, clock=lambda t: t, netns_name=lambda n: None,
                       symbolize=lambda a: "")
    event = dec.decode(raw_event(site_addr=0xFFFFFFFF81000500))
    assert (event.object, event.function, event.offset) == ("vmlinux", "0xffffffff81000500", 0)


def test_module_site() -> None:
    event = decoder().decode(raw_event(site_id=8, site_addr=SITES[8].address, counter=22))
    assert (event.object, event.counter) == ("esp4", "XfrmOutStateProtoError")
    assert event.site_label == "esp_output+0x5c [esp4]"


def test_stack() -> None:
    stack = [0xFFFFFFFF81A00123, 0xFFFFFFFFC0400010, 0xFFFFFFFF81000042]
    event = decoder().decode(raw_event(stack=stack))
    assert event.stack == ["func_123+0x10", "esp_input+0x10 [esp4]", "func_42+0x10"]


def test_no_stack_without_flag() -> None:
    raw = raw_event(stack=[0xFFFFFFFF81A00123])
    cleared = abi.XtEvent.from_buffer_copy(raw)
    cleared.flags &= ~abi.XT_F_HAS_STACK
    assert decoder().decode(bytes(cleared)).stack is None


def test_netns_unknown_is_not_looked_up() -> None:
    calls: List[int] = []

    def name(inode: int) -> None:
        calls.append(inode)

    dec = EventDecoder(SITES, {}, clock=lambda t: t, netns_name=name, symbolize=str)
    event = dec.decode(raw_event(netns=0, netns_source=abi.XtNetnsSource.UNKNOWN))
    assert (event.netns, event.netns_name, event.netns_source, calls) == (0, None, "unknown", [])


def test_unnamed_netns() -> None:
    assert decoder(names={}).decode(raw_event()).netns_name is None


def test_comm_with_invalid_utf8() -> None:
    event = decoder().decode(raw_event(comm=b"k\xffworker"))
    assert event.comm == "k\ufffdworker"


def test_event_fields_are_documented_types() -> None:
    # Outputs rely on these names; a rename here must be a deliberate change to the outputs.
    names = [f.name for f in dataclasses.fields(XfrmErrorEvent)]
    assert names[:4] == ["time_ns", "monotonic_ns", "counter", "counter_index"]
    assert {"stack", "packet", "truncated", "malformed", "context_note"} <= set(names)


def test_every_packet_field_is_an_event_field_of_the_same_type() -> None:
    # _fill_skb copies PACKET_FIELDS by name with setattr, which would not notice a field the
    # event lacks (it would become an attribute no output shows).
    event_fields = {f.name: f.type for f in dataclasses.fields(XfrmErrorEvent)}
    for field in dataclasses.fields(PacketInfo):
        assert field.name in event_fields, field.name
        assert event_fields[field.name] == field.type, field.name
    assert set(PACKET_FIELDS) == {f.name for f in dataclasses.fields(PacketInfo)}
