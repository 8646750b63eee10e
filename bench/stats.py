"""Pure helpers of the benchmarks: statistics, parsing, packet and table building.

Nothing here touches the system, so ``tests/test_bench.py`` checks all of it on the host.
"""

from __future__ import annotations

import json
import re
import statistics
import struct
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# --- statistics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        data = [float(v) for v in values]
        if not data:
            raise ValueError("no measurements")
        return cls(statistics.median(data), min(data), max(data), len(data))

    @property
    def relative_range(self) -> float:
        """(max - min) / median: how noisy the runs were."""
        return (self.high - self.low) / self.median if self.median else float("inf")


def ratio(value: float, baseline: float) -> Optional[float]:
    """value / baseline, None when the baseline is zero."""
    return value / baseline if baseline else None


def paired_ratios(values: Sequence[float], baselines: Sequence[float]) -> List[float]:
    """Round-by-round ratios of two configurations measured alternately (ABAB...)."""
    return [v / b for v, b in zip(values, baselines) if b]


# --- formatting ----------------------------------------------------------------------------


def fmt(value: Optional[float], digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no exponent for usual magnitudes)."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** digits:
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - int(_floor_log10(magnitude)))
    return f"{value:,.{decimals}f}"


def _floor_log10(x: float) -> int:
    n = 0
    while x >= 10:
        x /= 10
        n += 1
    while x < 1:
        x *= 10
        n -= 1
    return n


def fmt_percent(fraction: Optional[float], digits: int = 2) -> str:
    """A ratio near 1 as a signed change: 0.987 -> "-1.30 %"."""
    if fraction is None:
        return "n/a"
    return f"{(fraction - 1) * 100:+.{digits}f} %"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; ``|`` in cells is escaped."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns")
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def yes_no(met: Optional[bool]) -> str:
    return "n/a" if met is None else ("yes" if met else "**no**")


# --- tool and tool output ------------------------------------------------------------------

_BPFTRACE_ATTACH = re.compile(r"^Attaching (\d+) probes?\.\.\.\s*$")


def bpftrace_attach_count(line: str) -> Optional[int]:
    """The probe count of bpftrace's ``Attaching N probe(s)...`` line, else None."""
    match = _BPFTRACE_ATTACH.match(line.strip())
    return int(match[1]) if match else None


