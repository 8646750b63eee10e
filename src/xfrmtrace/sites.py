"""Find every instruction that increments an XFRM statistics counter.

``XFRM_INC_STATS(net, FIELD)`` compiles to a load of the per-CPU pointer
``net->mib.xfrm_statistics`` followed by a gs-relative increment::

    mov  rax, qword ptr [rdi + OFF]        ; OFF = offsetof(struct net, mib.xfrm_statistics)
    inc  qword ptr gs:[rax + 8 * FIELD]    ; or: add qword ptr gs:[...], 1

Kernel text holds hundreds of gs-relative increments (every SNMP counter
looks alike).  A candidate counts as an XFRM site only when every definition
of its base register that reaches it is that load (register copies are
followed, across basic blocks and into ``.cold`` parts of a function).  A byte
prefilter keeps the work small: candidates come from a regex over the raw
text, and only functions whose bytes contain OFF are disassembled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping, Optional

import capstone
from capstone import x86_const as X86

from xfrmtrace.jumplabels import LabelIndex
from xfrmtrace.kallsyms import VMLINUX, Function, Kallsyms
from xfrmtrace.model import DOUBTFUL, OTHER, XFRM, AuditEntry, Resolution, Site

# gs prefix, REX.W (any R/X/B), then inc r/m64 (FF /0) or add r/m64, imm8 (83 /0)
# with a disp8 or disp32 memory operand.  Index 0 (no displacement) is
# LINUX_MIB_XFRMNUM, never incremented.
_GS_INCREMENT = re.compile(rb"\x65[\x48-\x4f][\xff\x83][\x40-\x47\x80-\x87]", re.S)
_SCAN_CHUNK = 4 << 20  # bytes of core kernel text scanned at a time
_SCAN_OVERLAP = 16  # > the length of a _GS_INCREMENT match

CALLER_SAVED = frozenset({"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"})
_BLOCK_LIMIT = 256  # (block, register) pairs a backward search may visit per site

# --- registers ----------------------------------------------------------------

_REG64 = {
    **{r: r for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")},
    **{f"e{r[1:]}": r for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")},
    "ax": "rax", "bx": "rbx", "cx": "rcx", "dx": "rdx",
    "si": "rsi", "di": "rdi", "bp": "rbp", "sp": "rsp",
    "al": "rax", "ah": "rax", "bl": "rbx", "bh": "rbx",
    "cl": "rcx", "ch": "rcx", "dl": "rdx", "dh": "rdx",
    "sil": "rsi", "dil": "rdi", "bpl": "rbp", "spl": "rsp",
}
for _n in range(8, 16):
    for _suffix in ("", "d", "w", "b"):
        _REG64[f"r{_n}{_suffix}"] = f"r{_n}"


def reg64(name: str) -> Optional[str]:
    """The 64-bit general purpose register a (sub)register name belongs to."""
    return _REG64.get(name)


# --- code model -------------------------------------------------------------


@dataclass
class _Insn:
    address: int
    size: int
    mnemonic: str
    op_str: str


@dataclass
class _Block:
    first: int  # index of first instruction
    last: int  # index of last instruction
    succs: list[int] = field(default_factory=list)  # block ids
    preds: list[int] = field(default_factory=list)
    indirect: bool = False  # ends in an indirect jump: successors unknown


def branch_target(insn: _Insn) -> Optional[int]:
    try:
        return int(insn.op_str, 16) if insn.op_str.startswith("0x") else None
    except ValueError:
        return None


def _ends_block(insn: _Insn) -> bool:
    m = insn.mnemonic
    return m.startswith("j") or m.startswith("ret") or m in ("ud2", "int3", "hlt", "iretq")


class FunctionCode:
    """Disassembly and control-flow graph of a function and its ``.cold`` parts."""

    def __init__(self, parts: list[tuple[Function, bytes]], lite: capstone.Cs,
                 detail: capstone.Cs, jump_labels: Optional[LabelIndex] = None) -> None:
        """``jump_labels``: static branch address -> target for the whole text, or None when
        unknown (then any jump may fall through and any nop may jump: see argregs.py)."""
        self.entry = parts[0][0].start
        self.entry_end = self.entry + len(parts[0][1])  # end of the first part's bytes
        self._detail = detail
        self._bytes: list[tuple[int, bytes]] = [(f.start, code) for f, code in parts]
        self.insns: list[_Insn] = []
        part_starts = []
        for func, code in parts:
            part_starts.append(len(self.insns))
            for address, size, mnemonic, op_str in lite.disasm_lite(code, func.start):
                self.insns.append(_Insn(address, size, mnemonic, op_str))
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
            if _ends_block(insn) or insn.address in labels:
                leaders.add(i + 1)
                target = labels.get(insn.address, branch_target(insn))
                if target is not None and target in self.index:
                    leaders.add(self.index[target])
        ordered = sorted(x for x in leaders if x < len(self.insns))
        self.blocks: list[_Block] = []
        self.block_of: list[int] = [0] * len(self.insns)
        for n, first in enumerate(ordered):
            last = (ordered[n + 1] if n + 1 < len(ordered) else len(self.insns)) - 1
            self.blocks.append(_Block(first, last))
            for i in range(first, last + 1):
                self.block_of[i] = n
        for n, block in enumerate(self.blocks):
            self._link(n, block)

    def _contiguous(self, i: int) -> bool:
        """Whether instruction i+1 directly follows instruction i in memory."""
        if i + 1 >= len(self.insns):
            return False
        insn = self.insns[i]
        return insn.address + insn.size == self.insns[i + 1].address

    def _link(self, n: int, block: _Block) -> None:
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
        elif not _ends_block(last) and self._contiguous(block.last):
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

    # stack depth
    def stack_offsets(self) -> dict[int, Optional[int]]:
        """sp relative to function entry, before each instruction (None: unknown)."""
        entry_block = self.block_of[0]
        state_in: dict[int, tuple[Optional[int], Optional[int]]] = {entry_block: (0, None)}
        out: dict[int, Optional[int]] = {}
        work = [entry_block]
        while work:
            n = work.pop()
            sp, bp = state_in[n]
            block = self.blocks[n]
            for i in range(block.first, block.last + 1):
                out[i] = sp
                sp, bp = _stack_effect(self.insns[i], sp, bp)
            for s in block.succs:
                new = (sp, bp)
                old = state_in.get(s)
                if old is None:
                    state_in[s] = new
                    work.append(s)
                elif old != new and old[0] is not None:
                    state_in[s] = (None, None)  # paths disagree: depth unknown there
                    work.append(s)
        return out


def _imm(text: str) -> Optional[int]:
    try:
        return int(text.strip(), 0)
    except ValueError:
        return None


def _stack_effect(insn: _Insn, sp: Optional[int],
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
    return sp, bp


# --- provenance -----------------------------------------------------------


@dataclass
class _Def:
    kind: str  # XFRM, OTHER, ENTRY, UNKNOWN
    base: Optional[str] = None  # XFRM: base register of the mib load; ENTRY: the register
    written: frozenset = frozenset()  # registers written between the load and the site
    text: str = ""


def _mem_operand(insn: capstone.CsInsn) -> Optional[capstone.x86.X86Op]:
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


def reaching_definitions(code: FunctionCode, site: int, reg: str, mib_offset: int) -> list[_Def]:
    """Every definition of ``reg`` that reaches instruction ``site``, walking backwards."""
    defs: list[_Def] = []
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
            defs.append(_Def("ENTRY", base=r, text=f"{r} at function entry"))
        elif not block.preds:
            defs.append(_Def("UNKNOWN", text="block reached only through an indirect jump"))
        for p in block.preds:
            if (p, r) not in seen:
                if len(seen) >= _BLOCK_LIMIT:
                    defs.append(_Def("UNKNOWN", text="control flow too large to follow"))
                    return defs
                seen.add((p, r))
                work.append((p, code.blocks[p].last, r, written))
    return defs


def _definition(code: FunctionCode, i: int, reg: str, mib_offset: int,
                written: frozenset) -> _Def:
    base = _is_mib_load(code, i, reg, mib_offset)
    if base is not None:
        return _Def(XFRM, base, written, code.insns[i].op_str)
    insn = code.insns[i]
    return _Def(OTHER, text=f"{insn.mnemonic} {insn.op_str}")


# --- resolver -------------------------------------------------------------


ReadText = Callable[[int, int], bytes]


class SiteResolver:
    """Classifies gs-relative increments of kernel and module text."""

    def __init__(self, read: ReadText, syms: Kallsyms, mib_offset: int,
                 counters: dict[int, str],
                 needed_slots: Optional[Callable[[str, str], frozenset[int]]] = None,
                 jump_labels: Optional[Mapping[int, int]] = None) -> None:
        """``needed_slots(function, object)``: the argument positions events of that
        function's sites read (from BTF); without it, arguments are recorded at entry.
        ``jump_labels``: vmlinux's static branches (jumplabels.py), if known."""
        self._read = read
        self._jump_labels = LabelIndex(jump_labels) if jump_labels is not None else None
        self._syms = syms
        self._needed_slots = needed_slots
        self._mib_offset = mib_offset
        self._mib_bytes = [mib_offset.to_bytes(4, "little")]
        if mib_offset < 0x80:
            self._mib_bytes.append(bytes([mib_offset]))
        self._counters = counters
        self._lite = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._detail = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._detail.detail = True

    def resolve(self, objects: Optional[Iterable[str]] = None) -> Resolution:
        """Sites in ``objects`` (default: vmlinux and every loaded module)."""
        result = Resolution()
        for obj in objects if objects is not None else self._syms.objects():
            for func, addrs in self._candidates(obj).items():
                self._classify_function(func, addrs, result)
        result.sites.sort(key=lambda s: s.address)
        result.audit.sort(key=lambda a: a.address)
        return result

    # candidates
    def _candidates(self, obj: str) -> dict[str, list[int]]:
        """Group parent name -> candidate addresses, for one object."""
        groups: dict[str, list[int]] = {}
        for start, data, limit in self._text_regions(obj):
            for match in _GS_INCREMENT.finditer(data):
                if match.start() >= limit:
                    break  # in the overlap: the next region finds it
                addr = start + match.start()
                func = self._syms.lookup(addr)
                if func is None or func.object != obj:
                    continue
                groups.setdefault(_parent_name(func.name), []).append(addr)
        return groups

    def _text_regions(self, obj: str) -> Iterator[tuple[int, bytes, int]]:
        """(address, bytes, limit): matches must start before ``limit`` in ``bytes``.

        Core kernel text (tens of MiB) comes in chunks that overlap by more than a match's
        length, so the scan never holds all of it: it sets the tool's peak memory.
        """
        if obj != VMLINUX:
            for func in self._syms.functions(obj):
                data = self._read(func.start, func.size)
                if data:
                    yield func.start, data, len(data)
            return
        addr, end = self._syms.core_text_range()
        while addr < end:
            data = self._read(addr, min(_SCAN_CHUNK + _SCAN_OVERLAP, end - addr))
            if not data:
                break
            step = min(_SCAN_CHUNK, len(data))
            yield addr, data, step
            addr += step

    # classification
    def _classify_function(self, parent: str, addrs: list[int], result: Resolution) -> None:
        first = self._syms.lookup(addrs[0])
        assert first is not None
        obj = first.object
        parts = self._group_parts(parent, obj, first)
        code_bytes = [(f, self._read(f.start, f.size)) for f in parts]
        if not any(pattern in code for _f, code in code_bytes for pattern in self._mib_bytes):
            for addr in addrs:
                result.audit.append(self._entry(addr, OTHER, "function never loads "
                                                "net->mib.xfrm_statistics"))
            return
        code = FunctionCode(code_bytes, self._lite, self._detail,
                            self._jump_labels if obj == VMLINUX else None)
        offsets: Optional[dict[int, Optional[int]]] = None
        first_site = len(result.sites)
        for addr in addrs:
            i = code.index.get(addr)
            if i is None:
                result.audit.append(self._entry(addr, OTHER, "not an instruction boundary"))
                continue
            if offsets is None:
                offsets = code.stack_offsets()
            self._classify_site(code, i, parent, offsets, result)
        found = result.sites[first_site:]
        if found and offsets is not None and parts[0].name == parent:
            result.sites[first_site:] = self._with_argument_plan(code, found, offsets)

    def _with_argument_plan(self, code: FunctionCode, found: list[Site],
                            offsets: dict[int, Optional[int]]) -> list[Site]:
        """``found`` (sites of one function, its entry part known) with where their
        arguments come from: see argregs.py."""
        from xfrmtrace.argregs import plan_arguments  # argregs builds on this module

        entry_function = found[0].entry_function
        if self._needed_slots is None or entry_function is None:
            return found
        needed = self._needed_slots(entry_function, found[0].object)
        plan = plan_arguments(code, [code.index[s.address] for s in found], needed, offsets)
        return [replace(s, arg_regs=plan.site_registers, record=plan.record) for s in found]

    def _group_parts(self, parent: str, obj: str, fallback: Function) -> list[Function]:
        """The function and its compiler-split ``.cold`` parts, entry first."""
        main = self._syms.find(parent, obj)
        parts = [main] if main is not None else []
        for suffix in (".cold", *(f".cold.{n}" for n in range(1, 8))):
            cold = self._syms.find(parent + suffix, obj)
            if cold is not None:
                parts.append(cold)
        if fallback not in parts:
            parts.append(fallback)
        return parts

    def _classify_site(self, code: FunctionCode, i: int, parent: str,
                       offsets: dict[int, Optional[int]], result: Resolution) -> None:
        insn = code.insns[i]
        d = code.detail(i)
        mem = _mem_operand(d) if d is not None else None
        if d is None or mem is None or mem.size != 8 or mem.mem.segment != X86.X86_REG_GS:
            result.audit.append(self._entry(insn.address, OTHER, "not a 64-bit gs increment"))
            return
        if d.mnemonic == "add" and not any(
                op.type == X86.X86_OP_IMM and op.imm == 1 for op in d.operands):
            result.audit.append(self._entry(insn.address, OTHER, "adds more than one"))
            return
        base = reg64(d.reg_name(mem.mem.base)) if mem.mem.base else None
        if base is None or mem.mem.index != 0:
            result.audit.append(self._entry(insn.address, DOUBTFUL, "indexed or absolute "
                                            "operand"))
            return
        defs = reaching_definitions(code, i, base, self._mib_offset)
        kinds = {d_.kind for d_ in defs}
        if kinds != {XFRM}:
            if XFRM not in kinds and kinds <= {OTHER}:
                why = "register comes from " + "; ".join(sorted({d_.text for d_ in defs}))
                result.audit.append(self._entry(insn.address, OTHER, why))
            else:
                why = "mixed or unknown provenance: " + "; ".join(
                    sorted({f"{d_.kind}: {d_.text}" for d_ in defs}))
                result.audit.append(self._entry(insn.address, DOUBTFUL, why))
            return
        disp = mem.mem.disp
        index = disp // 8
        if disp % 8 or index not in self._counters:
            result.audit.append(self._entry(insn.address, DOUBTFUL,
                                            f"XFRM MIB load but displacement {disp:#x} is "
                                            "no known counter"))
            return
        bases = {d_.base for d_ in defs}
        net_reg = None
        if len(bases) == 1:
            (only,) = bases
            if only != base and all(only not in d_.written for d_ in defs):
                net_reg = only
        sp = offsets.get(i)
        func = self._syms.lookup(insn.address)
        assert func is not None
        site = Site(
            object=func.object,
            function=func.name,
            offset=insn.address - func.start,
            address=insn.address,
            counter=self._counters[index],
            counter_index=index,
            mib_reg=base,
            net_reg=net_reg,
            stack_depth=None if sp is None else -sp,
            entry_function=parent if "." not in parent else None,
            instruction=f"{insn.mnemonic} {insn.op_str}",
            code=self._read(insn.address, insn.size).hex(),
        )
        result.sites.append(site)
        result.audit.append(self._entry(insn.address, XFRM, "loaded from "
                                        "net->mib.xfrm_statistics", site.counter))

    def _entry(self, addr: int, classification: str, reason: str,
               counter: Optional[str] = None) -> AuditEntry:
        func = self._syms.lookup(addr)
        text = ""
        data = self._read(addr, 16)
        if data:
            insn = next(self._lite.disasm_lite(data, addr, 1), None)
            text = f"{insn[2]} {insn[3]}" if insn else ""
        return AuditEntry(
            object=func.object if func else "?",
            function=func.name if func else "?",
            offset=addr - func.start if func else 0,
            address=addr,
            instruction=text,
            classification=classification,
            reason=reason,
            counter=counter,
        )


def _parent_name(name: str) -> str:
    """``xfrm_input.cold`` -> ``xfrm_input``; other names unchanged."""
    return name.split(".cold", 1)[0]
