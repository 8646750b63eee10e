"""How often the tool's BPF programs ran, and how many packets a lab moved: what both the
healthy path (vmlab/guest/healthy.py) and the benchmark (bench/guest.py) count."""

from __future__ import annotations

import json
import re
from typing import Dict

from vmlab.guest import ipsec
from vmlab.guest.ipsec import LabConfig

#: The tool's BPF programs (bpf/xfrm.bpf.c): argument recording and counter sites (kprobes),
#: and counter sites counted through a hardware breakpoint (arm64, perf_event).
PROGRAMS = ("xt_entry", "xt_site", "xt_site_bp")


def veth_tx_packets(cfg: LabConfig) -> int:
    """Packets sent by both ends of a lab's veth pair (data one way, ACKs the other)."""
    total = 0
    for ns, dev in ((cfg.ns_a, cfg.veth_a), (cfg.ns_b, cfg.veth_b)):
        out = ipsec.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]).stdout
        total += int(json.loads(out)[0]["stats64"]["tx"]["packets"])
    return total


def bpf_prog_stats() -> Dict[str, Dict[str, int]]:
    """run_cnt and run_time_ns per BPF program name (kernel.bpf_stats_enabled must be 1)."""
    out = ipsec.run(["bpftool", "prog", "show", "-j"]).stdout
    totals: Dict[str, Dict[str, int]] = {}
    for prog in json.loads(out):
        entry = totals.setdefault(prog.get("name", "?"), {"run_cnt": 0, "run_time_ns": 0})
        entry["run_cnt"] += int(prog.get("run_cnt", 0))
        entry["run_time_ns"] += int(prog.get("run_time_ns", 0))
    return totals


def program_runs(before: Dict[str, Dict[str, int]],
                 after: Dict[str, Dict[str, int]]) -> Dict[str, Dict[str, int]]:
    """Per tool program, run_cnt and run_time_ns between two :func:`bpf_prog_stats`."""
    return {name: {k: after.get(name, {}).get(k, 0) - before.get(name, {}).get(k, 0)
                   for k in ("run_cnt", "run_time_ns")} for name in PROGRAMS}


def enable_bpf_stats(on: bool) -> None:
    """kernel.bpf_stats_enabled: the kernel counts program runs only while it is 1."""
    ipsec.run(["sysctl", "-qw", f"kernel.bpf_stats_enabled={int(on)}"], check=on)


_SA_LIFETIME = re.compile(r"(\d+)\(bytes\), (\d+)\(packets\)")


def xfrm_state_packets(text: str) -> int:
    """Packets counted by the SAs in ``ip -s xfrm state`` output (their current lifetime)."""
    return sum(int(m[2]) for m in _SA_LIFETIME.finditer(text))
