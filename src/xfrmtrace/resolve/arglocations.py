"""Where each argument's entry value is, at every instruction of a function: registers and
stack slots of its own frame, by a forward dataflow over the control-flow graph.

Compilers keep an argument they need after a call in a callee-saved register, and when
those run out they spill it: ``mov qword ptr [rsp + 0x18], r12`` and, later, ``mov r12,
qword ptr [rsp + 0x18]``.  A site that needs the argument can read it from wherever it is
at the site, which spares the function a recording probe (a hit on every call, healthy
traffic included: argregs.py); where a recording probe is still needed, it can go at the
latest points that still see the arguments in registers (:meth:`FrameFacts.record_points`).

:class:`FrameFacts` computes, before every instruction, which locations provably hold
which argument register's value at entry ("must" dataflow: a location counts only when it
holds that value on every path).  Register copies and loads from a slot carry a value on,
stores of a register put it into a slot; any other write to the location, or to bytes of
the slot, ends it.  Nothing is proven when the control-flow graph may be incomplete
(FunctionCode.sound_successors).

Stack slots need one more guarantee: nothing outside the function's own instructions may
write them.  The kernel (x86-64) has no red zone and interrupts may use the current stack,
so a slot counts only while it is inside the frame (at or above sp).  Callees and stores
through pointers reach a frame only through an address taken from rsp (``lea rdi, [rsp +
0x20]``); so a slot is tracked only when every address the function ever takes of its frame
lies above it (a C object there cannot extend down over it), and the function never copies
rsp itself into a register.  What remains assumed is C's rule that an object is not
written below its start: a ``container_of`` from a pointer into a stack object back to an
enclosing object that also holds the spilled value (compilers spill to slots no C object
occupies), and an array element ``[rsp + idx*8 + 0x88]`` at or above its array's start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from capstone import CS_AC_WRITE
from capstone import x86_const as X86

from xfrmtrace.bpf.abi import XT_ARG_STACK_MAX
from xfrmtrace.resolve.model import ENTRY_RECORD, POINTER_BYTES, RecordPoint
from xfrmtrace.resolve.x86_code import FunctionCode
from xfrmtrace.resolve.x86_registers import ARGUMENT_REGISTERS, HOLDERS, reg64

# Instructions that use rsp without exposing it to anyone.
_STACK_OPS = ("push", "pop", "call", "ret", "leave", "pushfq", "popfq")

# (argument register, n): the low n bytes of that argument's entry value (8: all of it).
Value = tuple[str, int]
# Location -> the value it holds.  A location is a register name, or a stack slot: the
# bytes from (sp at entry + slot) on, slot < 0.
State = dict[Union[str, int], Value]
_MOVES = ("mov", "movzx", "movsx", "movsxd")
_HIGH_BYTES = ("ah", "bh", "ch", "dh")

@dataclass(frozen=True)
class ArgumentLocations:
    """Argument slot 0..5 -> where a site finds that argument's entry value."""

    registers: tuple[Optional[str], ...]  # the register holding it at the site
    stack: tuple[Optional[int], ...]  # else its stack slot: bytes above the site's sp

    def slots(self) -> frozenset[int]:
        """The argument slots found, in a register or on the stack."""
        return frozenset(n for n in range(len(self.registers))
                         if self.registers[n] is not None or self.stack[n] is not None)


