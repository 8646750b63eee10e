"""pcapng output, read back by tshark (Wireshark's own reader and dissectors)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures.eventdata import WALL_NS, decoder, packet, raw_event
from xfrmtrace.bpf import abi
from xfrmtrace.output.pcapng import PcapngWriter, event_comments

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark not installed (make deps)")


def _event(name: str, **fields):
    pkt = packet(name)
    return decoder().decode(raw_event(pkt=pkt, skb_len=len(pkt), mark=0xD00, ifindex=2,
                                      ifname=b"eth0", **fields))


def _tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    argv = [TSHARK, "-r", str(path), "-T", "fields", "-E", "separator=|",
            "-E", "occurrence=a", "-E", "aggregator=;"]
    for name in fields:
        argv += ["-e", name]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    # tshark warns when run as root; anything else on stderr is a reading problem.
    problems = [line for line in out.stderr.splitlines() if line and "Running as user" not in line]
    assert problems == [], out.stderr
    return [line.split("|") for line in out.stdout.splitlines()]


@needs_tshark
def test_tshark_reads_esp_spi_seq_and_comments(tmp_path: Path) -> None:
    v4 = _event("ipv4-esp")
    v4.explain = SimpleNamespace(summary="SA spi 0x3 dst 192.168.139.255 was deleted 0.3s before")
    v6 = _event("ipv6-esp")
    path = tmp_path / "events.pcapng"
    with open(path, "wb") as stream:
        writer = PcapngWriter(stream)
        assert writer.write_event(v4) and writer.write_event(v6)
    rows = _tshark_fields(path, "esp.spi", "esp.sequence", "frame.comment", "ip.dst", "ipv6.dst",
                          "frame.time_epoch")
    assert len(rows) == 2
    spi, seq, comments, ip_dst, _v6dst, epoch = rows[0]
    assert int(spi, 16) == v4.spi and int(seq) == v4.seq and ip_dst == v4.dst
    assert comments.split(";") == [
        "XfrmInNoStates at xfrm_input+0x123, netns 4026532285 (blue), mark 0xd00, if 2 (eth0)",
        "why: SA spi 0x3 dst 192.168.139.255 was deleted 0.3s before"]
    assert epoch.startswith(str(WALL_NS // 1_000_000_000)) and epoch.endswith("123456789")
    assert int(rows[1][0], 16) == v6.spi and rows[1][4] == v6.dst


@needs_tshark
def test_truncated_packet_keeps_its_original_length(tmp_path: Path) -> None:
    """A 256-byte copy of a longer packet is marked as cut, not as malformed."""
    full = bytearray(packet("ipv4-esp"))
    full[2:4] = (1400).to_bytes(2, "big")  # the IP header says 1400 bytes
    event = decoder().decode(raw_event(pkt=bytes(full), skb_len=1400,
                                       flags=abi.XT_F_NETNS_VERIFIED | abi.XT_F_PKT_TRUNCATED))
    path = tmp_path / "cut.pcapng"
    with open(path, "wb") as stream:
        PcapngWriter(stream).write_event(event)
    rows = _tshark_fields(path, "frame.len", "frame.cap_len", "esp.spi")
    assert rows == [["1400", str(len(full)), f"0x{event.spi:08x}"]]


def test_flow_events_write_nothing(tmp_path: Path) -> None:
    event = decoder().decode(raw_event(context=abi.XtContext.FLOW, flow_family=2))
    path = tmp_path / "flow.pcapng"
    with open(path, "wb") as stream:
        writer = PcapngWriter(stream)
        stream.flush()
        header = path.stat().st_size
        assert writer.write_event(event) is False
        stream.flush()
    assert writer.packets == 0 and path.stat().st_size == header


def test_comment_leaves_out_absent_fields() -> None:
    event = decoder().decode(raw_event(pkt=packet("ipv4-esp"), netns=0))
    assert event_comments(event) == ["XfrmInNoStates at xfrm_input+0x123, netns 0"]
