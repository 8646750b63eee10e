"""x86-64 machine code of one kernel function: disassembly, control-flow graph, stack depth
and reaching definitions.

:class:`FunctionCode` disassembles a function together with its compiler-split ``.cold``
parts (capstone), cuts it into basic blocks and links them; static branches the kernel flips
at run time get both edges when the kernel's jump label table is known.  On top of it:
``stack_offsets`` (sp relative to the entry before each instruction) and
:func:`reaching_definitions` (every definition of a register that reaches an instruction,
register copies followed).  The site resolver (sites.py) and the argument analysis
(argregs.py) both build on this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import capstone
from capstone import x86_const as X86

from xfrmtrace.kernel.jumplabels import LabelIndex
from xfrmtrace.kernel.kallsyms import Function
from xfrmtrace.resolve.cfg import reachable_blocks
from xfrmtrace.resolve.model import OTHER, XFRM
from xfrmtrace.resolve.x86_registers import CALLER_SAVED, reg64

_BLOCK_LIMIT = 256  # (block, register) pairs a backward search may visit per site
_PADDING = ("nop", "int3")  # what unreachable bytes between functions may hold


# --- code model -------------------------------------------------------------


@dataclass
class Insn:
    address: int
    size: int
    mnemonic: str
    op_str: str


@dataclass
class Block:
    first: int  # index of first instruction
    last: int  # index of last instruction
    succs: list[int] = field(default_factory=list)  # block ids
    preds: list[int] = field(default_factory=list)
    indirect: bool = False  # ends in an indirect jump: successors unknown


def branch_target(insn: Insn) -> Optional[int]:
    try:
        return int(insn.op_str, 16) if insn.op_str.startswith("0x") else None
    except ValueError:
        return None


def _ends_block(insn: Insn) -> bool:
    m = insn.mnemonic
    return m.startswith("j") or m.startswith("ret") or m in ("ud2", "int3", "hlt", "iretq")


class FunctionCode:
    """Disassembly and control-flow graph of a function and its ``.cold`` parts."""

    def __init__(self, parts: list[tuple[Function, bytes]], lite: capstone.Cs,
                 detail: capstone.Cs, jump_labels: Optional[LabelIndex] = None,
                 noreturn: frozenset[int] = frozenset()) -> None:
        """``jump_labels``: static branch address -> target for the whole text, or None when
        unknown (then any jump may fall through and any nop may jump: see argregs.py).
        ``noreturn``: addresses of functions that never return (NORETURN_FUNCTIONS)."""
        self.entry = parts[0][0].start
        self._noreturn = noreturn
        self.entry_end = self.entry + len(parts[0][1])  # end of the first part's bytes
        self._detail = detail
        self._bytes: list[tuple[int, bytes]] = [(f.start, code) for f, code in parts]
        self.insns: list[Insn] = []
        part_starts = []
        for func, code in parts:
            part_starts.append(len(self.insns))
            for address, size, mnemonic, op_str in lite.disasm_lite(code, func.start):
                self.insns.append(Insn(address, size, mnemonic, op_str))
        self.index = {insn.address: i for i, insn in enumerate(self.insns)}
        self.jump_labels: Optional[dict[int, int]] = None
        if jump_labels is not None:
            self.jump_labels = self._static_branches(jump_labels)
        self._build_blocks(part_starts)
        self._details: dict[int, capstone.CsInsn] = {}

    def _static_branches(self, jump_labels: LabelIndex) -> Optional[dict[int, int]]:
        """This function's static branches and their targets (both edges each), or None if
        one of them does not start an instruction as disassembled: the disassembly and the
        kernel then disagree, and the conservative rule applies (argregs.py)."""
        found = {}
        for start, code in self._bytes:
            for addr in jump_labels.within(start, start + len(code)):
                if addr not in self.index:
                    return None
                found[addr] = jump_labels.targets[addr]
        return found

    # CFG
    def _build_blocks(self, part_starts: list[int]) -> None:
        leaders = set(part_starts)
        labels = self.jump_labels or {}
        for i, insn in enumerate(self.insns):
            if _ends_block(insn) or insn.address in labels or self._never_returns(insn):
                leaders.add(i + 1)
                target = labels.get(insn.address, branch_target(insn))
                if target is not None and target in self.index:
                    leaders.add(self.index[target])
        ordered = sorted(x for x in leaders if x < len(self.insns))
        self.blocks: list[Block] = []
        self.block_of: list[int] = [0] * len(self.insns)
        for n, first in enumerate(ordered):
            last = (ordered[n + 1] if n + 1 < len(ordered) else len(self.insns)) - 1
            self.blocks.append(Block(first, last))
            for i in range(first, last + 1):
                self.block_of[i] = n
        for n, block in enumerate(self.blocks):
            self._link(n, block)

    def _never_returns(self, insn: Insn) -> bool:
        return insn.mnemonic == "call" and branch_target(insn) in self._noreturn

    def _contiguous(self, i: int) -> bool:
        """Whether instruction i+1 directly follows instruction i in memory."""
        if i + 1 >= len(self.insns):
            return False
        insn = self.insns[i]
        return insn.address + insn.size == self.insns[i + 1].address

    def _link(self, n: int, block: Block) -> None:
        last = self.insns[block.last]
        m = last.mnemonic
        succs: list[int] = []
        label_target = (self.jump_labels or {}).get(last.address)
        if label_target is not None:  # a static branch: either way, whatever it is now
            if label_target in self.index:
                succs.append(self.block_of[self.index[label_target]])
            else:
                block.indirect = True  # a target we do not see: no dominance
            if self._contiguous(block.last):
                succs.append(self.block_of[block.last + 1])
        elif m.startswith("j"):
            target = branch_target(last)
            if target is None:
                block.indirect = True
            elif target in self.index:
                succs.append(self.block_of[self.index[target]])
            if m != "jmp" and self._contiguous(block.last):
                succs.append(self.block_of[block.last + 1])
        elif m == "ud2" and self._contiguous(block.last):
            # WARN_ON() is a ud2 the trap handler resumes after (BUG() never does, and an
            # edge too many only costs precision).
            succs.append(self.block_of[block.last + 1])
        elif not _ends_block(last) and not self._never_returns(last) \
                and self._contiguous(block.last):
            succs.append(self.block_of[block.last + 1])
        block.succs = succs
        for s in succs:
            self.blocks[s].preds.append(n)

    def detail(self, i: int) -> Optional[capstone.CsInsn]:
        """Full capstone decoding of instruction i (operands, registers written)."""
        insn = self.insns[i]
        cached = self._details.get(insn.address)
        if cached is None:
            for start, code in self._bytes:
                if start <= insn.address < start + len(code):
                    off = insn.address - start
                    cached = next(self._detail.disasm(code[off:off + insn.size], insn.address, 1),
                                  None)
                    break
            if cached is None:
                return None
            self._details[insn.address] = cached
        return cached

    def writes(self, i: int) -> set[str]:
        """64-bit registers instruction i may change (calls clobber caller-saved ones)."""
        if self.insns[i].mnemonic == "call":
            # The ftrace hook (call __fentry__, first instruction or right after endbr64)
            # runs before the function has read its arguments: it preserves them all.
            if i == 0 or (i == 1 and self.insns[0].mnemonic == "endbr64"):
                return set()
            return set(CALLER_SAVED)
        d = self.detail(i)
        if d is None:
            return set(CALLER_SAVED)
        _read, written = d.regs_access()
        return {r for r in (reg64(d.reg_name(x)) for x in written) if r}

    # control flow, complete
    def sound_successors(self) -> Optional[dict[int, set[int]]]:
        """Block -> every block that may run next, reachable blocks only; None when the
        graph may be incomplete (an indirect jump, or real code no known edge reaches: a
        jump table's targets).

        The kernel rewrites static branches (jump labels) while it runs: a ``jmp`` may
        become a nop and fall through, a nop may become a jump.  With the kernel's jump
        label table (jumplabels.py) each static branch has both edges already.  Without it
        every jump within the function also falls through here, and a function holding a
        nop that may be a static branch has no sound graph at all.
        """
        if any(block.indirect for block in self.blocks):
            return None
        succs = {n: self._successors(n) for n in range(len(self.blocks))}
        reachable = reachable_blocks(self.block_of[0], succs)
        if self.jump_labels is None and any(self._is_jump_label_nop(i) for n in reachable
               for i in range(self.blocks[n].first, self.blocks[n].last + 1)):
            return None
        for n, block in enumerate(self.blocks):
            if n not in reachable and not all(self.insns[i].mnemonic in _PADDING
                                              for i in range(block.first, block.last + 1)):
                return None
        return {n: succs[n] for n in reachable}

    def _successors(self, n: int) -> set[int]:
        """Block n's successors; without the jump label table a jump within the function
        also falls through."""
        block = self.blocks[n]
        result = set(block.succs)
        if self.jump_labels is not None:
            return result  # the static branches are known and already have both edges
        last = self.insns[block.last]
        target = branch_target(last)
        if last.mnemonic == "jmp" and target in self.index and self._contiguous(block.last):
            result.add(self.block_of[block.last + 1])
        return result

    def _is_jump_label_nop(self, i: int) -> bool:
        """The 5- or 2-byte nop a disabled static branch is patched to (the ftrace hook at
        the entry aside)."""
        insn = self.insns[i]
        return i > 1 and insn.mnemonic == "nop" and insn.size in (2, 5) and (
            insn.op_str in ("dword ptr [rax + rax]", ""))

    # stack depth
    def stack_offsets(self) -> dict[int, Optional[int]]:
        """sp relative to function entry, before each instruction (None: unknown)."""
        return {i: sp for i, (sp, _bp) in self.frame_offsets().items()}

    def frame_offsets(self) -> dict[int, tuple[Optional[int], Optional[int]]]:
        """(sp, rbp as a frame pointer) relative to the sp at function entry, before each
        reachable instruction (None: unknown, or rbp is no frame pointer there)."""
        entry_block = self.block_of[0]
        state_in: dict[int, tuple[Optional[int], Optional[int]]] = {entry_block: (0, None)}
        out: dict[int, tuple[Optional[int], Optional[int]]] = {}
        work = [entry_block]
        while work:
            n = work.pop()
            sp, bp = state_in[n]
            block = self.blocks[n]
            for i in range(block.first, block.last + 1):
                out[i] = (sp, bp)
                sp, bp = _stack_effect(self.insns[i], sp, bp)
            for s in block.succs:
                old = state_in.get(s)
                merged = (sp, bp) if old is None else _meet(old, (sp, bp))
                if merged != old:  # each block's state only ever loses knowledge: ends
                    state_in[s] = merged
                    work.append(s)
        return out


def _meet(a: tuple[Optional[int], Optional[int]],
          b: tuple[Optional[int], Optional[int]]) -> tuple[Optional[int], Optional[int]]:
    """Where paths with frame states a and b join: what they agree on stays known."""
    sp = a[0] if a[0] == b[0] else None
    bp = a[1] if a[1] == b[1] and sp is not None else None
    return sp, bp


def _imm(text: str) -> Optional[int]:
    try:
        return int(text.strip(), 0)
    except ValueError:
        return None


def _stack_effect(insn: Insn, sp: Optional[int],
                  bp: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """Apply one instruction to (sp, rbp-as-frame-pointer) offsets."""
    m, ops = insn.mnemonic, insn.op_str
    if sp is None:
        return None, None
    if m in ("push", "pushfq"):
        return sp - 8, bp
    if m in ("pop", "popfq"):
        return sp + 8, (None if ops == "rbp" else bp)
    if m == "leave":
        return (bp + 8 if bp is not None else None), None
    if ops.startswith("rsp, "):
        src = ops[5:]
        if m == "sub" and _imm(src) is not None:
            return sp - _imm(src), bp  # type: ignore[operator]
        if m == "add" and _imm(src) is not None:
            return sp + _imm(src), bp  # type: ignore[operator]
        if m == "mov" and src == "rbp":
            return bp, bp
        if m == "lea":
            match = re.fullmatch(r"\[(rsp|rbp) ([+-]) (0x[0-9a-f]+|\d+)\]", src)
            base = {"rsp": sp, "rbp": bp}.get(match.group(1)) if match else None
            if match and base is not None:
                delta = int(match.group(3), 0)
                return (base + delta if match.group(2) == "+" else base - delta), bp
        return None, None
    if m == "mov" and ops == "rbp, rsp":
        return sp, sp
    if ops.startswith(("rbp, ", "ebp, ")) and m not in ("cmp", "test"):
        return sp, None  # rbp written: no longer the frame pointer
    return sp, bp


# --- provenance -----------------------------------------------------------


@dataclass
class Definition:
    kind: str  # XFRM, OTHER, ENTRY, UNKNOWN
    base: Optional[str] = None  # XFRM: base register of the mib load; ENTRY: the register
    written: frozenset = frozenset()  # registers written between the load and the site
    text: str = ""


def mem_operand(insn: capstone.CsInsn) -> Optional[capstone.x86.X86Op]:
    for op in insn.operands:
        if op.type == X86.X86_OP_MEM:
            return op
    return None


def _is_mib_load(code: FunctionCode, i: int, reg: str, mib_offset: int) -> Optional[str]:
    """Base register if instruction i is ``mov reg, qword ptr [base + mib_offset]``."""
    d = code.detail(i)
    if d is None or d.mnemonic != "mov" or len(d.operands) != 2:
        return None
    dst, src = d.operands
    if dst.type != X86.X86_OP_REG or reg64(d.reg_name(dst.reg)) != reg or dst.size != 8:
        return None
    if src.type != X86.X86_OP_MEM or src.mem.disp != mib_offset:
        return None
    if src.mem.index != 0 or src.mem.segment != 0 or src.mem.base == 0:
        return None
    return reg64(d.reg_name(src.mem.base))


def register_copy_source(code: FunctionCode, i: int, reg: str) -> Optional[str]:
    """Source register if instruction i is ``mov reg, other`` (64-bit copy)."""
    d = code.detail(i)
    if d is None or d.mnemonic != "mov" or len(d.operands) != 2:
        return None
    dst, src = d.operands
    if dst.type == X86.X86_OP_REG and src.type == X86.X86_OP_REG and dst.size == 8:
        if reg64(d.reg_name(dst.reg)) == reg:
            return reg64(d.reg_name(src.reg))
    return None


def reaching_definitions(code: FunctionCode, site: int, reg: str,
                         mib_offset: int) -> list[Definition]:
    """Every definition of ``reg`` that reaches instruction ``site``, walking backwards."""
    defs: list[Definition] = []
    seen: set[tuple[int, str]] = set()
    # (block, instruction index to examine next, register, registers written since)
    work: list[tuple[int, int, str, frozenset]] = [(code.block_of[site], site - 1, reg,
                                                    frozenset())]
    while work:
        b, i, r, written = work.pop()
        block = code.blocks[b]
        defined = False
        while i >= block.first:
            clobbered = code.writes(i)
            if r in clobbered:
                src = register_copy_source(code, i, r)
                if src is not None:  # mov r, src: keep following src
                    written, r = written | {r}, src
                    i -= 1
                    continue
                defs.append(_definition(code, i, r, mib_offset, written))
                defined = True
                break
            written = written | clobbered
            i -= 1
        if defined:
            continue
        if block.first == 0:
            defs.append(Definition("ENTRY", base=r, text=f"{r} at function entry"))
        elif not block.preds:
            defs.append(Definition("UNKNOWN", text="block reached only through an indirect jump"))
        for p in block.preds:
            if (p, r) not in seen:
                if len(seen) >= _BLOCK_LIMIT:
                    defs.append(Definition("UNKNOWN", text="control flow too large to follow"))
                    return defs
                seen.add((p, r))
                work.append((p, code.blocks[p].last, r, written))
    return defs


def _definition(code: FunctionCode, i: int, reg: str, mib_offset: int,
                written: frozenset) -> Definition:
    base = _is_mib_load(code, i, reg, mib_offset)
    if base is not None:
        return Definition(XFRM, base, written, code.insns[i].op_str)
    insn = code.insns[i]
    return Definition(OTHER, text=f"{insn.mnemonic} {insn.op_str}")
