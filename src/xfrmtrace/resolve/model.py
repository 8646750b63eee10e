"""Plain data shared between the resolver, the site cache, the tracer and the outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from xfrmtrace.bpf.abi import XT_FLOW_ONLY_ROLES, XtArgRole
from xfrmtrace.kernel import arch
from xfrmtrace.kernel.kallsyms import code_location
from xfrmtrace.resolve import arm64_registers, x86_registers

#: The argument roles the BPF side reads (``enum xt_arg_role``), in role order.
ARG_ROLES: tuple[XtArgRole, ...] = tuple(r for r in XtArgRole if r is not XtArgRole.NUM)


#: Bytes of an argument the BPF side uses: ``(__u16)site_arg(src, XT_ARG_FAMILY)`` keeps the
#: low two of the family; every other role is a pointer, used whole.
ROLE_BYTES: dict[XtArgRole, int] = {XtArgRole.FAMILY: 2}
POINTER_BYTES = 8

#: Kernel functions that never return (a subset of objtool's list, tools/objtool/
#: noreturns.h, those XFRM code calls): the instruction after a call to one is not reached
#: from the call.  Without this, ``call __stack_chk_fail`` (``bl`` on arm64) appears to fall
#: through into the next block, a path that never runs.
NORETURN_FUNCTIONS = ("__stack_chk_fail", "__fortify_panic", "fortify_panic", "panic",
                      "vpanic", "do_exit", "make_task_dead", "usercopy_abort",
                      "__ubsan_handle_builtin_unreachable")


def in_registers(registers: tuple[Optional[str], ...], slots: Iterable[int]) -> bool:
    """True when ``registers`` (argument slot -> register) names a register for every slot."""
    return all(slot < len(registers) and registers[slot] is not None for slot in slots)


@dataclass(frozen=True)
class RecordPoint:
    """Where a function's arguments are recorded, when not at its entry (see argregs.py)."""

    offset: int  # bytes from the function's start
    depth: int  # sp(entry) - sp(here) in bytes
    registers: tuple[Optional[str], ...]  # argument slot 0..5 -> register holding it here


#: Recording at the function's entry: every argument still in its own register (x86-64,
#: what the x86 argument analysis starts from).
ENTRY_RECORD = RecordPoint(offset=0, depth=0, registers=x86_registers.ARGUMENT_REGISTERS)
#: The same, per machine.
ENTRY_RECORDS: dict[str, RecordPoint] = {
    arch.X86_64: ENTRY_RECORD,
    arch.ARM64: RecordPoint(offset=0, depth=0, registers=arm64_registers.ARGUMENT_REGISTERS),
}
#: Register name -> ``struct pt_regs`` slot as the BPF side numbers it, per machine.
REGISTER_SLOTS: dict[str, dict[str, int]] = {
    arch.X86_64: {name: int(slot) for name, slot in x86_registers.PT_REGS_SLOT.items()},
    arch.ARM64: arm64_registers.PT_REGS_SLOT,
}


