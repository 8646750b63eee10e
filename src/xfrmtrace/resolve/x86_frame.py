"""What one x86-64 instruction does to the argument locations of arglocations.py.

Moves (``mov``, ``movzx``, ``movsx``) from a register or a frame slot carry a value on, a
``mov [rsp + X], reg`` (or ``[rbp - X]`` with a frame pointer) puts one into a slot, and any
other write to a register or to frame bytes ends what it held.  A frame address is handed
out by ``lea reg, [rsp + X]``; ``mov reg, rsp`` or ``push rsp`` hand out the frame itself.
"""

from __future__ import annotations

from typing import Callable, Optional

from capstone import CS_AC_WRITE
from capstone import x86_const as X86

from xfrmtrace.resolve.arglocations import FrameFacts, State, Value
from xfrmtrace.resolve.model import ENTRY_RECORD
from xfrmtrace.resolve.x86_code import FunctionCode
from xfrmtrace.resolve.x86_registers import ARGUMENT_REGISTERS, HOLDERS, reg64

# Instructions that use rsp without exposing it to anyone.
_STACK_OPS = ("push", "pop", "call", "ret", "leave", "pushfq", "popfq")
_MOVES = ("mov", "movzx", "movsx", "movsxd")
_HIGH_BYTES = ("ah", "bh", "ch", "dh")


class X86FrameFacts(FrameFacts):
    """Argument locations of an x86-64 function."""

    ARGUMENTS = ARGUMENT_REGISTERS
    HOLDERS = HOLDERS
    ENTRY = ENTRY_RECORD

    def __init__(self, code: FunctionCode,
                 probeable: Optional[Callable[[int], bool]] = None) -> None:
        self.frame_pointer = any(insn.mnemonic == "mov" and insn.op_str == "rbp, rsp"
                                 for insn in code.insns)
        super().__init__(code, probeable)
        self.code: FunctionCode = code

    # --- where frame memory is ----------------------------------------------------------

    def _stack_address(self, i: int, mem: X86.X86Op) -> tuple[bool, Optional[int]]:
        """Whether memory operand ``mem`` of instruction i is in this frame, and where: its
        slot, or for an array element ``[rsp + idx*8 + 0x88]`` its array's start (None: in
        the frame at an unknown place)."""
        d = self.code.detail(i)
        assert d is not None
        base = reg64(d.reg_name(mem.mem.base)) if mem.mem.base else None
        sp, bp = self.frames.get(i, (None, None))
        if base == "rsp":
            origin = sp
        elif base == "rbp" and self.frame_pointer:
            origin = bp
        else:
            return False, None
        return True, None if origin is None else origin + mem.mem.disp

    def _lowest_address_taken(self) -> Optional[float]:
        """The lowest frame address the function exposes (slots below it are private);
        None when it exposes one it cannot place, or rsp itself."""
        floor: float = float("inf")
        for i in self.frames:
            d = self.code.detail(i)
            if d is None:
                return None
            if d.mnemonic == "lea":
                dst, src = d.operands
                if reg64(d.reg_name(dst.reg)) == "rsp":
                    continue  # a stack adjustment, not an address handed out
                in_frame, slot = self._stack_address(i, src)
                if in_frame:
                    if slot is None:
                        return None
                    floor = min(floor, slot)
            elif d.mnemonic in _STACK_OPS:
                if d.op_str == "rsp":
                    return None  # push rsp: the frame's address into memory
            elif self._exposes_frame_register(d):
                return None
        return floor

    def _exposes_frame_register(self, d) -> bool:
        """True when instruction ``d`` reads rsp (or the frame pointer) as a value, not as
        a memory base or as the stack it adjusts: ``mov rdi, rsp`` hands the frame out."""
        frame_regs = {"rsp", "rbp"} if self.frame_pointer else {"rsp"}
        for n, op in enumerate(d.operands):
            if op.type != X86.X86_OP_REG or reg64(d.reg_name(op.reg)) not in frame_regs:
                continue
            if n == 0 and len(d.operands) == 2 and d.mnemonic in ("sub", "add", "and", "mov"):
                continue  # rsp/rbp adjusted or set: sub rsp, 0x28; mov rbp, rsp
            if d.mnemonic == "mov" and d.op_str in ("rbp, rsp", "rsp, rbp"):
                continue  # setting up or tearing down the frame pointer
            return True
        return False

    # --- one instruction ----------------------------------------------------------------

    def _register_move(self, i: int, reg: str, state: State) -> Optional[Value]:
        """The value register ``reg`` gets from instruction i, if it is a move (``mov``,
        ``movzx``, ``movsx``) from a register or a frame slot into all of reg's low 32 or 64
        bits (a write to 8 or 16 bits keeps the rest of the register: not followed)."""
        d = self.code.detail(i)
        if d is None or d.mnemonic not in _MOVES or len(d.operands) != 2:
            return None
        dst, src = d.operands
        if dst.type != X86.X86_OP_REG or reg64(d.reg_name(dst.reg)) != reg or dst.size < 4:
            return None
        if src.type == X86.X86_OP_REG:
            value = state.get(reg64(d.reg_name(src.reg)) or "")
        elif src.type == X86.X86_OP_MEM:
            in_frame, slot = self._stack_address(i, src)
            if not in_frame or slot is None or src.mem.index != 0:
                return None
            value = state.get(slot)
        else:
            return None
        if value is None:
            return None
        return value[0], min(value[1], src.size, dst.size)  # the low bytes both have

    def _register_store(self, i: int) -> Optional[tuple[str, int, int]]:
        """(register, slot, bytes) when instruction i is ``mov [frame], reg``."""
        d = self.code.detail(i)
        if d is None or d.mnemonic != "mov" or len(d.operands) != 2:
            return None
        dst, src = d.operands
        if dst.type != X86.X86_OP_MEM or src.type != X86.X86_OP_REG:
            return None
        in_frame, slot = self._stack_address(i, dst)
        reg = reg64(d.reg_name(src.reg))
        if not in_frame or slot is None or dst.mem.index != 0 or reg is None:
            return None
        if d.reg_name(src.reg) in _HIGH_BYTES:
            return None  # ah..dh: not the register's low byte
        return reg, slot, dst.size

    def _frame_writes(self, i: int) -> list[tuple[Optional[int], Optional[int]]]:
        """(lowest address, size or None: anywhere up) of each write of instruction i into
        this frame; lowest None: somewhere unknown."""
        d = self.code.detail(i)
        if d is None:
            return [(None, None)]
        result = []
        for op in d.operands:
            if op.type == X86.X86_OP_MEM and op.access & CS_AC_WRITE:
                in_frame, start = self._stack_address(i, op)
                if in_frame:
                    result.append((start, None if op.mem.index != 0 else op.size))
        return result

    def step(self, i: int, state: State) -> State:
        """The state after instruction i, from the state before it."""
        sp = self.frames.get(i, (None, None))[0]
        new = {loc: value for loc, value in state.items()
               if isinstance(loc, str) or (sp is not None and loc >= sp)}
        for reg in self.code.writes(i):
            moved = self._register_move(i, reg, state)
            if moved is None:
                new.pop(reg, None)
            else:
                new[reg] = moved
        writes = self._frame_writes(i)
        if writes:
            for start, size in writes:
                for slot in [loc for loc in new if isinstance(loc, int)]:
                    if start is None or (start < slot + new[slot][1] and (
                            size is None or slot < start + size)):
                        del new[slot]
            stored = self._register_store(i)
            if stored is not None:
                reg, slot, size = stored
                if reg in state and self._private(slot, size):
                    new[slot] = (state[reg][0], min(state[reg][1], size))
        return new
