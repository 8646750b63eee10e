"""Hardware execution breakpoints as perf events, one per CPU: how an arm64 increment the
kernel will not kprobe is still counted exactly (resolve/arm64_sites.py says which).

arm64 kprobes refuse an instruction that follows a load-exclusive class instruction within
32 instructions (arch/arm64/kernel/probes/decode-insn.c, ``is_probed_address_atomic``): a
BRK between ``ldxr`` and ``stxr`` would clear the exclusive monitor and the loop would
never end.  The text scan also counts LSE ``casa`` (a spin_lock), which holds no monitor.
A hardware breakpoint (``PERF_TYPE_BREAKPOINT``, ``HW_BREAKPOINT_X``) traps on the same
instruction without that scan; arm64's breakpoint handler then single-steps it
(arch/arm64/kernel/hw_breakpoint.c, ``breakpoint_handler``) and a perf_event BPF program
attached to the event runs with the registers there.

That single step is taken only when the event's overflow handler is perf's default one.
Before Linux 6.10 attaching BPF replaced the handler with ``bpf_overflow_handler`` and kept
the old one in ``perf_event.orig_overflow_handler``; the step then depended on commit
"hw_breakpoint: fix single-stepping when using bpf_overflow_handler" (v6.5, backported to
some stable series only), and without it the breakpoint fires again forever on the same
instruction: a CPU lost.  "perf/bpf: Remove unneeded uses_default_overflow_handler" (v6.10)
calls the BPF program directly and removed ``orig_overflow_handler``.  So the feature test
is that field's absence from the kernel's BTF: with it, breakpoints are not used at all.

Each CPU has a few breakpoint registers (2 to 16; a debugger or another tool may hold
some): a breakpoint that does not fit is an error for that site, reported, not fatal.
CPUs brought online later get no breakpoint (``online_cpus`` is read once).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Optional

from xfrmtrace.bpf.btf import Btf, BtfLookupError
from xfrmtrace.kernel import arch

PERF_TYPE_BREAKPOINT = 5
HW_BREAKPOINT_X = 4
HW_BREAKPOINT_LEN_4 = 4  # A64 instructions: arm64 takes only this length for execute
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_SIZE_VER1 = 72  # up to bp_len (config2): all a breakpoint needs
_PERF_EVENT_OPEN = {arch.ARM64: 241, arch.X86_64: 298}  # syscall numbers
_ONLINE = "/sys/devices/system/cpu/online"
#: What makes BPF on a breakpoint unsafe (see above).
STEP_HAZARD_FIELD = ("perf_event", "orig_overflow_handler")
# libc's syscall(), from the symbols the interpreter already has (as kernel/nsenter.py does).
_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long


class PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr`` as far as PERF_ATTR_SIZE_VER1."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),  # disabled, inherit, ... exclude_*: all 0 here
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("bp_addr", ctypes.c_uint64),
        ("bp_len", ctypes.c_uint64),
    ]


assert ctypes.sizeof(PerfEventAttr) == PERF_ATTR_SIZE_VER1


def unsupported_reason(btf: Btf, machine: str) -> Optional[str]:
    """Why this kernel cannot run xfrmtrace's BPF at a hardware breakpoint; None if it can."""
    if machine != arch.ARM64:
        return "hardware breakpoints are used on arm64 only"
    struct, field = STEP_HAZARD_FIELD
    try:
        btf.member_offset(struct, field)
    except BtfLookupError:
        return None
    return ("this kernel (before Linux 6.10) replaces a breakpoint's overflow handler when "
            "BPF attaches, and may then never step past the breakpoint")


def online_cpus(path: str = _ONLINE) -> list[int]:
    """CPU numbers from ``/sys/devices/system/cpu/online`` (``0-3,6``)."""
    with open(path, encoding="ascii") as f:
        text = f.read().strip()
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def open_execute_breakpoint(address: int, cpu: int, machine: str) -> int:
    """A perf event that fires each time CPU ``cpu`` executes the instruction at kernel
    ``address``; returns its descriptor.  Raises OSError (ENOSPC: no breakpoint register
    free on that CPU; ENODEV/EOPNOTSUPP: no hardware breakpoints)."""
    attr = PerfEventAttr(type=PERF_TYPE_BREAKPOINT, size=PERF_ATTR_SIZE_VER1, sample_period=1,
                         bp_type=HW_BREAKPOINT_X, bp_addr=address, bp_len=HW_BREAKPOINT_LEN_4)
    number = _PERF_EVENT_OPEN.get(machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"perf_event_open: unknown on {machine}")
    # syscall() is variadic: every argument passed as a full register (c_long), so that the
    # kernel's 64-bit flags carry no stale upper half on arm64.
    fd = _syscall(ctypes.c_long(number), ctypes.byref(attr), ctypes.c_long(-1),
                  ctypes.c_long(cpu), ctypes.c_long(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        why = ("no free hardware breakpoint register (a debugger, perf or another tracer "
               "holds them)" if err == errno.ENOSPC else os.strerror(err))
        raise OSError(err, f"perf_event_open(breakpoint at {address:#x}, cpu {cpu}): {why}")
    return int(fd)