def iperf3_bits_per_second(report: str) -> float:
    """Receiver throughput of an ``iperf3 -J`` run (bits/s); ValueError if it failed."""
    data = json.loads(report)
    if data.get("error"):
        raise ValueError(f"iperf3: {data['error']}")
    try:
        return float(data["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"iperf3 report without end.sum_received: {err}") from None


def last_json_line(text: str, type_: str) -> Optional[Dict[str, Any]]:
    """The last JSON object of ``type_`` in JSON-lines text (the tool's summary)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("type") == type_:
            return obj
    return None


def summary_counts_for_netns(summary: Mapping[str, Any], netns: int) -> Dict[str, int]:
    """Per-counter totals of one namespace from the tool's JSON summary (its sites' netns
    breakdown), leaving out counters that did not move."""
    totals: Dict[str, int] = {}
    for site in summary.get("sites", []):
        n = int(site.get("netns", {}).get(str(netns), 0))
        if n:
            totals[site["counter"]] = totals.get(site["counter"], 0) + n
    return totals


def nonzero(counts: Mapping[str, int]) -> Dict[str, int]:
    return {k: v for k, v in counts.items() if v}


_RESOLVED = re.compile(r"xfrmtrace: INFO: (\S+): (\d+) sites (resolved|from cache) \(([\d.]+)s\)")
_OPENED = re.compile(r"xfrmtrace: INFO: kernel BTF, kallsyms and kcore opened \(([\d.]+)s\)")


def resolver_log_times(stderr: str) -> Dict[str, Any]:
    """Per-object resolution seconds from ``xfrmtrace -v`` output."""
    objects: Dict[str, float] = {}
    sites: Dict[str, int] = {}
    for match in _RESOLVED.finditer(stderr):
        objects[match[1]] = float(match[4])
        sites[match[1]] = int(match[2])
    opened = _OPENED.search(stderr)
    return {"objects": objects, "sites": sites,
            "open_seconds": float(opened[1]) if opened else None}


_XFRM_ERROR = re.compile(rb'"type":\s*"xfrm_error"')


_STEPS = (
    ("kernel_view", re.compile(r"kernel BTF, kallsyms and kcore opened \(([\d.]+)s\)")),
    ("bpf_loaded", re.compile(r"BPF object loaded \(([\d.]+)s\)")),
    ("attached", re.compile(r"site and \d+ entry probes attached.*? \(([\d.]+)s\)")),
)


def start_breakdown(timeline: Sequence[Tuple[float, str]], ready: float) -> Dict[str, float]:
    """Where a start went, from the arrival times of the tool's ``-v`` log lines:
    ``interpreter`` (Python start and imports, until the kernel view was being opened),
    ``kernel_view`` (BTF, kallsyms, kcore), ``sites`` (resolution or cache, per object),
    ``bpf_load``, ``attach``, and ``rest`` (metrics, netlink follower, ready file).
    Steps whose lines are missing are left out."""
    times: Dict[str, Tuple[float, float]] = {}
    last_site = None
    for at, line in timeline:
        for name, pattern in _STEPS:
            match = pattern.search(line)
            if match:
                times[name] = (at, float(match[1]))
        if _RESOLVED.search(line):
            last_site = at
    out: Dict[str, float] = {}
    if "kernel_view" in times:
        at, took = times["kernel_view"]
        out["interpreter"] = at - took
        out["kernel_view"] = took
        if last_site is not None:
            out["sites"] = last_site - at
    if "bpf_loaded" in times and "attached" in times:
        (load_at, load_took), (att_at, att_took) = times["bpf_loaded"], times["attached"]
        session_start = load_at - load_took
        if last_site is not None:
            out["session_setup"] = session_start - last_site
        out["bpf_load"] = load_took
        out["attach"] = att_took - load_took
        out["rest"] = ready - att_at
    return {k: round(v, 2) for k, v in out.items()}


def count_xfrm_events(data: bytes) -> int:
    """``xfrm_error`` objects in a slice of the tool's JSON-lines output."""
    return len(_XFRM_ERROR.findall(data))


def output_growth(samples: Sequence[Tuple[float, int]]) -> Tuple[Optional[float], Optional[float]]:
    """(first, last) time at which a sampled file size grew, from (time, size) samples."""
    first = last = None
    for (_t0, s0), (t1, s1) in zip(samples, samples[1:]):
        if s1 > s0:
            first = t1 if first is None else first
            last = t1
    return first, last


# --- the broad probe set -------------------------------------------------------------------

_GS_OPERAND = re.compile(r"gs:\[(\w+)(?: ([+-]) (0x[0-9a-f]+|\d+))?\]")


def gs_displacement(instruction: str) -> Optional[int]:
    """The displacement of a ``... gs:[reg + disp]`` operand (capstone syntax), else None."""
    match = _GS_OPERAND.search(instruction)
    if not match:
        return None
    if match[3] is None:
        return 0
    disp = int(match[3], 0)
    return -disp if match[2] == "-" else disp


def is_increment(instruction: str) -> bool:
    """``inc qword ptr gs:[...]`` or ``add qword ptr gs:[...], 1``."""
    text = instruction.strip()
    if text.startswith("inc qword ptr gs:["):
        return True
    return text.startswith("add qword ptr gs:[") and re.search(r"\],\s*(1|0x1)$", text) is not None


def broad_probe_addresses(audit: Iterable[Mapping[str, Any]], max_disp: int) -> List[int]:
    """Where a tracer that does not know the base register would probe, besides the real
    sites: every gs-relative 64-bit increment by one, classified "other" by the resolver,
    whose displacement could be an XFRM counter (a positive multiple of 8, at most
    ``max_disp``).  Increments the resolver could not decode as an instruction are left out
    (a kprobe must sit on an instruction boundary), and so are the kernel's generated pages
    (``__builtin__kprobes``: the copies of already-probed instructions)."""
    addresses = []
    for entry in audit:
        if entry.get("classification") != "other":
            continue
        if str(entry.get("object", "")).startswith("__builtin__"):
            continue  # kprobe instruction slots, ftrace trampolines: copies, not code
        insn = entry.get("instruction", "")
        disp = gs_displacement(insn)
        if disp is None or not is_increment(insn):
            continue
        if 0 < disp <= max_disp and disp % 8 == 0:
            addresses.append(int(entry["address"]))
    return sorted(set(addresses))


# --- packets -------------------------------------------------------------------------------


def ipv4_checksum(header: bytes) -> int:
    """The Internet checksum of an IPv4 header (checksum field zero or not: a header with
    its checksum filled in sums to 0)."""
    if len(header) % 2:
        header += b"\0"
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def esp_frame(dst_mac: str, src_mac: str, src: str, dst: str, spi: int, seq: int = 1,
              payload: int = 64) -> bytes:
    """An Ethernet frame carrying IPv4 ESP (protocol 50) with ``payload`` bytes after the
    SPI and sequence number: what an IPsec peer sends, for an SA the receiver may not have."""
    esp = struct.pack("!II", spi, seq) + bytes(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(esp), 0, 0x4000, 64, 50, 0,
                               _ipv4(src), _ipv4(dst)))
    struct.pack_into("!H", ip, 10, ipv4_checksum(bytes(ip)))
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + bytes(ip) + esp


