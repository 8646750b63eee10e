"""AArch64 machine code of one kernel function: disassembly, control-flow graph, the registers
each instruction writes, stack depth, and what value a register holds (symbolically).

The arm64 counterpart of x86_code.py, for the site resolver (arm64_sites.py).  A64 has fixed
4-byte instructions, so a function's text decodes without ambiguity; capstone's operand
strings are used for the few instruction forms the value analysis understands, its register
lists (``regs_access``) for what an instruction writes, widened where capstone 5 under-reports
(the LSE atomics' destination, calls).

Values are tracked as :class:`Term` sums: ``net->mib.xfrm_statistics`` (a 64-bit load at the
MIB's BTF offset), this CPU's per-CPU offset (``mrs xN, tpidr_el1``, or ``tpidr_el2`` on VHE
hosts: arch/arm64/include/asm/percpu.h, ``__kern_my_cpu_offset``), plus a constant.  Anything
else a definition computes is an opaque "other" value, which is what keeps the analysis
conservative: a site needs every definition on every path to be understood.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import capstone

from xfrmtrace.kernel.jumplabels import LabelIndex
from xfrmtrace.kernel.kallsyms import Function
from xfrmtrace.resolve.cfg import reachable_blocks

INSN_BYTES = 4
_BLOCK_LIMIT = 256  # (block, register) pairs one backward search may visit
_DEPTH_LIMIT = 8  # definitions followed through add/mov chains
_TERMS_LIMIT = 16  # distinct values one register may have at one point
#: AAPCS64: x0-x18 and the link register may be changed by a call (x18 is the platform
#: register, used by shadow call stacks: clobbered for our purposes).
CALL_CLOBBERED = frozenset({*(f"x{n}" for n in range(19)), "x30"})
_CONDITIONAL = ("cbz", "cbnz", "tbz", "tbnz")
# What may precede a function's first real instruction: the ftrace patch nops, a BTI
# landing pad, pointer authentication of the return address.
_ENTRY_PAD = ("nop", "bti", "paciasp", "hint")
_NO_DESTINATION = ("cmp", "cmn", "tst", "ccmp", "ccmn", "prfm", "dmb", "dsb", "isb", "nop",
                   "hint", "bti", "paciasp", "autiasp", "msr", "brk", "hlt", "casp")
_LSE_LOAD_OP = re.compile(r"(ld(add|clr|eor|set|smax|smin|umax|umin)|swp)[alhb]*$")
_PER_CPU_OFFSET = re.compile(r"x(\d+), tpidr_el[12]$")
_MIB_LOAD = re.compile(r"x(\d+), \[(x\d+|fp|lr|sp), #(0x[0-9a-f]+|\d+)\]$")


def xreg(name: str) -> Optional[str]:
    """``w3`` -> ``x3``; ``fp``/``lr`` -> ``x29``/``x30``; None for anything else (sp, xzr,
    flags, vector registers)."""
    if name in ("fp", "x29", "w29"):
        return "x29"
    if name in ("lr", "x30", "w30"):
        return "x30"
    if len(name) > 1 and name[0] in "xw" and name[1:].isdigit() and int(name[1:]) < 31:
        return "x" + name[1:]
    return None


@dataclass
class Insn:
    address: int
    mnemonic: str
    op_str: str

    @property
    def operands(self) -> list[str]:
        """Top-level operands as written (a memory operand ``[x0, #8]`` stays one)."""
        parts, depth, start = [], 0, 0
        for n, ch in enumerate(self.op_str):
            if ch == "[":
                depth += 1
            elif ch == "]":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(self.op_str[start:n].strip())
                start = n + 1
        if self.op_str.strip():
            parts.append(self.op_str[start:].strip())
        return parts


def branch_target(insn: Insn) -> Optional[int]:
    """The target of a direct branch (b, b.cond, bl, cbz/cbnz, tbz/tbnz)."""
    m = insn.mnemonic
    if m in ("b", "bl") or m.startswith("b.") or m in _CONDITIONAL:
        last = insn.operands[-1] if insn.operands else ""
        if last.startswith("#0x"):
            return int(last[1:], 16)
    return None


def _is_branch(insn: Insn) -> bool:
    m = insn.mnemonic
    return (m in ("b", "br", "ret", "eret", "retaa", "retab", "braa", "brab", "braaz", "brabz")
            or m.startswith("b.") or m in _CONDITIONAL)


def _ends_block(insn: Insn) -> bool:
    return _is_branch(insn) or insn.mnemonic in ("brk", "hlt", "udf")


@dataclass
class Block:
    first: int
    last: int
    succs: list[int] = field(default_factory=list)
    preds: list[int] = field(default_factory=list)
    indirect: bool = False  # ends in br: successors unknown


@dataclass(frozen=True)
class Term:
    """One possible value: [net->mib.xfrm_statistics] + [this CPU's offset] + offset, or an
    opaque value described by ``other``."""

    mib: bool = False
    cpu: bool = False
    offset: int = 0
    net: Optional[str] = None  # mib: the register the MIB pointer was loaded through
    other: Optional[str] = None  # an instruction the analysis does not follow

    def plus(self, other: Term) -> Term:
        if self.other or other.other or (self.mib and other.mib) or (self.cpu and other.cpu):
            return Term(other=self.other or other.other or "a sum of two MIB or CPU values")
        return Term(mib=self.mib or other.mib, cpu=self.cpu or other.cpu,
                    offset=self.offset + other.offset, net=self.net or other.net)


class FunctionCode:
    """Disassembly and control-flow graph of an arm64 function and its ``.cold`` parts."""

    def __init__(self, parts: list[tuple[Function, bytes]], detail: capstone.Cs,
                 jump_labels: Optional[LabelIndex] = None,
                 noreturn: frozenset[int] = frozenset()) -> None:
        self.entry = parts[0][0].start
        self.entry_end = self.entry + len(parts[0][1])  # end of the first part's bytes
        self._noreturn = noreturn
        self.insns: list[Insn] = []
        self._details: list[capstone.CsInsn] = []
        part_starts = []
        for func, code in parts:
            part_starts.append(len(self.insns))
            for insn in detail.disasm(code[:len(code) - len(code) % INSN_BYTES], func.start):
                self.insns.append(Insn(insn.address, insn.mnemonic, insn.op_str))
                self._details.append(insn)
        self.index = {insn.address: i for i, insn in enumerate(self.insns)}
        self.jump_labels: dict[int, int] = {}
        self.knows_static_branches = jump_labels is not None
        if jump_labels is not None:
            for func, code in parts:
                for addr in jump_labels.within(func.start, func.start + len(code)):
                    self.jump_labels[addr] = jump_labels.targets[addr]
        self._part_starts = frozenset(part_starts)
        self._build_blocks(part_starts)
        self._writes: dict[int, frozenset[str]] = {}
        self._reachable: Optional[set[int]] = None
        self._frames: Optional[dict[int, tuple[Optional[int], Optional[int]]]] = None

    # --- control flow -------------------------------------------------------------------

    def _build_blocks(self, part_starts: list[int]) -> None:
        leaders = set(part_starts)
        for i, insn in enumerate(self.insns):
            target = self.jump_labels.get(insn.address, branch_target(insn))
            if _ends_block(insn) or insn.address in self.jump_labels or self._never_returns(i):
                leaders.add(i + 1)
            if target is not None and target in self.index and insn.mnemonic != "bl":
                leaders.add(self.index[target])
        ordered = sorted(x for x in leaders if x < len(self.insns))
        self.blocks: list[Block] = []
        self.block_of = [0] * len(self.insns)
        for n, first in enumerate(ordered):
            last = (ordered[n + 1] if n + 1 < len(ordered) else len(self.insns)) - 1
            self.blocks.append(Block(first, last))
            for i in range(first, last + 1):
                self.block_of[i] = n
        for n, block in enumerate(self.blocks):
            self._link(n, block)

    def _never_returns(self, i: int) -> bool:
        insn = self.insns[i]
        return insn.mnemonic == "bl" and branch_target(insn) in self._noreturn

    def _contiguous(self, i: int) -> bool:
        return (i + 1 < len(self.insns)
                and self.insns[i].address + INSN_BYTES == self.insns[i + 1].address)

    def _link(self, n: int, block: Block) -> None:
        last = self.insns[block.last]
        succs: list[int] = []
        label = self.jump_labels.get(last.address)
        target = label if label is not None else branch_target(last)
        m = last.mnemonic
        if label is not None or m == "b" or m.startswith("b.") or m in _CONDITIONAL:
            if target is None or target not in self.index:
                block.indirect = block.indirect or target is None
            else:
                succs.append(self.block_of[self.index[target]])
            if (label is not None or m != "b") and self._contiguous(block.last):
                succs.append(self.block_of[block.last + 1])
        elif m in ("br", "braa", "brab", "braaz", "brabz"):
            block.indirect = True
        elif m == "brk" and self._contiguous(block.last):
            succs.append(self.block_of[block.last + 1])  # WARN() resumes after its brk
        elif not _ends_block(last) and not self._never_returns(block.last) \
                and self._contiguous(block.last):
            succs.append(self.block_of[block.last + 1])
        block.succs = succs
        for s in succs:
            self.blocks[s].preds.append(n)

    def reachable(self, i: int) -> bool:
        """Whether instruction i can run: some path of known edges leads from the entry (or
        a ``.cold`` part's start) to it.  An alternative's replacement instructions, which
        arm64 keeps after the function they patch (``.subsection 1``), cannot."""
        if self._reachable is None:
            starts = {n for n, block in enumerate(self.blocks) if not block.preds}
            seen: set[int] = set()
            work = [self.block_of[0], *[n for n in starts if self.blocks[n].first in
                                        self._part_starts]]
            while work:
                n = work.pop()
                if n not in seen:
                    seen.add(n)
                    work.extend(self.blocks[n].succs)
            self._reachable = seen
        return self.block_of[i] in self._reachable

    def sound_successors(self) -> Optional[dict[int, set[int]]]:
        """Block -> every block that may run next, for the blocks the entry reaches; None
        when the graph may be incomplete: an indirect branch (a jump table), or, without the
        kernel's jump label table, a ``nop`` that may be a disabled static branch.

        Code no known edge reaches is normal on arm64 and is not a reason to give up: an
        alternative patched at boot leaves code behind that never runs again (the LL/SC
        path after ``system_uses_lse_atomics()``'s ``b`` became a ``nop``).  Static
        branches are the one patching that goes on while tracing, and only the table says
        where they are; without it a ``b`` within the function also falls through.
        """
        succs = {n: set(block.succs) for n, block in enumerate(self.blocks)}
        if not self.knows_static_branches:
            for n, block in enumerate(self.blocks):
                last = self.insns[block.last]
                if last.mnemonic == "b" and branch_target(last) in self.index \
                        and self._contiguous(block.last):
                    succs[n].add(self.block_of[block.last + 1])
        reachable = reachable_blocks(self.block_of[0], succs)
        if any(self.blocks[n].indirect for n in reachable):
            return None
        if not self.knows_static_branches:
            patch_area = 0  # ftrace's entry nops (-fpatchable-function-entry), BTI, PAC
            while patch_area < len(self.insns) and \
                    self.insns[patch_area].mnemonic in _ENTRY_PAD:
                patch_area += 1
            if any(self.insns[i].mnemonic == "nop" for n in reachable
                   for i in range(max(self.blocks[n].first, patch_area),
                                  self.blocks[n].last + 1)):
                return None
        return {n: succs[n] for n in reachable}

    # --- registers ----------------------------------------------------------------------

    def writes(self, i: int) -> frozenset[str]:
        """x registers instruction i may change: capstone's list, plus the first operand of
        anything that has a destination (capstone 5 omits some, e.g. ``ldadd``'s), plus what
        a call clobbers."""
        cached = self._writes.get(i)
        if cached is not None:
            return cached
        insn, d = self.insns[i], self._details[i]
        m = insn.mnemonic
        result: set[str] = set()
        if m not in ("cmp", "cmn", "tst", "ccmp", "ccmn"):  # flags only (capstone 5 may
            _read, written = d.regs_access()                # name the tested register)
            result = {r for r in (xreg(d.reg_name(x)) for x in written) if r}
        ops = insn.operands
        if m in ("bl", "blr", "blraa", "blrab", "blraaz", "blrabz"):
            result |= CALL_CLOBBERED
        elif _LSE_LOAD_OP.match(m):
            if len(ops) >= 2 and xreg(ops[1]):
                result.add(xreg(ops[1]) or "")  # the old value: ldadd xs, xt, [xn]
        elif m.startswith("cas"):
            result |= {r for r in map(xreg, ops[:2 if m.startswith("casp") else 1]) if r}
        elif not (m.startswith(("st", "b")) or m in _NO_DESTINATION or m in _CONDITIONAL
                  or m.startswith("ret")):
            if ops and xreg(ops[0]):
                result.add(xreg(ops[0]) or "")
            if m.startswith("ldp") or m.startswith("ldnp") or m.startswith("ldxp") \
                    or m.startswith("ldaxp"):
                result |= {r for r in map(xreg, ops[:2]) if r}
        if m.startswith(("stxr", "stlxr", "stxp", "stlxp")) and ops and xreg(ops[0]):
            result.add(xreg(ops[0]) or "")  # the status register
        frozen = frozenset(result)
        self._writes[i] = frozen
        return frozen

    # --- stack depth --------------------------------------------------------------------

    def stack_offsets(self) -> dict[int, Optional[int]]:
        """sp relative to the function's entry, before each reachable instruction (None:
        unknown)."""
        return {i: sp for i, (sp, _fp) in self.frame_offsets().items()}

    def frame_offsets(self) -> dict[int, tuple[Optional[int], Optional[int]]]:
        """(sp, x29 as this function's frame pointer) relative to the sp at its entry,
        before each reachable instruction (None: unknown, or x29 is not yet, or no longer,
        this frame's pointer)."""
        if self._frames is not None:
            return self._frames
        entry = self.block_of[0]
        state_in: dict[int, tuple[Optional[int], Optional[int]]] = {entry: (0, None)}
        out: dict[int, tuple[Optional[int], Optional[int]]] = {}
        work = [entry]
        while work:
            n = work.pop()
            frame = state_in[n]
            block = self.blocks[n]
            for i in range(block.first, block.last + 1):
                out[i] = frame
                frame = _frame_effect(self.insns[i], frame, "x29" in self.writes(i))
            for s in block.succs:
                old = state_in.get(s)
                merged = frame if old is None else _meet_frames(old, frame)
                if merged != old:  # each block's state only ever loses knowledge: this ends
                    state_in[s] = merged
                    work.append(s)
        self._frames = out
        return out

    # --- values -------------------------------------------------------------------------

    def values(self, i: int, reg: str, mib_offset: int, depth: int = 0,
               via: Optional[tuple[int, int]] = None) -> set[Term]:
        """Every value ``reg`` may hold before instruction i, one per reaching definition
        (as :class:`Term`).
        ``via`` (block, predecessor): only paths that enter that block from that
        predecessor."""
        terms: set[Term] = set()
        seen: set[tuple[int, str]] = set()
        work: list[tuple[int, int]] = [(self.block_of[i], i - 1)]
        while work:
            b, j = work.pop()
            block = self.blocks[b]
            defined = False
            while j >= block.first:
                if reg in self.writes(j):
                    terms |= self._defined(j, reg, mib_offset, depth, via)
                    defined = True
                    break
                j -= 1
            if defined:
                continue
            if block.first == 0:
                terms.add(Term(other=f"{reg} at function entry"))
            elif not block.preds:
                terms.add(Term(other="a block no known edge reaches"))
            for p in block.preds:
                if via is not None and b == via[0] and p != via[1]:
                    continue
                if (p, reg) in seen:
                    continue
                if len(seen) >= _BLOCK_LIMIT or len(terms) > _TERMS_LIMIT:
                    return {Term(other="control flow too large to follow")}
                seen.add((p, reg))
                work.append((p, self.blocks[p].last))
        return terms

    def _defined(self, j: int, reg: str, mib_offset: int, depth: int,
                 via: Optional[tuple[int, int]]) -> set[Term]:
        """The values instruction j gives ``reg``."""
        insn = self.insns[j]
        m, ops = insn.mnemonic, insn.operands
        text = f"{m} {insn.op_str}"
        if depth >= _DEPTH_LIMIT or not ops or xreg(ops[0]) != reg or not ops[0].startswith("x"):
            return {Term(other=text)}
        if m == "mrs" and _PER_CPU_OFFSET.match(insn.op_str):
            return {Term(cpu=True)}
        if m == "ldr":
            load = _MIB_LOAD.match(insn.op_str)
            if load and int(load.group(3), 0) == mib_offset and xreg(load.group(2)):
                return {Term(mib=True, net=xreg(load.group(2)))}
            return {Term(other=text)}
        if m in ("mov", "movz") and len(ops) == 2:
            if ops[1].startswith("#"):
                return {Term(offset=_immediate(ops[1]))}
            if xreg(ops[1]) and ops[1].startswith("x"):
                return self.values(j, xreg(ops[1]) or "", mib_offset, depth + 1, via)
        if m in ("add", "sub") and len(ops) in (3, 4):
            left = xreg(ops[1]) if ops[1].startswith("x") else None
            if left is None:
                return {Term(other=text)}
            lefts = self.values(j, left, mib_offset, depth + 1, via)
            if ops[2].startswith("#"):
                shift = _shift(ops[3] if len(ops) == 4 else "")
                if shift is None:
                    return {Term(other=text)}
                amount = _immediate(ops[2]) << shift
                delta = Term(offset=amount if m == "add" else -amount)
                return {t.plus(delta) for t in lefts}
            right = xreg(ops[2]) if ops[2].startswith("x") else None
            if m == "add" and right is not None and len(ops) == 3:
                rights = self.values(j, right, mib_offset, depth + 1, via)
                return {a.plus(b) for a in lefts for b in rights}
        return {Term(other=text)}


def _immediate(text: str) -> int:
    return int(text.lstrip("#"), 0)


def _shift(text: str) -> Optional[int]:
    """``lsl #12`` -> 12 (the only shift an add/sub immediate takes); none -> 0; anything
    else None."""
    if not text:
        return 0
    match = re.fullmatch(r"lsl #(\d+)", text)
    return int(match.group(1)) if match else None


def _meet_frames(a: tuple[Optional[int], Optional[int]],
                 b: tuple[Optional[int], Optional[int]]) -> tuple[Optional[int], Optional[int]]:
    """Where paths with frame states a and b join: what they agree on stays known."""
    return (a[0] if a[0] == b[0] else None, a[1] if a[1] == b[1] else None)


def _frame_effect(insn: Insn, frame: tuple[Optional[int], Optional[int]],
                  writes_fp: bool) -> tuple[Optional[int], Optional[int]]:
    """(sp, fp) after instruction ``insn``.  sp: ``sub/add sp, sp, #n``, pre-indexed
    ``[sp, #-n]!`` and post-indexed ``[sp], #n`` writebacks, ``mov sp, x29`` (other writes of
    sp make it unknown).  fp: ``mov x29, sp`` and ``add x29, sp, #n`` set it; any other write
    of x29 (the epilogue's ``ldp x29, x30, [sp], #n``) ends it."""
    sp, fp = frame
    ops = insn.operands
    if ops[:1] == ["x29"] and insn.mnemonic in ("mov", "add") and ops[1:2] == ["sp"]:
        delta = _immediate(ops[2]) if len(ops) == 3 and ops[2].startswith("#") else 0
        if len(ops) == 2 or (len(ops) == 3 and ops[2].startswith("#")):
            return sp, None if sp is None else sp + delta
    if writes_fp:
        fp = None
    if sp is None:
        return None, fp
    if ops[:2] == ["sp", "sp"] and len(ops) == 3 and ops[2].startswith("#"):
        amount = _immediate(ops[2])
        return (sp - amount if insn.mnemonic == "sub" else sp + amount
                if insn.mnemonic == "add" else None), fp
    if ops == ["sp", "x29"] and insn.mnemonic == "mov":
        return fp, fp
    pre = re.search(r"\[sp, #(-?(?:0x[0-9a-f]+|\d+))\]!$", insn.op_str)
    if pre:
        return sp + int(pre.group(1), 0), fp
    post = re.search(r"\[sp\], #(-?(?:0x[0-9a-f]+|\d+))$", insn.op_str)
    if post:
        return sp + int(post.group(1), 0), fp
    if ops and ops[0] == "sp":
        return None, fp
    return sp, fp
