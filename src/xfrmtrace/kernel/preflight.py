"""Checks that turn a kernel or privilege problem into one actionable line, before any work."""

from __future__ import annotations

import os
from pathlib import Path

from xfrmtrace.errors import KernelFeatureMissing, PermissionProblem
from xfrmtrace.kernel import arch

CAP_SYS_ADMIN = 21
CAP_SYS_RAWIO = 17
CAP_SYSLOG = 34
CAP_PERFMON = 38
CAP_BPF = 39

KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")
TRACEFS_KPROBE_EVENTS = (Path("/sys/kernel/tracing/kprobe_events"),
                         Path("/sys/kernel/debug/tracing/kprobe_events"))
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
PROC_XFRM_STAT = Path("/proc/net/xfrm_stat")


def effective_capabilities(status: str = "") -> int:
    """CapEff of this process (from /proc/self/status text, read if not given)."""
    if not status:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing_capabilities(caps: int) -> list[str]:
    """Capabilities tracing needs that ``caps`` lacks."""
    def has(bit: int) -> bool:
        return bool(caps >> bit & 1)

    missing = []
    if not (has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))):
        missing.append("CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)")
    if not has(CAP_SYS_RAWIO):
        missing.append("CAP_SYS_RAWIO (to read /proc/kcore)")
    if not has(CAP_SYSLOG):
        missing.append("CAP_SYSLOG (to see kallsyms addresses)")
    return missing


def check_privileges() -> None:
    missing = missing_capabilities(effective_capabilities())
    if missing:
        who = "not root, and" if os.geteuid() != 0 else "running as root but"
        raise PermissionProblem(f"xfrmtrace needs root privileges ({who} missing "
                                f"{', '.join(missing)}): run it with sudo")


def check_kprobes() -> None:
    if KPROBE_PMU.exists() or any(p.exists() for p in TRACEFS_KPROBE_EVENTS):
        return
    raise KernelFeatureMissing(
        "kernel has no kprobes (CONFIG_KPROBES/CONFIG_KPROBE_EVENTS off): xfrmtrace cannot "
        "probe counter sites here; `xfrmtrace sites --vmlinux F --kallsyms F` still works offline"
    )


def check_btf() -> None:
    if not VMLINUX_BTF.exists():
        raise KernelFeatureMissing(
            f"kernel has no BTF ({VMLINUX_BTF} missing): needs CONFIG_DEBUG_INFO_BTF=y"
        )


def check_xfrm_statistics() -> None:
    if not PROC_XFRM_STAT.exists():
        raise KernelFeatureMissing(
            f"{PROC_XFRM_STAT} is missing: kernel built without CONFIG_XFRM_STATISTICS "
            "(or without IPsec)"
        )


def check_tracing() -> None:
    """Everything ``xfrmtrace trace`` needs, most fundamental first."""
    arch.require_supported(arch.running_machine())
    check_privileges()
    check_kprobes()
    check_btf()
    check_xfrm_statistics()
