"""Where a function's arguments are still in registers, so fewer probes have to record them.

A site's event needs some arguments of its function (the skb, the flowi, ...).  Recording
them with a probe at the function's entry costs a probe hit on every call, including the
millions of calls that never reach a site: that probe is the tool's whole cost on healthy
traffic.  Two ways around it, both decided from the disassembly:

- **Invariant registers.**  ``mov rbx, rdi`` in the entry block, and no other instruction of
  the function writes rbx (the epilogue's ``pop rbx`` aside): then rbx holds argument 0 at
  every site, and the site reads it from its own registers.  When every argument a function's
  sites need is held like that, the function gets no recording probe at all.
- **A later record point.**  Otherwise the arguments are recorded at the deepest instruction
  that dominates every site of the function, has a known stack depth and still holds each
  needed argument in a register, instead of at the entry.  Early returns (``if (!xo) return
  skb;``) then happen before the probe, not after it.  The frame is keyed by the stack
  pointer at entry exactly as before (sp at the point + its depth).

Both are conservative: anything the analysis cannot prove (indirect jumps, code it cannot
reach, a register spilled and reloaded, a static branch the kernel may flip) falls back to
recording at the entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from xfrmtrace.resolve.model import RecordPoint, in_registers
from xfrmtrace.resolve.x86_code import (
    FunctionCode,
    branch_target,
    reaching_definitions,
    register_copy_source,
)
from xfrmtrace.resolve.x86_registers import ARGUMENT_REGISTERS, HOLDERS

# Instructions that may sit between an epilogue's pops and its return.
_EPILOGUE = ("pop", "leave", "nop")
_PADDING = ("nop", "int3")


@dataclass
class ArgumentPlan:
    """How the arguments a function's sites need are obtained."""

    site_registers: tuple[Optional[str], ...]  # argument slot -> register at every site
    record: Optional[RecordPoint]  # where to record the rest; None: at the function's entry


def plan_arguments(code: FunctionCode, site_indices: list[int], needed: frozenset[int],
                   offsets: dict[int, Optional[int]]) -> ArgumentPlan:
    """The plan for a function whose sites are at ``site_indices``, needing ``needed`` slots."""
    invariant = invariant_registers(code, site_indices)
    registers = tuple(invariant.get(slot) for slot in range(len(ARGUMENT_REGISTERS)))
    plan = ArgumentPlan(registers, None)
    if not needed or in_registers(registers, needed):
        return plan
    plan.record = deepest_record_point(code, site_indices, needed, offsets)
    return plan


# --- invariant registers ------------------------------------------------------------------


def invariant_registers(code: FunctionCode, site_indices: list[int]) -> dict[int, str]:
    """Argument slot -> a register that holds that argument, unchanged, at every site."""
    entry = code.blocks[code.block_of[0]]
    if entry.preds:
        return {}  # a loop back to the entry: its copies are not done once
    # Register -> (argument register whose entry value it holds, index where it got it).
    holds = {reg: (reg, -1) for reg in ARGUMENT_REGISTERS}
    for i in range(entry.first, entry.last + 1):
        written = code.writes(i)
        copied = None
        for reg in written:
            src = register_copy_source(code, i, reg)
            if src is not None and src in holds:
                copied = (reg, (holds[src][0], i))
        for reg in written:
            holds.pop(reg, None)
        if copied is not None:
            holds[copied[0]] = copied[1]
    result: dict[int, str] = {}
    for reg in sorted(holds, key=HOLDERS.index):
        argument, since = holds[reg]
        if all(i > since for i in site_indices) and not _written_after_entry(code, reg,
                                                                              entry.last):
            result.setdefault(ARGUMENT_REGISTERS.index(argument), reg)
    return result


def _written_after_entry(code: FunctionCode, reg: str, entry_last: int) -> bool:
    for i in range(entry_last + 1, len(code.insns)):
        if reg in code.writes(i) and not _is_epilogue_pop(code, i):
            return True
    return False


def _is_epilogue_pop(code: FunctionCode, i: int) -> bool:
    """``pop reg`` followed only by pops/stack adjustments and then a return or a tail jump
    out of the function: the register's value is never used in this function again."""
    if code.insns[i].mnemonic != "pop":
        return False
    j = i + 1
    while j < len(code.insns) and (code.insns[j].mnemonic in _EPILOGUE
                                   or code.insns[j].op_str.startswith("rsp, ")):
        j += 1
    if j >= len(code.insns):
        return False
    last = code.insns[j]
    if last.mnemonic.startswith("ret"):
        return True
    target = branch_target(last)
    return last.mnemonic == "jmp" and target is not None and target not in code.index


# --- record point ---------------------------------------------------------------------------