class FrameFacts:
    """Argument locations before each instruction of one function, for all its sites."""

    def __init__(self, code: FunctionCode) -> None:
        self.code = code
        self.frames = code.frame_offsets()
        self.successors = code.sound_successors()
        self.predecessors: dict[int, list[int]] = {n: [] for n in self.successors or {}}
        for n, succs in (self.successors or {}).items():
            for s in succs:
                self.predecessors[s].append(n)
        self.frame_pointer = any(insn.mnemonic == "mov" and insn.op_str == "rbp, rsp"
                                 for insn in code.insns)
        self.escape_floor = self._lowest_address_taken()
        self._block_in: dict[int, State] = {}
        if self.successors is not None:
            self._solve()

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

    def _private(self, slot: int, size: int) -> bool:
        return self.escape_floor is not None and slot + size <= self.escape_floor

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

    # --- the dataflow -------------------------------------------------------------------

    def _solve(self) -> None:
        assert self.successors is not None
        entry = self.code.block_of[0]
        self._block_in = {entry: {reg: (reg, POINTER_BYTES) for reg in ARGUMENT_REGISTERS}}
        work = [entry]
        while work:
            n = work.pop()
            out = self._run_block(n, self.code.blocks[n].last + 1)
            for s in self.successors[n]:
                old = self._block_in.get(s)
                new = out if old is None else _meet(old, out)
                if new != old:  # states only ever shrink: this ends
                    self._block_in[s] = new
                    work.append(s)

    def _run_block(self, n: int, stop: int) -> State:
        """The state before instruction ``stop`` of block n (stop: its last + 1 for the end)."""
        state = self._block_in.get(n, {})
        for i in range(self.code.blocks[n].first, stop):
            state = self.step(i, state)
        return state

    def before(self, i: int) -> State:
        """Locations holding an argument's entry value before instruction i (nothing proven:
        empty)."""
        if self.successors is None:
            return {}
        return self._run_block(self.code.block_of[i], i)

    # --- what sites and probes use ------------------------------------------------------

    def locations(self, site: int, needed: dict[int, int]) -> ArgumentLocations:
        """For each needed argument slot (-> bytes of it used), a register or a stack slot
        holding that much of the argument's entry value at instruction ``site``: registers
        first (no memory read at the site)."""
        state = self.before(site)
        sp = self.frames.get(site, (None, None))[0]
        registers: list[Optional[str]] = [None] * len(ARGUMENT_REGISTERS)
        stack: list[Optional[int]] = [None] * len(ARGUMENT_REGISTERS)
        for slot, size in sorted(needed.items()):
            registers[slot] = _holder(state, slot, size)
            if registers[slot] is None and sp is not None:
                stack[slot] = next((loc - sp for loc, value in sorted(state.items(), key=str)
                                    if isinstance(loc, int) and _holds(value, slot, size)
                                    and 0 <= loc - sp <= XT_ARG_STACK_MAX), None)
        return ArgumentLocations(tuple(registers), tuple(stack))

    def record_points(self, sites: list[int], needed: dict[int, int],
                      probed: list[int]) -> tuple[RecordPoint, ...]:
        """Where to record the ``needed`` arguments so every path from the entry to each of
        ``sites`` passes one: walking back from each site, the first block start on each
        path that has every needed argument in a register and a known stack depth (the
        entry if a path has none).  Each point records the same entry values into the same
        frame, so whichever ran last in this call is right.  None of ``probed`` (sites) is
        a record point: two probes on one instruction run in the wrong order."""
        if self.successors is None:
            return (ENTRY_RECORD,)
        code = self.code
        points: dict[int, RecordPoint] = {}
        seen: set[int] = set()
        for site in sites:
            own = code.block_of[site]
            work = [own] if code.blocks[own].first != site else list(self.predecessors[own])
            while work:
                n = work.pop()
                if n in seen:
                    continue
                seen.add(n)
                point = self._record_point_at(n, needed, probed)
                if point is not None:
                    points[n] = point
                else:
                    work.extend(self.predecessors[n])
        if ENTRY_RECORD in points.values():
            return (ENTRY_RECORD,)  # it runs on every call: any later point only repeats it
        return tuple(sorted(points.values(), key=lambda p: p.offset))

    def _record_point_at(self, n: int, needed: dict[int, int],
                         probed: list[int]) -> Optional[RecordPoint]:
        first = self.code.blocks[n].first
        if first == 0:
            return ENTRY_RECORD
        sp = self.frames.get(first, (None, None))[0]
        insn = self.code.insns[first]
        if first in probed or sp is None or insn.address >= self.code.entry_end:
            return None  # a probe goes at function+offset: not in a .cold part
        state = self._block_in.get(n, {})
        registers = tuple(_holder(state, slot, needed[slot]) if slot in needed else None
                          for slot in range(len(ARGUMENT_REGISTERS)))
        if any(registers[slot] is None for slot in needed):
            return None
        return RecordPoint(offset=insn.address - self.code.entry, depth=-sp, registers=registers)


def _meet(a: State, b: State) -> State:
    """Where paths with states a and b join: what both hold, as many bytes as both have."""
    return {loc: (value[0], min(value[1], b[loc][1])) for loc, value in a.items()
            if loc in b and b[loc][0] == value[0]}


def _holds(value: Value, slot: int, size: int) -> bool:
    return value[0] == ARGUMENT_REGISTERS[slot] and value[1] >= size


def _holder(state: State, slot: int, size: int) -> Optional[str]:
    """The first register (callee-saved first: HOLDERS) holding ``size`` bytes of argument
    ``slot``."""
    return next((r for r in HOLDERS if r in state and _holds(state[r], slot, size)), None)
