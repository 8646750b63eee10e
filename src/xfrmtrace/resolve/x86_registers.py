"""x86-64 registers: the one place their names, roles and ``pt_regs`` numbers are written down.

The resolver names registers as capstone prints them (``rbx``, ``r12``); the BPF side numbers
them as the 64-bit slots of x86-64 ``struct pt_regs`` (``enum xt_reg`` in ``bpf/xfrm.h``,
mirrored as :class:`xfrmtrace.bpf.abi.XtReg`).  :data:`PT_REGS_SLOT` is derived from that enum,
so the two cannot drift apart.  No disassembler is imported here: the warm start (sites from
the cache) needs these names but no capstone.
"""

from __future__ import annotations

from typing import Optional

from xfrmtrace.bpf.abi import XtReg

#: System V AMD64 ABI: the first six integer arguments, in argument order.
ARGUMENT_REGISTERS: tuple[str, ...] = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
#: Preserved across calls by the callee.
CALLEE_SAVED: tuple[str, ...] = ("rbx", "rbp", "r12", "r13", "r14", "r15")
#: Clobbered by a call.
CALLER_SAVED = frozenset({"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"})
#: Registers a value may be kept in (rsp excluded), callee-saved ones first: they survive calls.
HOLDERS: tuple[str, ...] = (*CALLEE_SAVED, *ARGUMENT_REGISTERS, "r10", "r11", "rax")


def _capstone_name(reg: XtReg) -> str:
    """``XtReg.BX`` -> ``rbx``, ``XtReg.R12`` -> ``r12``."""
    name = reg.name.lower()
    return name if name[1:].isdigit() else "r" + name


#: Register name -> its slot in ``struct pt_regs`` as the BPF side reads it.
PT_REGS_SLOT: dict[str, XtReg] = {_capstone_name(reg): reg for reg in XtReg}

_LOW_NAMES = ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")
_SUBREGISTERS: dict[str, str] = {
    **{f"r{n}": f"r{n}" for n in _LOW_NAMES},
    **{f"e{n}": f"r{n}" for n in _LOW_NAMES},
    **{n: f"r{n}" for n in _LOW_NAMES},
    "al": "rax", "ah": "rax", "bl": "rbx", "bh": "rbx",
    "cl": "rcx", "ch": "rcx", "dl": "rdx", "dh": "rdx",
    "sil": "rsi", "dil": "rdi", "bpl": "rbp", "spl": "rsp",
    **{f"r{n}{suffix}": f"r{n}" for n in range(8, 16) for suffix in ("", "d", "w", "b")},
}


def reg64(name: str) -> Optional[str]:
    """The 64-bit general purpose register a (sub)register name belongs to."""
    return _SUBREGISTERS.get(name)