def deepest_record_point(code: FunctionCode, site_indices: list[int], needed: frozenset[int],
                         offsets: dict[int, Optional[int]]) -> Optional[RecordPoint]:
    """The deepest block start dominating every site where each needed argument is in a
    register and the stack depth is known; None when only the entry will do."""
    dominators = _dominators(code)
    if dominators is None:
        return None
    common: Optional[set[int]] = None
    for i in site_indices:
        doms = dominators.get(code.block_of[i])
        if doms is None:
            return None  # a site the control-flow graph does not reach
        common = set(doms) if common is None else common & doms
    if not common:
        return None
    # Dominators of one block form a chain: the deepest has the most dominators itself.
    for block in sorted(common, key=lambda b: len(dominators[b]), reverse=True):
        first = code.blocks[block].first
        if first == 0:
            return None  # the entry itself: the default
        if first in site_indices:
            continue  # two probes on one instruction run newest first: the site's first
        depth = offsets.get(first)
        if depth is None or code.insns[first].address >= code.entry_end:
            continue  # a probe goes at function+offset: not in a .cold part
        registers = _argument_registers_at(code, first, needed)
        if registers is not None:
            return RecordPoint(offset=code.insns[first].address - code.entry, depth=-depth,
                               registers=registers)
    return None


def _argument_registers_at(code: FunctionCode, i: int,
                           needed: frozenset[int]) -> Optional[tuple[Optional[str], ...]]:
    """Slot -> register holding that argument's entry value before instruction i."""
    found: dict[int, str] = {}
    for holder in HOLDERS:
        defs = reaching_definitions(code, i, holder, mib_offset=-1)
        sources = {d.base for d in defs}
        if {d.kind for d in defs} == {"ENTRY"} and len(sources) == 1:
            (source,) = sources
            if source in ARGUMENT_REGISTERS:
                found.setdefault(ARGUMENT_REGISTERS.index(source), holder)
    if not needed <= found.keys():
        return None
    return tuple(found.get(slot) if slot in needed else None
                 for slot in range(len(ARGUMENT_REGISTERS)))


def _successors(code: FunctionCode, n: int) -> set[int]:
    """Block n's successors; without the jump label table a jump within the function
    also falls through."""
    block = code.blocks[n]
    result = set(block.succs)
    if code.jump_labels is not None:
        return result  # the static branches are known and already have both edges
    last = code.insns[block.last]
    target = branch_target(last)
    if last.mnemonic == "jmp" and target in code.index and block.last + 1 < len(code.insns) \
            and last.address + last.size == code.insns[block.last + 1].address:
        result.add(code.block_of[block.last + 1])
    return result


def _is_jump_label_nop(code: FunctionCode, i: int) -> bool:
    """The 5- or 2-byte nop a disabled static branch is patched to (the ftrace hook at the
    entry aside)."""
    insn = code.insns[i]
    return i > 1 and insn.mnemonic == "nop" and insn.size in (2, 5) and (
        insn.op_str in ("dword ptr [rax + rax]", ""))


def _dominators(code: FunctionCode) -> Optional[dict[int, frozenset[int]]]:
    """Block -> the blocks that dominate it, or None when the graph may be incomplete
    (an indirect jump, or real code no known edge reaches: a jump table's targets).

    The kernel rewrites static branches (jump labels) while it runs: a ``jmp`` may become
    a nop and fall through, a nop may become a jump.  With the kernel's jump label table
    (jumplabels.py) each static branch has both edges in the graph already.  Without it
    every jump within the function also falls through here, and a function holding a nop
    that may be a static branch gets no dominance at all: a record point must not be
    bypassable once a key flips.
    """
    if any(block.indirect for block in code.blocks):
        return None
    succs = {n: _successors(code, n) for n in range(len(code.blocks))}
    entry = code.block_of[0]
    reachable = {entry}
    work = [entry]
    while work:
        for succ in succs[work.pop()]:
            if succ not in reachable:
                reachable.add(succ)
                work.append(succ)
    if code.jump_labels is None and any(_is_jump_label_nop(code, i) for n in reachable
           for i in range(code.blocks[n].first, code.blocks[n].last + 1)):
        return None
    for n, block in enumerate(code.blocks):
        if n not in reachable and not all(code.insns[i].mnemonic in _PADDING
                                          for i in range(block.first, block.last + 1)):
            return None
    order = sorted(reachable)
    every = frozenset(order)
    doms: dict[int, frozenset[int]] = {n: every for n in order}
    doms[entry] = frozenset({entry})
    changed = True
    while changed:
        changed = False
        for n in order:
            if n == entry:
                continue
            preds = [doms[p] for p in reachable if n in succs[p]]
            new = frozenset.intersection(*preds) | {n} if preds else frozenset({n})
            if new != doms[n]:
                doms[n] = new
                changed = True
    return doms
