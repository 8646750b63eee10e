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
from dataclasses import replace
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import capstone
from capstone import x86_const as X86

from xfrmtrace.kernel.jumplabels import LabelIndex
from xfrmtrace.kernel.kallsyms import VMLINUX, Function, Kallsyms
from xfrmtrace.resolve.arglocations import FrameFacts
from xfrmtrace.resolve.argregs import InvariantRule, invariant_registers, plan_arguments
from xfrmtrace.resolve.model import (
    DOUBTFUL,
    NORETURN_FUNCTIONS,
    OTHER,
    POINTER_BYTES,
    XFRM,
    AuditEntry,
    Resolution,
    Site,
)
from xfrmtrace.resolve.x86_code import (
    FunctionCode,
    mem_operand,
    reaching_definitions,
)
from xfrmtrace.resolve.x86_frame import X86FrameFacts
from xfrmtrace.resolve.x86_registers import reg64

# gs prefix, REX.W (any R/X/B), then inc r/m64 (FF /0) or add r/m64, imm8 (83 /0)
# with a disp8 or disp32 memory operand.  Index 0 (no displacement) is
# LINUX_MIB_XFRMNUM, never incremented.
_GS_INCREMENT = re.compile(rb"\x65[\x48-\x4f][\xff\x83][\x40-\x47\x80-\x87]", re.S)
_SCAN_CHUNK = 4 << 20  # bytes of core kernel text scanned at a time
_SCAN_OVERLAP = 16  # > the length of a _GS_INCREMENT match


ReadText = Callable[[int, int], bytes]
# Argument slot -> bytes of it the BPF side uses; a plain set of slots: whole pointers.
Needs = Union[Mapping[int, int], frozenset[int]]


class CounterScan:
    """What the resolvers of both instruction sets share: candidates from a byte pattern
    over the text, grouped by function (with its ``.cold`` parts), and audit entries.

    A subclass sets ``_candidate`` (a regex whose matches start at candidate instructions),
    ``_alignment`` (bytes: where instructions may start), ``_frame_facts`` (its argument
    dataflow: arglocations.py) and ``_invariant_rule`` (argregs.py, where it has one), and
    implements ``_classify_function`` and ``_disassemble_one``.

    ``needed_slots(function, object)``: the argument positions events of that function's
    sites read (from BTF), each with the bytes of it they use (a plain set: whole pointers);
    without it, arguments are recorded at entry."""

    _candidate: re.Pattern[bytes]
    _alignment = 1
    _frame_facts: type[FrameFacts]
    _invariant_rule: Optional[InvariantRule] = None

    def __init__(self, read: ReadText, syms: Kallsyms, mib_offset: int,
                 counters: dict[int, str],
                 needed_slots: Optional[Callable[[str, str], Needs]] = None) -> None:
        self._needed_slots = needed_slots
        self._read = read
        self._syms = syms
        self._mib_offset = mib_offset
        self._counters = counters
        self._noreturn = frozenset(address for address in map(syms.address, NORETURN_FUNCTIONS)
                                   if address is not None)

    def resolve(self, objects: Optional[Iterable[str]] = None) -> Resolution:
        """Sites in ``objects`` (default: vmlinux and every loaded module)."""
        result = Resolution()
        for obj in objects if objects is not None else self._syms.objects():
            for func, addrs in self._candidates(obj).items():
                self._classify_function(func, addrs, result)
        result.sites.sort(key=lambda s: s.address)
        result.audit.sort(key=lambda a: a.address)
        return result

    def _classify_function(self, parent: str, addrs: list[int], result: Resolution) -> None:
        raise NotImplementedError

    def _disassemble_one(self, data: bytes, addr: int) -> str:
        """``mnemonic operands`` of the instruction at the start of ``data``."""
        raise NotImplementedError

    # candidates
    def _candidates(self, obj: str) -> dict[str, list[int]]:
        """Group parent name -> candidate addresses, for one object."""
        groups: dict[str, list[int]] = {}
        for start, data, limit in self._text_regions(obj):
            for match in self._candidate.finditer(data):
                if match.start() >= limit:
                    break  # in the overlap: the next region finds it
                addr = start + match.start()
                if addr % self._alignment:
                    continue
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

    def _with_argument_plan(self, code, found: list[Site]) -> list[Site]:
        """``found`` (sites of one function, its entry part known) with where their
        arguments come from: see argregs.py."""
        entry_function = found[0].entry_function
        if self._needed_slots is None or entry_function is None:
            return found
        needs = self._needed_slots(entry_function, found[0].object)
        needed = (dict(needs) if isinstance(needs, Mapping)
                  else dict.fromkeys(needs, POINTER_BYTES))
        plan = plan_arguments(code, [code.index[s.address] for s in found], needed,
                              self._frame_facts, self._invariant_rule,
                              self._record_probeable(code))
        return [replace(s, arg_regs=where.registers, arg_stack=where.stack,
                        records=plan.records if needed.keys() - where.slots() else ())
                for s, where in zip(found, plan.sites)]

    def _record_probeable(self, code) -> Optional[Callable[[int], bool]]:
        """Which instructions of ``code`` a record probe may sit on (None: any)."""
        return None

    def _site(self, address: int, size: int, instruction: str, index: int, parent: str,
              sp: Optional[int], **registers) -> Site:
        """The site probed at ``address`` (an instruction of ``size`` bytes, ``sp`` relative
        to the entry there) for counter ``index`` in function ``parent``; ``registers``:
        mib_reg (and net_reg, mib_bias) as the resolver found them."""
        func = self._syms.lookup(address)
        assert func is not None
        return Site(
            object=func.object,
            function=func.name,
            offset=address - func.start,
            address=address,
            counter=self._counters[index],
            counter_index=index,
            stack_depth=None if sp is None else -sp,
            entry_function=parent if "." not in parent else None,
            instruction=instruction,
            code=self._read(address, size).hex(),
            **registers,
        )

    def _entry(self, addr: int, classification: str, reason: str,
               counter: Optional[str] = None) -> AuditEntry:
        func = self._syms.lookup(addr)
        data = self._read(addr, 16)
        return AuditEntry(
            object=func.object if func else "?",
            function=func.name if func else "?",
            offset=addr - func.start if func else 0,
            address=addr,
            instruction=self._disassemble_one(data, addr) if data else "",
            classification=classification,
            reason=reason,
            counter=counter,
        )


