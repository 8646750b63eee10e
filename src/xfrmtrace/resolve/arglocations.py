"""Where each argument's entry value is, at every instruction of a function: registers and
stack slots of its own frame, by a forward dataflow over the control-flow graph.

Compilers keep an argument they need after a call in a callee-saved register, and when
those run out they spill it (x86-64: ``mov qword ptr [rsp + 0x18], r12``, later ``mov r12,
qword ptr [rsp + 0x18]``; arm64: ``str x1, [sp, #0x28]``, ``ldr x20, [sp, #0x28]``).  A
site that needs the argument can read it from wherever it is at the site, which spares the
function a recording probe (a hit on every call, healthy traffic included: argregs.py);
where a recording probe is still needed, it can go at the latest points that still see the
arguments in registers (:meth:`FrameFacts.record_points`).

:class:`FrameFacts` computes, before every instruction, which locations provably hold
which argument register's value at entry ("must" dataflow: a location counts only when it
holds that value on every path).  Register copies and loads from a slot carry a value on,
stores of a register put it into a slot; any other write to the location, or to bytes of
the slot, ends it.  Nothing is proven when the control-flow graph may be incomplete
(FunctionCode.sound_successors).  What one instruction does is the instruction set's part:
x86_frame.py and arm64_frame.py subclass this with their ``step``.

Stack slots need one more guarantee: nothing outside the function's own instructions may
write them.  Neither kernel has a red zone (an interrupt may use the current stack below
sp), so a slot counts only while it is inside the frame (at or above sp).  Callees and
stores through pointers reach a frame only through an address taken from sp (x86 ``lea
rdi, [rsp + 0x20]``, arm64 ``add x0, sp, #0x20``); so a slot is tracked only when every
address the function ever takes of its frame lies above it (a C object there cannot extend
down over it), and the function never hands out sp itself.  What remains assumed is C's
rule that an object is not written below its start: a ``container_of`` from a pointer into
a stack object back to an enclosing object that also holds the spilled value (compilers
spill to slots no C object occupies), and an array element at or above its array's start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Union

from xfrmtrace.bpf.abi import XT_ARG_STACK_MAX
from xfrmtrace.resolve.model import POINTER_BYTES, RecordPoint

# (argument register, n): the low n bytes of that argument's entry value (8: all of it).
Value = tuple[str, int]
# Location -> the value it holds.  A location is a register name, or a stack slot: the
# bytes from (sp at entry + slot) on, slot < 0.
State = dict[Union[str, int], Value]
# (sp, frame pointer) relative to sp at the function's entry, before an instruction.
Frame = tuple[Optional[int], Optional[int]]


@dataclass(frozen=True)
class ArgumentLocations:
    """Argument slot 0..5 -> where a site finds that argument's entry value."""

    registers: tuple[Optional[str], ...]  # the register holding it at the site
    stack: tuple[Optional[int], ...]  # else its stack slot: bytes above the site's sp

    def slots(self) -> frozenset[int]:
        """The argument slots found, in a register or on the stack."""
        return frozenset(n for n in range(len(self.registers))
                         if self.registers[n] is not None or self.stack[n] is not None)


class FunctionCode(Protocol):
    """What the dataflow needs of a disassembled function (x86_code, arm64_code)."""

    entry: int  # the function's address
    entry_end: int  # end of its first part: record points go at function+offset, not in .cold
    insns: list  # each with .address, .mnemonic, .op_str
    blocks: list  # each with .first, .last (instruction indices)
    block_of: list[int]  # instruction index -> its block

    def frame_offsets(self) -> dict[int, Frame]: ...

    def sound_successors(self) -> Optional[dict[int, set[int]]]: ...

    def writes(self, i: int) -> set[str] | frozenset[str]: ...


