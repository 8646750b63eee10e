"""Plain data shared between the resolver, the site cache, the tracer and the outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional


def code_location(function: str, offset: int, obj: str = "vmlinux") -> str:
    """``function+0xoff``, with ``[module]`` appended for module text: how sites are printed."""
    text = f"{function}+{offset:#x}"
    return text if obj == "vmlinux" else f"{text} [{obj}]"


def in_registers(registers: tuple[Optional[str], ...], slots: Iterable[int]) -> bool:
    """True when ``registers`` (argument slot -> register) names a register for every slot."""
    return all(slot < len(registers) and registers[slot] is not None for slot in slots)


@dataclass(frozen=True)
class RecordPoint:
    """Where a function's arguments are recorded, when not at its entry (see argregs.py)."""

    offset: int  # bytes from the function's start
    depth: int  # sp(entry) - sp(here) in bytes
    registers: tuple[Optional[str], ...]  # argument slot 0..5 -> register holding it here


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
    # Where entry_function's other arguments are recorded; None: at its entry.
    record: Optional[RecordPoint] = None

    @property
    def label(self) -> str:
        """``function+0xoff`` (with ``[module]`` for module sites), as printed in events."""
        return code_location(self.function, self.offset, self.object)


# 64-bit general purpose registers: what a site or record point may name.
GPR64 = frozenset({"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                   *(f"r{n}" for n in range(8, 16))})


@dataclass
class FunctionArgs:
    """Which argument registers of a function hold the values the BPF side records."""

    function: str
    address: int
    object: str = "vmlinux"  # "vmlinux" or the module name
    skb: Optional[int] = None  # argument position 0..5
    flow: Optional[int] = None
    net: Optional[int] = None
    state: Optional[int] = None
    dst: Optional[int] = None
    family: Optional[int] = None
    # Where the recording probe goes: None when every site finds the arguments in its own
    # registers (no probe at all), else a RecordPoint (offset 0: the entry).
    record: Optional[RecordPoint] = RecordPoint(0, 0, ("rdi", "rsi", "rdx", "rcx", "r8", "r9"))

    @property
    def slots(self) -> frozenset[int]:
        """Argument positions the BPF side reads: dst and family only give a flow's family."""
        roles = [self.skb, self.flow, self.net, self.state]
        if self.flow is not None:
            roles += [self.dst, self.family]
        return frozenset(p for p in roles if p is not None)


# How the resolver classified a gs-relative increment (AuditEntry.classification).
XFRM = "xfrm"
OTHER = "other"
DOUBTFUL = "doubtful"


@dataclass
class AuditEntry:
    """How one gs-relative increment was classified."""

    object: str
    function: str
    offset: int
    address: int
    instruction: str
    classification: str  # XFRM, OTHER or DOUBTFUL
    reason: str
    counter: Optional[str] = None


@dataclass
class Resolution:
    """Sites found plus the audit of every candidate looked at."""

    sites: list[Site] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