class SiteResolver(CounterScan):
    """Classifies gs-relative increments of x86-64 kernel and module text."""

    _candidate = _GS_INCREMENT
    _frame_facts = X86FrameFacts
    _invariant_rule = staticmethod(invariant_registers)

    def __init__(self, read: ReadText, syms: Kallsyms, mib_offset: int,
                 counters: dict[int, str],
                 needed_slots: Optional[Callable[[str, str], Needs]] = None,
                 jump_labels: Optional[Mapping[int, int]] = None) -> None:
        """``jump_labels``: vmlinux's static branches (jumplabels.py), if known."""
        super().__init__(read, syms, mib_offset, counters, needed_slots)
        self._jump_labels = LabelIndex(jump_labels) if jump_labels is not None else None
        self._mib_bytes = [mib_offset.to_bytes(4, "little")]
        if mib_offset < 0x80:
            self._mib_bytes.append(bytes([mib_offset]))
        self._lite = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._detail = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._detail.detail = True

    def _disassemble_one(self, data: bytes, addr: int) -> str:
        insn = next(self._lite.disasm_lite(data, addr, 1), None)
        return f"{insn[2]} {insn[3]}" if insn else ""

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
                            self._jump_labels if obj == VMLINUX else None, self._noreturn)
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
            result.sites[first_site:] = self._with_argument_plan(code, found)

    def _classify_site(self, code: FunctionCode, i: int, parent: str,
                       offsets: dict[int, Optional[int]], result: Resolution) -> None:
        insn = code.insns[i]
        d = code.detail(i)
        mem = mem_operand(d) if d is not None else None
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
        site = self._site(insn.address, insn.size, f"{insn.mnemonic} {insn.op_str}", index,
                          parent, offsets.get(i), mib_reg=base, net_reg=net_reg)
        result.sites.append(site)
        result.audit.append(self._entry(insn.address, XFRM, "loaded from "
                                        "net->mib.xfrm_statistics", site.counter))


def _parent_name(name: str) -> str:
    """``xfrm_input.cold`` -> ``xfrm_input``; other names unchanged."""
    return name.split(".cold", 1)[0]