class FrameFacts:
    """Argument locations before each instruction of one function, for all its sites.

    A subclass names its machine's registers (``ARGUMENTS``: the argument registers in
    argument order; ``HOLDERS``: every register a value may be read from at a site,
    callee-saved first) and says what one instruction does (:meth:`step`) and which frame
    addresses the function hands out (:meth:`_lowest_address_taken`)."""

    ARGUMENTS: tuple[str, ...] = ()
    HOLDERS: tuple[str, ...] = ()
    #: Recording at the entry: every argument still in its own register.
    ENTRY: RecordPoint

    def __init__(self, code: FunctionCode,
                 probeable: Optional[Callable[[int], bool]] = None) -> None:
        """``probeable(i)``: the kernel takes a kprobe on instruction i, where a record
        point may go (None: anywhere, as on x86-64)."""
        self.code = code
        self._probeable = probeable
        self.frames = code.frame_offsets()
        self.successors = code.sound_successors()
        self.predecessors: dict[int, list[int]] = {n: [] for n in self.successors or {}}
        for n, succs in (self.successors or {}).items():
            for s in succs:
                self.predecessors[s].append(n)
        self.escape_floor = self._lowest_address_taken()
        self._block_in: dict[int, State] = {}
        if self.successors is not None:
            self._solve()

    # --- what the instruction set says ------------------------------------------------

    def _lowest_address_taken(self) -> Optional[float]:
        """The lowest frame address the function exposes (slots below it are private);
        None when it exposes one it cannot place, or sp itself."""
        raise NotImplementedError

    def step(self, i: int, state: State) -> State:
        """The state after instruction i, from the state before it."""
        raise NotImplementedError

    def _private(self, slot: int, size: int) -> bool:
        return self.escape_floor is not None and slot + size <= self.escape_floor

    # --- the dataflow -------------------------------------------------------------------

    def _solve(self) -> None:
        assert self.successors is not None
        entry = self.code.block_of[0]
        self._block_in = {entry: {reg: (reg, POINTER_BYTES) for reg in self.ARGUMENTS}}
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
        registers: list[Optional[str]] = [None] * len(self.ARGUMENTS)
        stack: list[Optional[int]] = [None] * len(self.ARGUMENTS)
        for slot, size in sorted(needed.items()):
            registers[slot] = self._holder(state, slot, size)
            if registers[slot] is None and sp is not None:
                stack[slot] = next((loc - sp for loc, value in sorted(state.items(), key=str)
                                    if isinstance(loc, int) and self._holds(value, slot, size)
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
            return (self.ENTRY,)
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
        if self.ENTRY in points.values():
            return (self.ENTRY,)  # it runs on every call: any later point only repeats it
        return tuple(sorted(points.values(), key=lambda p: p.offset))

    def _record_point_at(self, n: int, needed: dict[int, int],
                         probed: list[int]) -> Optional[RecordPoint]:
        first = self.code.blocks[n].first
        if first == 0:
            return self.ENTRY
        sp = self.frames.get(first, (None, None))[0]
        insn = self.code.insns[first]
        if first in probed or sp is None or insn.address >= self.code.entry_end:
            return None  # a probe goes at function+offset: not in a .cold part
        if self._probeable is not None and not self._probeable(first):
            return None  # arm64: mrs, an exclusive sequence, right after a casa
        state = self._block_in.get(n, {})
        registers = tuple(self._holder(state, slot, needed[slot]) if slot in needed else None
                          for slot in range(len(self.ARGUMENTS)))
        if any(registers[slot] is None for slot in needed):
            return None
        return RecordPoint(offset=insn.address - self.code.entry, depth=-sp, registers=registers)

    def _holds(self, value: Value, slot: int, size: int) -> bool:
        return value[0] == self.ARGUMENTS[slot] and value[1] >= size

    def _holder(self, state: State, slot: int, size: int) -> Optional[str]:
        """The first register (callee-saved first: HOLDERS) holding ``size`` bytes of
        argument ``slot``."""
        return next((r for r in self.HOLDERS if r in state and self._holds(state[r], slot, size)),
                    None)


def _meet(a: State, b: State) -> State:
    """Where paths with states a and b join: what both hold, as many bytes as both have."""
    return {loc: (value[0], min(value[1], b[loc][1])) for loc, value in a.items()
            if loc in b and b[loc][0] == value[0]}
