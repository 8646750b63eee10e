"""What one AArch64 instruction does to the argument locations of arglocations.py.

arm64 functions keep an argument they need after a call in a callee-saved register (x19 ..
x28: ``mov x19, x0``) and, when those run out, in a slot of their frame: ``str x1, [sp,
#0x28]`` or one half of an ``stp``, reloaded later with ``ldr``/``ldp``.  The frame is
addressed through sp or through x29 once ``mov x29, sp`` made it the frame pointer.

- A register copy (``mov xD, xS``; ``mov wD, wS`` keeps the low four bytes) and a plain load
  from a tracked slot (``ldr``, ``ldur``, ``ldp``, the narrow and sign-extending forms: the low
  bytes they read) carry a value on; a plain store of a register (``str``, ``stur``,
  ``strb``/``strh``, ``stp``, ``stnp``) puts one into a slot.
- Any other write of a register ends what it held (a base register's writeback included);
  any other store into the frame (through sp or x29: exclusive and atomic forms, SIMD
  registers, ``xzr``, an indexed address) ends what the bytes it may reach held.
- A frame address is handed out by ``add xD, sp, #n`` (``mov xD, sp``) or, through the frame
  pointer, ``add``/``sub xD, x29, #n`` (``mov xD, x29``): slots at or above the lowest such
  address are never tracked.  Any other use of sp or x29 as a value hands out an address the
  analysis cannot place, and then no slot is tracked at all.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from xfrmtrace.kernel import arch
from xfrmtrace.resolve.arglocations import FrameFacts, State, Value
from xfrmtrace.resolve.arm64_code import FunctionCode, Insn, xreg
from xfrmtrace.resolve.arm64_registers import ARGUMENT_REGISTERS
from xfrmtrace.resolve.model import ENTRY_RECORDS

#: Callee-saved first (they survive calls), then the argument and temporary registers.  x18
#: is the platform register (the shadow call stack), x29 and x30 the frame and link.
HOLDERS: tuple[str, ...] = (*(f"x{n}" for n in range(19, 29)), *(f"x{n}" for n in range(18)))

# Plain loads and stores: mnemonic -> bytes per register (None: the register's own width).
_LOADS = {"ldr": None, "ldur": None, "ldp": None, "ldnp": None, "ldrb": 1, "ldurb": 1,
          "ldrh": 2, "ldurh": 2, "ldrsb": 1, "ldursb": 1, "ldrsh": 2, "ldursh": 2,
          "ldrsw": 4, "ldursw": 4, "ldpsw": 4}
_STORES = {"str": None, "stur": None, "stp": None, "stnp": None, "strb": 1, "sturb": 1,
           "strh": 2, "sturh": 2}
_WIDTH = {"x": 8, "w": 4, "q": 16, "d": 8, "s": 4, "h": 2, "b": 1}
_MEMORY = re.compile(r"\[(\w+)(?:, #(-?(?:0x[0-9a-f]+|\d+)))?\](!?)$")
# Mnemonics that may write memory besides the plain stores (exclusive, release, atomic).
_OTHER_WRITES = re.compile(r"(st|cas|swp|ld(add|clr|eor|set|smax|smin|umax|umin))")
_FRAME_REGISTER = "x29"


class Arm64FrameFacts(FrameFacts):
    """Argument locations of an arm64 function."""

    ARGUMENTS = ARGUMENT_REGISTERS
    HOLDERS = HOLDERS
    ENTRY = ENTRY_RECORDS[arch.ARM64]

    def __init__(self, code: FunctionCode,
                 probeable: Optional[Callable[[int], bool]] = None) -> None:
        self.code: FunctionCode = code
        super().__init__(code, probeable)

    # --- where frame memory is ----------------------------------------------------------

    def _access(self, i: int) -> Optional[tuple[bool, Optional[int], list[str], int]]:
        """For a memory access of instruction i: (in this frame, its lowest address as a
        slot or None when unknown, the data registers, bytes per register); None when i has
        no memory operand."""
        insn = self.code.insns[i]
        ops = insn.operands
        at = next((n for n, op in enumerate(ops) if op.startswith("[")), None)
        if at is None:
            return None
        data = ops[:at]
        per_register = _LOADS.get(insn.mnemonic, _STORES.get(insn.mnemonic))
        size = per_register or (_WIDTH.get(data[-1][:1], 0) if data else 0)
        match = _MEMORY.fullmatch(ops[at])
        base = ops[at][1:].split(",", 1)[0].rstrip("]")
        sp, fp = self.frames.get(i, (None, None))
        origin = sp if base == "sp" else fp if xreg(base) == _FRAME_REGISTER else None
        if base != "sp" and xreg(base) != _FRAME_REGISTER:
            return False, None, data, size
        if match is None or origin is None:
            return True, None, data, size  # indexed, or the frame is not known here
        post_indexed = len(ops) > at + 1
        offset = 0 if post_indexed else int(match.group(2) or "0", 0)
        return True, origin + offset, data, size

    def _lowest_address_taken(self) -> Optional[float]:
        floor: float = float("inf")
        fp_set_at = next((i for i in sorted(self.frames) if _sets_frame_pointer(
            self.code.insns[i])), None)
        for i in self.frames:
            insn = self.code.insns[i]
            ops = insn.operands
            sp, fp = self.frames[i]
            values = [op for op in ops[1:] if not op.startswith(("[", "#"))]
            reads_sp = "sp" in values or (ops[:1] == ["sp"] and insn.mnemonic.startswith(
                ("st", "cmp", "cmn", "tst")))
            reads_fp = any(xreg(op) == _FRAME_REGISTER for op in values) or (
                ops[:1] and xreg(ops[0]) == _FRAME_REGISTER and insn.mnemonic.startswith(
                    ("st", "cmp", "cmn", "tst")))
            if reads_sp:
                if ops[:1] == ["sp"] or _sets_frame_pointer(insn):
                    continue  # sp adjusted (sub sp, sp, #n), or made the frame pointer
                exposed = _address_of(insn, "sp", sp)
                if exposed is None:
                    return None
                floor = min(floor, exposed)
            elif reads_fp:
                if ops == ["sp", "x29"] or (fp is None and fp_set_at is not None
                                             and i < fp_set_at and _saves_caller_frame(insn)):
                    continue  # sp restored from x29; the caller's x29 saved in the prologue
                if fp is None and fp_set_at is None and _saves_caller_frame(insn):
                    continue  # the caller's x29, saved by a function with no frame pointer
                exposed = _address_of(insn, _FRAME_REGISTER, fp)
                if exposed is None:
                    return None
                floor = min(floor, exposed)
        return floor

    # --- one instruction ----------------------------------------------------------------

    def step(self, i: int, state: State) -> State:
        """The state after instruction i, from the state before it."""
        insn = self.code.insns[i]
        sp = self.frames.get(i, (None, None))[0]
        new = {loc: value for loc, value in state.items()
               if isinstance(loc, str) or (sp is not None and loc >= sp)}
        access = self._access(i)
        loaded = self._loaded(insn, access, state)
        for reg in self.code.writes(i) | _writeback_base(insn):
            if reg in loaded:
                new[reg] = loaded[reg]
            else:
                new.pop(reg, None)
        if insn.mnemonic == "mov" and len(insn.operands) == 2:
            moved = _copied(insn, state)
            if moved is not None:
                new[moved[0]] = moved[1]
        if access is not None and access[0] and (insn.mnemonic in _STORES or
                                                _OTHER_WRITES.match(insn.mnemonic)):
            self._store(insn, access, state, new)
        return new

    def _loaded(self, insn: Insn, access, state: State) -> dict[str, Value]:
        """Register -> the value a plain load from a tracked slot gives it."""
        if access is None or insn.mnemonic not in _LOADS:
            return {}
        in_frame, slot, data, size = access
        if not in_frame or slot is None:
            return {}
        result = {}
        for n, op in enumerate(data):
            reg = xreg(op)
            value = state.get(slot + n * size)
            if reg is not None and value is not None and op[0] in "xw":
                result[reg] = (value[0], min(value[1], size))
        return result

    def _store(self, insn: Insn, access, state: State, new: State) -> None:
        """Apply a write into the frame: end what the bytes held, then, for a plain store
        of registers to a known private slot, record what they hold."""
        _in_frame, slot, data, size = access
        plain = insn.mnemonic in _STORES and slot is not None and size > 0
        end = slot + size * len(data) if plain and slot is not None else None
        for loc in [loc for loc in new if isinstance(loc, int)]:
            if slot is None or end is None or (slot < loc + new[loc][1] and loc < end):
                del new[loc]
        if not plain or slot is None:
            return
        for n, op in enumerate(data):
            reg = xreg(op)
            at = slot + n * size
            if reg is not None and op[0] in "xw" and reg in state and self._private(at, size):
                new[at] = (state[reg][0], min(state[reg][1], size))


def _copied(insn: Insn, state: State) -> Optional[tuple[str, Value]]:
    """``mov xD, xS`` / ``mov wD, wS``: (xD, the value xS holds, as many bytes as copied)."""
    dst, src = insn.operands
    reg, source = xreg(dst), xreg(src)
    if reg is None or source is None or dst[0] != src[0] or source not in state:
        return None
    value = state[source]
    return reg, (value[0], min(value[1], _WIDTH[dst[0]]))


def _writeback_base(insn: Insn) -> frozenset[str]:
    """The base register a pre- or post-indexed access writes back (sp aside)."""
    ops = insn.operands
    at = next((n for n, op in enumerate(ops) if op.startswith("[")), None)
    if at is None or not (ops[at].endswith("!") or len(ops) > at + 1):
        return frozenset()
    base = xreg(ops[at][1:].split(",", 1)[0].rstrip("]!"))
    return frozenset({base}) if base else frozenset()


def _sets_frame_pointer(insn: Insn) -> bool:
    ops = insn.operands
    return insn.mnemonic in ("mov", "add") and ops[:2] == ["x29", "sp"] and (
        len(ops) == 2 or ops[2].startswith("#"))


def _saves_caller_frame(insn: Insn) -> bool:
    """``stp x29, x30, [sp, #-n]!`` (or any plain store of x29 into memory)."""
    return insn.mnemonic in _STORES and bool(insn.operands) and xreg(insn.operands[0]) == "x29"


def _address_of(insn: Insn, frame_reg: str, origin: Optional[int]) -> Optional[int]:
    """The frame slot whose address instruction ``insn`` computes from ``frame_reg`` (at
    ``origin``): ``add xD, sp, #n``, ``sub xD, x29, #n``, ``mov xD, sp``; None for any other
    use of it."""
    ops = insn.operands
    if origin is None or len(ops) < 2 or xreg(ops[0]) is None or ops[0][0] != "x":
        return None
    source = ops[1] if frame_reg == "sp" else xreg(ops[1])
    if source != frame_reg:
        return None
    if insn.mnemonic == "mov" and len(ops) == 2:
        return origin
    if insn.mnemonic in ("add", "sub") and len(ops) == 3 and ops[2].startswith("#"):
        amount = int(ops[2][1:], 0)
        return origin + (amount if insn.mnemonic == "add" else -amount)
    return None
