"""Where a function's arguments are still in registers, so fewer probes have to record them.

A site's event needs some arguments of its function (the skb, the flowi, ...).  Recording
them with a probe at the function's entry costs a probe hit on every call, including the
millions of calls that never reach a site: that probe is the tool's whole cost on healthy
traffic.  Three ways around it, all decided from the disassembly:

- **Invariant registers.**  ``mov rbx, rdi`` in the entry block, and no other instruction of
  the function writes rbx (the epilogue's ``pop rbx`` aside): then rbx holds argument 0 at
  every site, and the site reads it from its own registers.
- **Per-site locations** (arglocations.py).  For the arguments left, each site gets the
  register or the stack slot of its own frame that holds the argument on every path to it
  (a value spilled with ``mov [rsp + 0x18], r12`` and perhaps reloaded).  When every site of
  a function finds all it needs like that, the function gets no recording probe at all.
- **Later record points** (arglocations.py).  Otherwise the arguments are recorded at the
  latest block starts that every path to a site still lacking one must pass, each with a
  known stack depth and every needed argument in a register, instead of at the entry.
  Early returns (``if (!xo) return skb;``, ``if (!policy_count) goto nopol;``) then happen
  before any probe, not after it.  The frame is keyed by the stack pointer at entry
  exactly as before (sp at the point + its depth).

All are conservative: anything the analysis cannot prove (indirect jumps, code it cannot
reach, a slot whose address may be taken, a static branch the kernel may flip) falls back
to recording at the entry.

The per-site locations and record points run on both instruction sets (x86_frame.py,
arm64_frame.py).  The invariant-register rule is x86-64 only: where the arm64 dataflow
proves nothing (an indirect branch), its sites record at the entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from xfrmtrace.resolve.arglocations import ArgumentLocations, FrameFacts
from xfrmtrace.resolve.model import RecordPoint
from xfrmtrace.resolve.x86_code import FunctionCode, branch_target, register_copy_source
from xfrmtrace.resolve.x86_registers import ARGUMENT_REGISTERS, HOLDERS

# Argument slot -> a register holding that argument at every site (invariant_registers).
InvariantRule = Callable[[FunctionCode, list[int]], dict[int, str]]

# Instructions that may sit between an epilogue's pops and its return.
_EPILOGUE = ("pop", "leave", "nop")


@dataclass
class ArgumentPlan:
    """How the arguments a function's sites need are obtained."""

    sites: list[ArgumentLocations]  # per site (in the order given): registers, stack slots
    # Where to record what some site still lacks (ENTRY_RECORD: at the entry); () if none.
    records: tuple[RecordPoint, ...]


def plan_arguments(code, site_indices: list[int], needed: dict[int, int],
                   frame_facts: type[FrameFacts],
                   invariant_rule: Optional[InvariantRule] = None,
                   probeable: Optional[Callable[[int], bool]] = None) -> ArgumentPlan:
    """The plan for a function (``code``, as ``frame_facts`` reads it) whose sites are at
    ``site_indices``, needing the argument slots ``needed`` (slot -> bytes of it used);
    ``invariant_rule``: invariant_registers, where the instruction set has it;
    ``probeable(i)``: a record probe may go on instruction i (default: any)."""
    count = len(frame_facts.ARGUMENTS)
    invariant = invariant_rule(code, site_indices) if invariant_rule else {}
    registers = tuple(invariant.get(slot) for slot in range(count))
    rest = {slot: size for slot, size in needed.items() if slot not in invariant}
    facts = frame_facts(code, probeable) if rest else None
    plan = ArgumentPlan([], ())
    lacking = []  # sites that still read some argument from a recorded frame
    recorded: dict[int, int] = {}  # the argument slots they read from it
    for i in site_indices:
        found = ArgumentLocations(registers, (None,) * count)
        if facts is not None:
            found = _merge(found, facts.locations(i, rest))
        plan.sites.append(found)
        missing = needed.keys() - found.slots()
        if missing:
            lacking.append(i)
            recorded.update((slot, needed[slot]) for slot in missing)
    if facts is not None and lacking:
        plan.records = facts.record_points(lacking, recorded, site_indices)
    return plan


def _merge(invariant: ArgumentLocations, located: ArgumentLocations) -> ArgumentLocations:
    """Invariant registers first, then what the dataflow found for the other slots."""
    registers = tuple(r if r is not None else located.registers[n]
                      for n, r in enumerate(invariant.registers))
    stack = tuple(located.stack[n] if registers[n] is None else None
                  for n in range(len(registers)))
    return ArgumentLocations(registers, stack)


# --- invariant registers (x86-64) ---------------------------------------------------------


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
