"""The benchmark code's pure parts (bench/stats.py, bench/report.py), without a VM."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bench import notes, report, stats
from bench.offline import _CutKallsyms
from vmlab.guest import probestats

REPO = Path(__file__).resolve().parents[1]

# ---- statistics and formatting -------------------------------------------------------------


def test_spread_median_and_range() -> None:
    s = stats.Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.relative_range == pytest.approx(9.0 / 2.5)
    with pytest.raises(ValueError):
        stats.Spread.of([])


def test_ratios() -> None:
    assert stats.ratio(99.0, 100.0) == pytest.approx(0.99)
    assert stats.ratio(1.0, 0.0) is None
    # Round by round; a zero baseline (failed run) is skipped, not divided by.
    assert stats.paired_ratios([99, 50, 101], [100, 0, 100]) == pytest.approx([0.99, 1.01])


@pytest.mark.parametrize("value,text", [
    (0, "0"), (None, "n/a"), (0.0123456, "0.0123"), (1.23456, "1.23"), (12.3456, "12.3"),
    (123.456, "123"), (1234.5, "1,234"), (98765.4, "98,765"), (-2.5, "-2.50"),
])
def test_fmt(value, text) -> None:
    assert stats.fmt(value) == text


def test_fmt_percent() -> None:
    assert stats.fmt_percent(0.987) == "-1.30 %"
    assert stats.fmt_percent(1.0) == "+0.00 %"
    assert stats.fmt_percent(None) == "n/a"


def test_markdown_table() -> None:
    text = stats.markdown_table(("a", "b"), [[1, "x|y"], ["z", 2.5]])
    assert text.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | x\\|y |", "| z | 2.5 |"]
    with pytest.raises(ValueError):
        stats.markdown_table(("a", "b"), [[1]])


# ---- parsing tool output -------------------------------------------------------------------


def test_bpftrace_attach_line() -> None:
    assert stats.bpftrace_attach_count("Attaching 1 probe...\n") == 1
    assert stats.bpftrace_attach_count("Attaching 12 probes...") == 12
    assert stats.bpftrace_attach_count("ERROR: Error attaching probe: 'kprobe:x'") is None
    assert stats.bpftrace_attach_count("") is None


def test_iperf3_report() -> None:
    report_json = json.dumps({"start": {}, "end": {"sum_sent": {"bits_per_second": 2e8},
                                                   "sum_received": {"bits_per_second": 1.5e8}}})
    assert stats.iperf3_bits_per_second(report_json) == 1.5e8
    with pytest.raises(ValueError, match="unable to connect"):
        stats.iperf3_bits_per_second(json.dumps({"start": {}, "end": {},
                                                 "error": "unable to connect to server"}))
    with pytest.raises(ValueError):
        stats.iperf3_bits_per_second(json.dumps({"end": {}}))


SUMMARY = {"type": "summary", "counters": {"XfrmInNoStates": 7, "XfrmInNoPols": 1},
           "sites": [{"counter": "XfrmInNoStates", "count": 5, "netns": {"111": 4, "222": 1}},
                     {"counter": "XfrmInNoStates", "count": 2, "netns": {"111": 2}},
                     {"counter": "XfrmInNoPols", "count": 1, "netns": {"222": 1}}],
           "events": 3, "lost": 4, "sampled": 0}


def test_summary_from_json_lines_and_per_netns_counts() -> None:
    text = ('{"type":"xfrm_error","counter":"XfrmInNoStates"}\n'
            + json.dumps(SUMMARY) + "\nnot json\n")
    summary = stats.last_json_line(text, "summary")
    assert summary == SUMMARY
    assert stats.last_json_line("{}\n", "summary") is None
    assert stats.summary_counts_for_netns(summary, 111) == {"XfrmInNoStates": 6}
    assert stats.summary_counts_for_netns(summary, 222) == {"XfrmInNoStates": 1,
                                                           "XfrmInNoPols": 1}
    assert stats.summary_counts_for_netns(summary, 333) == {}


def test_count_events_in_output() -> None:
    data = (b'{"time":"t","type":"xfrm_error","counter":"X"}\n'
            b'{"type": "xfrm_error"}\n{"type":"sa","action":"added"}\n')
    assert stats.count_xfrm_events(data) == 2


def test_output_growth() -> None:
    samples = [(0.0, 10), (0.25, 10), (0.5, 40), (0.75, 40), (1.0, 90), (1.25, 90)]
    assert stats.output_growth(samples) == (0.5, 1.0)
    assert stats.output_growth([(0.0, 5), (1.0, 5)]) == (None, None)


def test_xfrm_state_packets() -> None:
    text = ("src 10.81.0.1 dst 10.81.0.2\n"
            "\tproto esp spi 0x00001000 reqid 1 mode tunnel\n"
            "\tlifetime current:\n"
            "\t  123456(bytes), 789(packets)\n"
            "\t  add 2026-11-28 06:00:00 use 2026-11-28 06:00:01\n"
            "src 10.81.0.2 dst 10.81.0.1\n"
            "\tlifetime current:\n"
            "\t  0(bytes), 0(packets)\n")
    assert probestats.xfrm_state_packets(text) == 789
    assert probestats.xfrm_state_packets("") == 0


def test_resolver_log_times() -> None:
    stderr = ("xfrmtrace: INFO: kernel BTF, kallsyms and kcore opened (7.90s)\n"
              "xfrmtrace: INFO: vmlinux: 55 sites resolved (1.22s)\n"
              "xfrmtrace: INFO: esp4: 1 sites from cache (0.02s)\n")
    times = stats.resolver_log_times(stderr)
    assert times == {"objects": {"vmlinux": 1.22, "esp4": 0.02},
                     "sites": {"vmlinux": 55, "esp4": 1}, "open_seconds": 7.9}


def test_start_breakdown() -> None:
    timeline = [
        (20.0, "xfrmtrace: INFO: kernel BTF, kallsyms and kcore opened (5.00s)"),
        (21.0, "xfrmtrace: INFO: vmlinux: 55 sites from cache (0.50s)"),
        (22.0, "xfrmtrace: INFO: esp4: 1 sites from cache (0.01s)"),
        (30.0, "xfrmtrace: INFO: BPF object loaded (6.00s)"),
        (33.0, "xfrmtrace: INFO: 60 site and 5 entry probes attached, 4 functions need none "
               "(9.00s)"),
        (33.5, "Attached 60/60 probes (+5 recording packet context, 4 functions need none)"),
    ]
    assert stats.start_breakdown(timeline, 35.0) == {
        "interpreter": 15.0, "kernel_view": 5.0, "sites": 2.0, "session_setup": 2.0,
        "bpf_load": 6.0, "attach": 3.0, "rest": 2.0}
    assert stats.start_breakdown([], 3.0) == {}


# ---- the broad probe set ---------------------------------------------------------------------


@pytest.mark.parametrize("insn,disp", [
    ("inc qword ptr gs:[rax + 0x10]", 16),
    ("add qword ptr gs:[rdx + 0xf0], 1", 240),
    ("inc qword ptr gs:[rax]", 0),
    ("inc qword ptr gs:[rax - 8]", -8),
    ("inc qword ptr [rax + 0x10]", None),
])
def test_gs_displacement(insn, disp) -> None:
    assert stats.gs_displacement(insn) == disp


def test_is_increment() -> None:
    assert stats.is_increment("inc qword ptr gs:[rax + 8]")
    assert stats.is_increment("add qword ptr gs:[rax + 8], 1")
    assert stats.is_increment("add qword ptr gs:[rax + 8], 0x1")
    assert not stats.is_increment("add qword ptr gs:[rax + 8], 2")
    assert not stats.is_increment("add qword ptr gs:[rax + 8], 0x10")
    assert not stats.is_increment("inc dword ptr gs:[rax + 8]")


def test_broad_probe_addresses() -> None:
    def entry(address, insn, classification="other", reason="register comes from rdi"):
        return {"address": address, "instruction": insn, "classification": classification,
                "reason": reason}

    audit = [
        entry(5, "inc qword ptr gs:[rax + 0x10]"),                       # kept
        entry(1, "add qword ptr gs:[rdx + 0xf0], 1"),                    # kept (at the limit)
        entry(2, "inc qword ptr gs:[rax + 0xf8]"),                       # too large
        entry(3, "inc qword ptr gs:[rax + 0x14]"),                       # not a multiple of 8
        entry(4, "inc qword ptr gs:[rax + 0x18]", "xfrm", "loaded from"),  # the tool's own
        entry(6, "add qword ptr gs:[rax + 0x20], 2"),                    # adds more than one
        entry(7, "", reason="not an instruction boundary"),              # no instruction
        entry(8, "inc qword ptr gs:[rax]"),                              # displacement 0
        entry(5, "inc qword ptr gs:[rax + 0x10]"),                       # duplicate
    ]
    assert stats.broad_probe_addresses(audit, 0xF0) == [1, 5]


# ---- packets -------------------------------------------------------------------------------


def test_ipv4_checksum_known_header() -> None:
    # The classic example header (Wikipedia, "IPv4 header checksum"): checksum 0xb861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert stats.ipv4_checksum(header) == 0xB861
    filled = header[:10] + b"\xb8\x61" + header[12:]
    assert stats.ipv4_checksum(filled) == 0


def test_esp_frame() -> None:
    frame = stats.esp_frame("02:00:00:00:00:02", "02:00:00:00:00:01", "10.83.0.1",
                            "10.83.0.2", 0xDEAD0001, seq=7, payload=64)
    assert frame[:6] == bytes.fromhex("020000000002") and frame[6:12] == bytes.fromhex(
        "020000000001")
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:34]
    version_ihl, total, proto = ip[0], struct.unpack("!H", ip[2:4])[0], ip[9]
    assert (version_ihl, proto, total) == (0x45, 50, 20 + 8 + 64)
    assert stats.ipv4_checksum(ip) == 0
    assert ip[12:16] == bytes([10, 83, 0, 1]) and ip[16:20] == bytes([10, 83, 0, 2])
    assert struct.unpack("!II", frame[34:42]) == (0xDEAD0001, 7)
    assert len(frame) == 14 + total
    with pytest.raises(ValueError):
        stats.esp_frame("02:00", "02:00:00:00:00:01", "10.0.0.1", "10.0.0.2", 1)
    with pytest.raises(ValueError):
        stats.esp_frame("02:00:00:00:00:02", "02:00:00:00:00:01", "10.0.0.256", "10.0.0.2", 1)


def test_trafgen_packet_round_trips() -> None:
    frame = bytes(range(20))
    text = stats.trafgen_packet(frame)
    assert text.startswith("{ 0x00, 0x01,") and text.endswith(" }\n")
    assert bytes(int(b, 16) for b in text.strip("{} \n").split(", ")) == frame


# ---- kernel files --------------------------------------------------------------------------


def _bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    start = ((setup_sects or 4) + 1) * 512 + 0x300  # 0 setup sectors means 4
    image = bytearray(start + len(payload))
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 0x300, len(payload))
    image[start:start + len(payload)] = payload
    return bytes(image)


def test_bzimage_payload() -> None:
    payload = b"\x28\xb5\x2f\xfd" + b"zstd frame" + (10).to_bytes(4, "little")
    assert stats.bzimage_payload(_bzimage(payload)) == ("zstd", payload)
    xz = b"\xfd7zXZ\x00rest"
    assert stats.bzimage_payload(_bzimage(xz, setup_sects=0)) == ("xz", xz)
    with pytest.raises(ValueError, match="HdrS"):
        stats.bzimage_payload(bytes(4096))
    with pytest.raises(ValueError, match="compression"):
        stats.bzimage_payload(_bzimage(b"\x00\x01\x02\x03"))


def test_extract_vmlinux_from_xz_bzimage(tmp_path) -> None:
    """A fake bzImage around an xz-compressed 'ELF' decompresses to it (size appended as
    the kernel build appends it)."""
    import lzma

    from bench.offline import extract_vmlinux

    elf = b"\x7fELF" + bytes(1000)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ) + len(elf).to_bytes(4, "little")
    image = tmp_path / "vmlinuz-test"
    image.write_bytes(_bzimage(payload))
    out = extract_vmlinux(image, tmp_path / "vmlinux-test")
    assert out.read_bytes() == elf


def test_kallsyms_text_sizes() -> None:
    text = ("ffffffff81000000 T _stext\n"
            "ffffffff81000010 T start_kernel\n"
            "ffffffff82000000 D some_data\n"
            "ffffffff81800000 T _etext\n"
            "ffffffffc0001000 t esp_init\t[esp4]\n"
            "ffffffffc0001800 T esp_output\t[esp4]\n"
            "ffffffffc0002000 d esp_data\t[esp4]\n"
            "ffffffffc0010000 t vti_rcv\t[ip_vti]\n")
    assert stats.kallsyms_text_sizes(text) == {"vmlinux": 0x800000, "esp4": 0x800,
                                               "ip_vti": 0}


def test_cut_kallsyms_ends_vmlinux_text_early() -> None:
    from xfrmtrace.kernel.kallsyms import Kallsyms

    syms = Kallsyms.parse("ffffffff81000000 T _stext\nffffffff81000100 T f\n"
                          "ffffffff81001000 T _etext\n")
    cut = _CutKallsyms(syms, 0xFFFFFFFF81000800)
    assert cut.core_text_range() == (0xFFFFFFFF81000000, 0xFFFFFFFF81000800)
    assert cut.lookup(0xFFFFFFFF81000104).name == "f"  # everything else is the real table


# ---- the report ----------------------------------------------------------------------------


def _guest() -> dict:
    runs = []
    for r in range(3):
        for config, factor in (("baseline", 1.0), ("tool", 0.995), ("tool-stopped", 0.998),
                               ("broad", 0.9)):
            for traffic, bps in (("esp", 30e6), ("plain", 500e6)):
                runs.append({"round": r, "config": config, "traffic": traffic,
                             "bps": bps * factor * (1 + 0.01 * r), "guest_idle_share": 0.01,
                             **({"tool_cpu_share": 0.05} if config == "tool" else {})})
    delta = {"XfrmInNoStates": 150000}
    storm_runs = {
        "baseline": {"delta": delta, "seconds": 10.0, "steady_rate": 15500.0},
        "tool": {"delta": delta, "seconds": 10.0, "steady_rate": 14000.0,
                 "tool_counts": delta, "after_stop": {},
                 "summary": {"events": 9000, "lost": 141000, "sampled": 0},
                 "events_written": 9000, "output_last_growth": 15.0, "output_in_storm": 0,
                 "tool": {"output_bytes": 9 << 20, "peak_rss_kib": 150 * 1024}},
        "tool-rate-limit": {"delta": delta, "seconds": 10.0, "steady_rate": 15000.0,
                            "tool_counts": {"XfrmInNoStates": 149999}, "after_stop": {},
                            "summary": {"events": 1000, "lost": 0, "sampled": 149000},
                            "events_written": 1000, "output_last_growth": 10.0,
                            "output_in_storm": 900000,
                            "tool": {"output_bytes": 1 << 20, "peak_rss_kib": 90 * 1024}},
    }
    return {
        "kernel": "6.12.0-test-amd64", "cpus": 2, "counters": 30, "errors": {},
        "phases": {
            "hotpath": {"runs": runs, "rounds": 3, "seconds": 5, "broad_addresses": 438,
                        "configs": [{"round": 0, "kprobes_tool": 72, "kprobes_broad": 503,
                                     "broad": {"attached": 431, "hits": 1000,
                                               "seconds": 10.0}}],
                        "tool_kprobes": [
                            "ffffffff8dda53a4  k  xfrm_input+0x4    [FTRACE]",
                            "ffffffff8dda5400  k  xfrm_input+0x569    ",
                            "ffffffffc0a01004  k  esp_input_done2+0x0  [esp4] [FTRACE]",
                            "ffffffff8d000004  k  validate_xmit_xfrm+0x4    [FTRACE]"],
                        "profile": {"esp": {"packets": 1000, "bps": 1.0,
                                            "xt_entry": {"run_cnt": 7000,
                                                         "run_time_ns": 7000 * 3600},
                                            "xt_site": {"run_cnt": 0, "run_time_ns": 0}}}},
            "storm": {"runs": storm_runs, "rate_limit": 100, "seconds": 10.0},
            "startup": {"cold": [70.0, 72.0], "warm": [60.0, 66.0], "bpftrace": [5.0, 4.0]},
            "resolver": {"seconds": 46.0, "log": {"objects": {"vmlinux": 1.2, "esp4": 0.02},
                                                  "sites": {"vmlinux": 55, "esp4": 1},
                                                  "open_seconds": 7.9}},
        },
    }


OFFLINE = {"cli": {"wall": [0.6, 0.7, 0.65], "resolve": [0.04, 0.05, 0.05], "sites": 55},
           "text_sizes": {"vmlinux": 16 << 20, "esp4": 4096},
           "growth": [{"fraction": f, "text_bytes": int((16 << 20) * f),
                       "seconds": [0.01 * f, 0.012 * f], "sites": int(55 * f),
                       "candidates": int(668 * f)} for f in (0.25, 0.5, 0.75, 1.0)]}
META = {"date": "2026-11-28 06:00 UTC", "host_cpu": "AMD EPYC", "host_cores": 2,
        "memory": "4G", "idle": True, "idle_text": "yes", "total_text": "22.0 min",
        "package": "6.12.117-1"}


def test_hot_path_summary_uses_round_by_round_ratios() -> None:
    summary = report.hot_path(_guest()["phases"]["hotpath"])
    assert summary["esp"]["tool"]["paired"].median == pytest.approx(0.995)
    assert summary["plain"]["broad"]["paired"].median == pytest.approx(0.9)
    assert summary["esp"]["baseline"]["mbps"].median == pytest.approx(30.3)


def test_storm_summary() -> None:
    s = report.storm(_guest()["phases"]["storm"])
    assert s["tool"]["exact"] is True
    assert s["tool-rate-limit"]["exact"] is False  # one increment short
    assert s["tool"]["decoded_per_second"] == pytest.approx(600.0)
    assert s["baseline"]["rate"] == 15000.0
    assert s["tool"]["peak_rss_mib"] == 150.0


def test_render_has_every_figure_and_verdicts() -> None:
    guest = _guest()
    meta = {**META, "notes_sections": notes.notes_sections(META, guest, OFFLINE)}
    text = report.render(meta, guest, OFFLINE)
    for needle in ("1. TCP through ESP tunnel", "1. TCP over plain veth",
                   "2. XfrmInNoStates per second", "2. tool totals = /proc/net/xfrm_stat delta",
                   "2. events decoded per second", "2. events lost", "2. peak RSS",
                   "3. seconds until ready", "4. seconds to resolve all sites",
                   "4. growth: first 25% of vmlinux text", "TCG (no KVM)", "AMD EPYC",
                   "6.12.0-test-amd64", "2026-11-28"):
        assert needle in text, needle
    table = [line for line in text.splitlines() if line.startswith("| 1. TCP through ESP")]
    tool_row = next(line for line in table if "| xfrmtrace |" in line)
    assert "| 0.995 (0.995–0.995) | ≥ 0.99 | yes |" in tool_row
    rss_rows = [line for line in text.splitlines() if line.startswith("| 2. peak RSS")]
    assert "**no**" in rss_rows[0] and rss_rows[1].endswith("| yes |")
    assert "| 1,000 = 150,000 |" not in text  # the rate-limited totals are 149,999
    assert "149,999 = 150,000" in text
    startup = next(line for line in text.splitlines() if "no site cache" in line)
    assert "| 71.0 | 70.0–72.0 | 15.8 |" in startup


def test_entry_functions_from_kprobes_list() -> None:
    hot = _guest()["phases"]["hotpath"]
    assert notes.entry_functions(hot["tool_kprobes"]) == [
        "xfrm_input", "esp_input_done2 [esp4]", "validate_xmit_xfrm"]


def test_notes_explain_the_hot_path() -> None:
    text = "\n".join(notes.notes_sections(META, _guest(), OFFLINE))
    assert "0.995 with the tool" in text and "0.998 with the tool stopped" in text
    assert "`xt_entry` 7.00 times per packet" in text and "3.60 µs each" in text
    assert "every packet any device transmits" in text
    assert "**met** for ESP tunnel traffic" in text
    assert "5.0% of one vCPU" in text


def test_render_reports_failed_phases() -> None:
    guest = _guest()
    guest["errors"] = {"storm": "Traceback ...\nRuntimeError: trafgen failed"}
    del guest["phases"]["storm"]
    text = report.render({**META, "notes_sections": []}, guest, None)
    assert "## Phases that failed" in text and "trafgen failed" in text
    assert "2. XfrmInNoStates" not in text


def test_healthy_headline_per_kernel_and_traffic() -> None:
    profiles = {
        "6.12": {"kernel": "6.12.117+deb13-amd64", "kinds": {
            "esp-tcp": {"packets": 2000, "xt_entry": {"run_cnt": 6}, "xt_site": {"run_cnt": 0}},
            "esp-ping": {"packets": 200, "xt_entry": {"run_cnt": 402},
                         "xt_site": {"run_cnt": 0}},
            "plain-tcp": {"packets": 0, "xt_entry": {"run_cnt": 0}, "xt_site": {"run_cnt": 0}},
        }},
        "5.10": {"error": "boot failed"},
    }
    text = "\n".join(report.healthy_section(profiles))
    (row_612,) = [line for line in text.splitlines() if line.startswith("| 6.12 ")]
    cells = [c.strip() for c in row_612.strip("|").split("|")]
    kinds = dict(zip(report.HEALTHY_KINDS, cells[1:]))
    assert kinds["esp-tcp"] == "0.00" and kinds["esp-ping"] == "2.01"
    assert kinds["plain-tcp"] == "?" and kinds["esp-udp"] == "?"  # no packets / not measured
    assert "| 5.10 (?) | failed |" in text
    assert report.healthy_section(None) == []