def _ipv4(text: str) -> bytes:
    parts = [int(p) for p in text.split(".")]
    if len(parts) != 4 or not all(0 <= p <= 255 for p in parts):
        raise ValueError(f"not an IPv4 address: {text!r}")
    return bytes(parts)


def trafgen_packet(frame: bytes) -> str:
    """A trafgen packet configuration sending ``frame`` as is."""
    return "{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n"


# --- kernel files --------------------------------------------------------------------------


def bzimage_payload(image: bytes) -> Tuple[str, bytes]:
    """The compressed vmlinux inside a bzImage: (format, bytes).

    The x86 boot protocol (2.08+) puts ``payload_offset`` and ``payload_length`` at 0x248
    in the setup header, relative to the protected-mode code after the setup sectors.
    """
    if image[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS boot header)")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    data = image[start:start + length]
    for name, magic in (("zstd", b"\x28\xb5\x2f\xfd"), ("xz", b"\xfd7zXZ\x00"),
                        ("gzip", b"\x1f\x8b"), ("lz4", b"\x02\x21\x4c\x18")):
        if data.startswith(magic):
            return name, data
    raise ValueError(f"unknown payload compression (starts with {data[:4].hex()})")


def kallsyms_text_sizes(text: str) -> Dict[str, int]:
    """Bytes of text per object from a kallsyms file: vmlinux as ``_etext - _stext``, each
    module from its first to past its last text symbol (the last one counted as 0 bytes)."""
    stext = etext = None
    spans: Dict[str, List[int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        addr, kind, name = int(parts[0], 16), parts[1], parts[2]
        if len(parts) == 3:
            if name == "_stext":
                stext = addr
            elif name == "_etext":
                etext = addr
            continue
        if kind not in ("t", "T"):
            continue
        span = spans.setdefault(parts[3].strip("[]"), [addr, addr])
        span[0] = min(span[0], addr)
        span[1] = max(span[1], addr)
    sizes = {module: high - low for module, (low, high) in spans.items()}
    if stext is not None and etext is not None:
        sizes = {"vmlinux": etext - stext, **sizes}
    return sizes