@dataclass(frozen=True)
class Site:
    """One instruction that increments an XFRM statistics counter."""

    object: str  # "vmlinux" or the module name
    function: str  # kallsyms symbol that contains the instruction
    offset: int  # bytes from the symbol's start
    address: int  # absolute address in the running (or given) kernel
    counter: str  # /proc/net/xfrm_stat name, e.g. "XfrmInNoStates"
    counter_index: int  # LINUX_MIB_XFRM* enum value
    mib_reg: str  # register incremented through, e.g. "rax"
    net_reg: Optional[str] = None  # register still holding the struct net * at the site
    stack_depth: Optional[int] = None  # sp(entry) - sp(site) in bytes, None if unknown
    entry_function: Optional[str] = None  # non-inlined function whose arguments we record
    instruction: str = ""  # disassembly, for the audit and --output json
    code: str = ""  # the instruction's bytes (hex): a cached site is checked against them
    # Argument slot 0..5 -> register holding that argument of entry_function at the site.
    arg_regs: tuple[Optional[str], ...] = ()
    # Argument slot 0..5 -> else the stack slot holding it: bytes above the site's sp.
    arg_stack: tuple[Optional[int], ...] = ()
    # Where entry_function's other arguments are recorded (every path to the site passes
    # one of them); () when the site reads none from a recorded frame.
    records: tuple[RecordPoint, ...] = ()
    # Bytes mib_reg holds above net->mib.xfrm_statistics at the probe: arm64 adds the
    # counter's offset before its atomic, x86 keeps it in the instruction's displacement.
    mib_bias: int = 0
    # arm64: the kernel refuses a kprobe here (an LSE casa came within 32 instructions, see
    # arm64_sites.py): a hardware execution breakpoint counts it (kernel/breakpoints.py).
    hw_breakpoint: bool = False
    # With it: a register holding this CPU's per-CPU offset there (the BPF side reads the
    # counter's value through it to tell a repeated trap from the next increment).
    cpu_reg: Optional[str] = None

    def holds(self, slots: Iterable[int]) -> bool:
        """True when the site finds every argument in ``slots`` itself (register or stack),
        without a recorded frame."""
        return all(in_registers(self.arg_regs, (slot,)) or (
            slot < len(self.arg_stack) and self.arg_stack[slot] is not None) for slot in slots)

    def argument_source(self, slot: int) -> str:
        """Where the site reads argument ``slot``: ``rbx``, ``stack sp+0x18`` or ``record``
        (the frame a recording probe filled)."""
        if in_registers(self.arg_regs, (slot,)):
            return str(self.arg_regs[slot])
        if slot < len(self.arg_stack) and self.arg_stack[slot] is not None:
            return f"stack sp+{self.arg_stack[slot]:#x}"
        return "record"

    @property
    def label(self) -> str:
        """``function+0xoff`` (with ``[module]`` for module sites), as printed in events."""
        return code_location(self.function, self.offset, self.object)


@dataclass
class FunctionArgs:
    """Which arguments of a function hold the values the BPF side records."""

    function: str
    address: int
    object: str = "vmlinux"  # "vmlinux" or the module name
    # Role -> argument position 0..5, for the roles the function has.
    positions: dict[XtArgRole, int] = field(default_factory=dict)
    # Where the recording probes go: () when every site finds the arguments itself (no
    # probe at all); ENTRY_RECORD (offset 0) is the function's entry.
    records: tuple[RecordPoint, ...] = (ENTRY_RECORD,)

    @property
    def slots(self) -> frozenset[int]:
        """Argument positions the BPF side reads: the flow-only roles (dst, family: they give
        a flow's family) only when there is a flow, as ``needs_frame()`` decides in BPF."""
        has_flow = XtArgRole.FLOW in self.positions
        return frozenset(position for role, position in self.positions.items()
                         if has_flow or not XT_FLOW_ONLY_ROLES >> role & 1)

    @property
    def needs(self) -> dict[int, int]:
        """Each of :attr:`slots` -> how many of its low bytes the BPF side uses."""
        result: dict[int, int] = {}
        for role, position in self.positions.items():
            if position in self.slots:
                result[position] = max(result.get(position, 0),
                                       ROLE_BYTES.get(role, POINTER_BYTES))
        return result


def argument_sources(site: Site, args: Optional[FunctionArgs]) -> dict[str, str]:
    """Role name (``skb``, ``flow``, ...) -> where ``site`` reads that argument of its
    function: a register, ``stack sp+0x18``, or the recording probe (``record at entry``,
    ``record at f+0xb4``); what ``sites --output json`` shows."""
    if args is None:
        return {}
    result = {}
    for role, slot in sorted(args.positions.items()):
        if slot not in args.slots:
            continue
        source = site.argument_source(slot)
        if source == "record":
            source = "record at " + ", ".join(
                "entry" if point.offset == 0 else f"{args.function}+{point.offset:#x}"
                for point in site.records or args.records)
        result[role.name.lower()] = source
    return result


# How the resolver classified a gs-relative increment (AuditEntry.classification).
XFRM = "xfrm"
OTHER = "other"
DOUBTFUL = "doubtful"
# An XFRM counter increment nothing can count exactly on this kernel (arm64: the kernel
# refuses a kprobe on every instruction that runs once per increment, and an exclusive load
# before them rules out a hardware breakpoint too).
UNPROBEABLE = "unprobeable"


@dataclass
class AuditEntry:
    """How one gs-relative increment was classified."""

    object: str
    function: str
    offset: int
    address: int
    instruction: str
    classification: str  # XFRM, OTHER, DOUBTFUL or UNPROBEABLE
    reason: str
    counter: Optional[str] = None


@dataclass
class Resolution:
    """Sites found plus the audit of every candidate looked at."""

    sites: list[Site] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
