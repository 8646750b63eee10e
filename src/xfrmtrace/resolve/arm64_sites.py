"""Find every instruction sequence that increments an XFRM statistics counter on arm64.

``XFRM_INC_STATS(net, FIELD)`` is ``this_cpu_inc(net->mib.xfrm_statistics->mibs[FIELD])``;
arm64 builds the counter's address and then runs one of the forms of
arch/arm64/include/asm/percpu.h (the LL/SC one is what a vmlinux file holds; the kernel
patches in the LSE one at boot on CPUs with atomics, ARM64_HAS_LSE_ATOMICS, and that is what
/proc/kcore shows)::

    ldr   x0, [x23, #0x1d0]      ; net->mib.xfrm_statistics (offset from BTF)
    mrs   x1, tpidr_el1          ; this CPU's per-CPU offset (tpidr_el2 on VHE hosts)
    mov   x2, #1
    add   x0, x0, #0x10          ; + 8 * FIELD
    add   x0, x0, x1             ;   <- the probe goes here (see below)
    ldxr  x4, [x0]               ; LL/SC ...              LSE: stadd x2, [x0]
    add   x4, x4, x2             ;                             nop
    stxr  w3, x4, [x0]           ;                             nop
    cbnz  w3, <the ldxr>         ;                             nop

From 6.18 on the LSE form is ``ldadd x2, x4, [x0]`` (value-returning, result unused).  Atomics
take no displacement, so the counter comes from the dataflow: the atomic's address register
must hold, on every path, ``net->mib.xfrm_statistics + this CPU's offset + 8 * FIELD``, and
the value added must be 1 (arm64_code.Term).

**Where the probe goes.**  A kprobe cannot sit on the ``ldxr``..``stxr`` sequence: it would
take an exception between the exclusive load and store, which clears the exclusive monitor,
so the store fails and the loop never ends (the kernel refuses such probes:
arch/arm64/kernel/probes/decode-insn.c, ``aarch64_insn_is_exclusive``); it also refuses
``mrs``, and any instruction that follows a load-exclusive class instruction (which includes
``ldar`` and LSE ``casa``) within 32 instructions with no store-exclusive between
(``is_probed_address_atomic``).  The probe goes on the last probeable instruction of the
straight-line code that falls into the atomic, when the atomic is entered only from there
(and, LL/SC, from its own retry branch): that instruction runs exactly once per increment,
in both forms, at the same address, so sites resolved offline from a vmlinux file (LL/SC)
and live from kcore (LSE) agree.  The pointer compared with each namespace's
``net->mib.xfrm_statistics`` is a register that holds it, plus the counter's offset
(``Site.mib_bias``), at that instruction.

**Where no kprobe may go.**  Debian 6.12's ``xfrm_input`` increments two counters right
after its ``spin_lock``, an LSE ``casa``: the kernel's scan refuses every instruction there,
although a ``casa`` (like ``ldar``) holds no exclusive monitor a trap could clear.  Such a
site gets the same instruction and is counted by a hardware execution breakpoint instead
(``Site.hw_breakpoint``, kernel/breakpoints.py), the only difference being how the BPF side
is called.  Where an exclusive load (``ldxr``, ``ldaxr``: bit 23 clear) opened the context,
a breakpoint would break the loop as a kprobe would: that increment is ``unprobeable``.

Arguments come as on x86 (argregs.py): from the registers and frame slots that hold them at
the probe (arm64_frame.py), else from a record probe at the latest points that still see
them, else at the entry.  The invariant-register rule of x86 has no arm64 version: the
dataflow finds the same registers whenever the control-flow graph is sound.
"""

from __future__ import annotations

import re
from array import array
from typing import Callable, Optional

import capstone

from xfrmtrace.kernel.jumplabels import LabelIndex
from xfrmtrace.kernel.kallsyms import VMLINUX, Kallsyms
from xfrmtrace.resolve.arm64_code import INSN_BYTES, FunctionCode, Term, xreg
from xfrmtrace.resolve.arm64_frame import Arm64FrameFacts
from xfrmtrace.resolve.model import DOUBTFUL, OTHER, UNPROBEABLE, XFRM, Resolution
from xfrmtrace.resolve.sites import CounterScan, Needs, ReadText

# Little-endian words, matched at any byte (aligned ones kept): 64-bit LDXR Xt, [Xn]
# (0xc85f7c00 | Rn << 5 | Rt), or 64-bit LDADD Xs, Xt, [Xn] without ordering
# (0xf8200000 | Rs << 16 | Rn << 5 | Rt; STADD is LDADD with Rt = xzr).
_PER_CPU_ATOMIC = re.compile(rb"(?=[\x00-\xff](?:[\x7c-\x7f]\x5f\xc8|[\x00-\x03][\x20-\x3f]\xf8))",
                             re.S)
_LDR_X_IMM = 0xF9400000  # LDR Xt, [Xn, #imm12 * 8]
_LDR_X_IMM_MASK = 0xFFC00000
# Instructions arm64 kprobes refuse (decode-insn.c: aarch64_insn_is_steppable) or that can
# not run exactly once per increment when single-stepped out of line.
_UNPROBEABLE = re.compile(r"(mrs|msr|ld[a]?xr|st[l]?xr|ld[a]?xp|st[l]?xp|svc|hvc|smc|brk|hlt|"
                          r"eret|wfe|wfi|sev|sevl|yield|clrex)[bhw]?$")
# arch/arm64/kernel/probes/decode-insn.c refuses a probe on any instruction of the
# load/store-exclusive class (aarch64_insn_is_exclusive: ldxr, stxr, but also ldar, stlr and
# LSE cas*), and one inside what it takes for an exclusive sequence: scanning back from the
# probe, at most 32 instructions and not past the symbol's start, it meets a load form of
# that class (aarch64_insn_is_load_ex, which matches casa and ldar too) before a store form.
_EXCLUSIVE_CLASS = (0x3F000000, 0x08000000)
_LOAD_EX = (0x3F400000, 0x08400000)
_STORE_EX = (0x3F400000, 0x08000000)
_ATOMIC_CONTEXT_WORDS = 32  # MAX_ATOMIC_CONTEXT_SIZE: 128 bytes
# Bit 23 (o2) of that class: 0 for the exclusive loads (ldxr, ldaxr, ldxp, ldaxp), which
# open an exclusive monitor; 1 for ldar/ldlar and the LSE cas* forms, which do not.
_ORDERED_BIT = 1 << 23
KPROBE = "kprobe"
BREAKPOINT = "breakpoint"


class Arm64SiteResolver(CounterScan):
    """Classifies 64-bit per-CPU atomic adds of arm64 kernel and module text."""

    _candidate = _PER_CPU_ATOMIC
    _alignment = INSN_BYTES
    _frame_facts = Arm64FrameFacts

    def __init__(self, read: ReadText, syms: Kallsyms, mib_offset: int,
                 counters: dict[int, str],
                 needed_slots: Optional[Callable[[str, str], Needs]] = None,
                 jump_labels: Optional[dict[int, int]] = None) -> None:
        """``jump_labels``: vmlinux's static branches (jumplabels.py), if known."""
        super().__init__(read, syms, mib_offset, counters, needed_slots)
        self._jump_labels = LabelIndex(jump_labels) if jump_labels is not None else None
        self._lite = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        self._detail = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        self._detail.detail = True

    def _disassemble_one(self, data: bytes, addr: int) -> str:
        insn = next(self._lite.disasm_lite(data[:INSN_BYTES], addr, 1), None)
        return f"{insn[2]} {insn[3]}" if insn else ""

    def _loads_mib(self, code: bytes) -> bool:
        words = array("I", code[:len(code) - len(code) % INSN_BYTES])
        imm12 = self._mib_offset // 8
        return self._mib_offset % 8 == 0 and any(
            w & _LDR_X_IMM_MASK == _LDR_X_IMM and (w >> 10) & 0xFFF == imm12 for w in words)

    def _classify_function(self, parent: str, addrs: list[int], result: Resolution) -> None:
        first = self._syms.lookup(addrs[0])
        assert first is not None
        parts = self._group_parts(parent, first.object, first)
        code_bytes = [(f, self._read(f.start, f.size)) for f in parts]
        if not any(self._loads_mib(code) for _f, code in code_bytes):
            for addr in addrs:
                result.audit.append(self._entry(addr, OTHER, "function never loads "
                                                "net->mib.xfrm_statistics"))
            return
        code = FunctionCode(code_bytes, self._detail,
                            self._jump_labels if first.object == VMLINUX else None,
                            self._noreturn)
        offsets: Optional[dict[int, Optional[int]]] = None
        first_site = len(result.sites)
        for addr in addrs:
            i = code.index.get(addr)
            if i is None:
                result.audit.append(self._entry(addr, OTHER, "not an instruction boundary"))
                continue
            if offsets is None:
                offsets = code.stack_offsets()
            self._classify_atomic(code, i, parent, offsets, result)
        found = result.sites[first_site:]
        if found and offsets is not None and parts[0].name == parent:
            result.sites[first_site:] = self._with_argument_plan(code, found)

    def _classify_atomic(self, code: FunctionCode, i: int, parent: str,
                         offsets: dict[int, Optional[int]], result: Resolution) -> None:
        insn = code.insns[i]
        shape = _atomic_add(code, i)
        if shape is None:
            result.audit.append(self._entry(insn.address, OTHER, "not an add to memory "
                                            "(another atomic operation)"))
            return
        if not code.reachable(i):
            result.audit.append(self._entry(insn.address, OTHER, "not reached from the "
                                            "function's entry (an alternative's replacement "
                                            "code, patched in elsewhere)"))
            return
        address_reg = shape[0]
        terms = code.values(i, address_reg, self._mib_offset)
        kind, why = _provenance(terms)
        if kind != XFRM:
            result.audit.append(self._entry(insn.address, kind, why))
            return
        single = len(terms) == 1
        probes = _probe_points(code, i, single, lambda j: self._probe_kind(code, j) == KPROBE)
        if probes is None:  # a hardware breakpoint where no kprobe may go
            probes = _probe_points(code, i, single,
                                   lambda j: self._probe_kind(code, j) is not None)
        if probes is None:
            if _probe_points(code, i, single, lambda j: _steppable(code, j)) is not None:
                result.audit.append(self._entry(
                    insn.address, UNPROBEABLE, "XFRM counter, but the kernel refuses a kprobe "
                    "on every instruction that runs once per increment: each comes within 32 "
                    "instructions after an exclusive load (ldxr, ldaxr: an exclusive monitor "
                    "a breakpoint would clear) with no store-exclusive between "
                    "(arch/arm64/kernel/probes/decode-insn.c, is_probed_address_atomic)",
                    self._counters.get(next(iter(terms)).offset // 8) if single else None))
                return
            result.audit.append(self._entry(insn.address, DOUBTFUL, "XFRM counter, but no "
                                            "probeable instruction runs once per increment"))
            return
        for probe, via in probes:
            self._classify_path(code, i, shape, probe, via, parent, offsets, result,
                                self._probe_kind(code, probe) == BREAKPOINT)

    def _record_probeable(self, code: FunctionCode) -> Callable[[int], bool]:
        return lambda j: self._probe_kind(code, j) == KPROBE

    def _probe_kind(self, code: FunctionCode, j: int) -> Optional[str]:
        """How instruction j of ``code`` can be probed: KPROBE when the kernel takes a kprobe
        there (not an unsteppable mnemonic, nothing its atomic-context rule refuses), else
        BREAKPOINT when only that rule refuses it and what opened the context holds no
        exclusive monitor (LSE ``casa``, ``ldar``: a trap there is harmless), else None."""
        if not _steppable(code, j):
            return None
        insn = code.insns[j]
        func = self._syms.lookup(insn.address)
        start = max(func.start if func else insn.address,
                    insn.address - _ATOMIC_CONTEXT_WORDS * INSN_BYTES)
        data = self._read(start, insn.address + INSN_BYTES - start)
        words = array("I", data[:len(data) - len(data) % INSN_BYTES])
        if not words or _matches(words[-1], _EXCLUSIVE_CLASS):
            return None
        for word in reversed(words[:-1]):
            if _matches(word, _STORE_EX):
                return KPROBE
            if _matches(word, _LOAD_EX):
                return None if word & _ORDERED_BIT == 0 else BREAKPOINT
        return KPROBE

    def _classify_path(self, code: FunctionCode, i: int, shape: tuple[str, int, object],
                       probe: int, via: Optional[tuple[int, int]], parent: str,
                       offsets: dict[int, Optional[int]], result: Resolution,
                       breakpoint: bool = False) -> None:
        """The site of the atomic at i on the paths ``via`` selects (None: all), probed at
        instruction ``probe`` (``breakpoint``: by a hardware breakpoint, not a kprobe)."""
        address = code.insns[i].address
        address_reg, value_at, value = shape
        terms = code.values(i, address_reg, self._mib_offset, via=via)
        kind, why = _provenance(terms)
        if kind != XFRM or len(terms) != 1:
            result.audit.append(self._entry(address, DOUBTFUL, why if kind != XFRM else
                                            "XFRM MIB address, counter differs by path"))
            return
        (term,) = terms
        added = {Term(offset=value)} if isinstance(value, int) else \
            code.values(value_at, str(value), self._mib_offset, via=via)
        if added != {Term(offset=1)}:
            known = all(t.other is None and not t.mib and not t.cpu for t in added)
            result.audit.append(self._entry(
                address, OTHER if known else DOUBTFUL,
                "adds " + (", ".join(sorted(str(t.offset) for t in added)) if known
                           else "a value the analysis does not follow") + ", not 1"))
            return
        index = term.offset // 8
        if term.offset % 8 or index not in self._counters:
            result.audit.append(self._entry(address, DOUBTFUL, "XFRM MIB address but "
                                            f"offset {term.offset:#x} is no known counter"))
            return
        mib = _mib_register(code, probe, self._mib_offset, via)
        if mib is None:
            result.audit.append(self._entry(address, DOUBTFUL, "XFRM counter, but no "
                                            "register holds the MIB pointer at the probe"))
            return
        mib_reg, bias = mib
        cpu_reg = _cpu_register(code, probe, self._mib_offset, via) if breakpoint else None
        if breakpoint and cpu_reg is None:
            result.audit.append(self._entry(
                address, UNPROBEABLE, "XFRM counter the kernel refuses to kprobe, and no "
                "register holds the per-CPU offset where a hardware breakpoint would go (it "
                "tells a repeated trap from the next increment)", self._counters[index]))
            return
        at = code.insns[probe]
        site = self._site(at.address, INSN_BYTES, f"{at.mnemonic} {at.op_str}".strip(), index,
                          parent, offsets.get(probe), mib_reg=mib_reg, mib_bias=bias,
                          hw_breakpoint=breakpoint, cpu_reg=cpu_reg)
        result.sites.append(site)
        probed = f"probed at {site.label} ({mib_reg} = MIB + {bias:#x})"
        if breakpoint:
            probed = (f"probed at {site.label} by a hardware breakpoint ({mib_reg} = MIB + "
                      f"{bias:#x}; kprobes refuse it: within 32 instructions after an LSE casa "
                      "or ldar, decode-insn.c is_probed_address_atomic)")
        result.audit.append(self._entry(
            address, XFRM, f"loaded from net->mib.xfrm_statistics; {probed}", site.counter))


def _atomic_add(code: FunctionCode, i: int) -> Optional[tuple[str, int, object]]:
    """(address register, instruction index where the added value is read, the value: an
    immediate or a register) when instruction i starts a 64-bit add to memory: the LL/SC
    loop ``ldxr; add; stxr; cbnz`` back to it, or LSE ``stadd``/``ldadd``."""
    insn = code.insns[i]
    ops = insn.operands
    if insn.mnemonic in ("stadd", "ldadd"):
        address = _plain_address(ops[-1])
        if address is None or not ops[0].startswith("x"):
            return None
        return address, i, xreg(ops[0])
    if insn.mnemonic != "ldxr" or i + 3 >= len(code.insns):
        return None
    address = _plain_address(ops[-1])
    loaded = ops[0]
    add, store, retry = code.insns[i + 1], code.insns[i + 2], code.insns[i + 3]
    add_ops, store_ops, retry_ops = add.operands, store.operands, retry.operands
    if address is None or add.mnemonic != "add" or len(add_ops) != 3 \
            or add_ops[:2] != [loaded, loaded]:
        return None
    if store.mnemonic != "stxr" or len(store_ops) != 3 or store_ops[1] != loaded \
            or _plain_address(store_ops[2]) != address:
        return None
    if retry.mnemonic != "cbnz" or retry_ops[0] != store_ops[0] \
            or retry_ops[1] != f"#{insn.address:#x}":
        return None
    if add_ops[2].startswith("#"):
        return address, i + 1, int(add_ops[2][1:], 0)
    if xreg(add_ops[2]) is None or not add_ops[2].startswith("x"):
        return None
    return address, i + 1, xreg(add_ops[2])


def _plain_address(operand: str) -> Optional[str]:
    """``[x0]`` -> ``x0``; None for any other addressing."""
    match = re.fullmatch(r"\[(x\d+|fp|lr)\]", operand)
    return xreg(match.group(1)) if match else None


def _provenance(terms: set[Term]) -> tuple[str, str]:
    """(classification, reason) of an atomic's address from its possible values."""
    if terms and all(t.mib and t.cpu for t in terms):
        return XFRM, "net->mib.xfrm_statistics + per-CPU offset"
    if not any(t.mib for t in terms) and all(t.other for t in terms):
        return OTHER, "address comes from " + "; ".join(sorted({str(t.other) for t in terms}))
    if not any(t.mib for t in terms):
        return OTHER, "address is not from net->mib.xfrm_statistics"
    return DOUBTFUL, "mixed or unknown provenance: " + "; ".join(sorted(
        t.other if t.other else f"mib={t.mib} cpu={t.cpu} +{t.offset:#x}" for t in terms))


ProbePoints = list[tuple[int, Optional[tuple[int, int]]]]  # (instruction, via) per path


def _probe_points(code: FunctionCode, i: int, single: bool,
                  probeable: Callable[[int], bool]) -> Optional[ProbePoints]:
    """Where to probe the atomic at i: (instruction, ``via`` for FunctionCode.values) per
    path, each running exactly once per increment on its paths; None if there is none.

    The funnel is the straight-line code that falls into the atomic: the atomic's own block
    up to it, or (the atomic starts a block: LL/SC, its retry branch jumps back to it) the
    block before it, if that is the only way in.  With one counter on every path
    (``single``) the funnel's last probeable instruction serves all; otherwise each
    predecessor of the funnel that leads only into it gets its own probe, on its last
    probeable instruction, and its paths their own counter.  ``probeable(j)``: the kernel
    takes a kprobe on instruction j."""
    funnel = _funnel(code, i)
    if funnel is None:
        return None
    n, last = funnel
    block = code.blocks[n]
    if single:
        own = _last_probeable(code, block.first, last, probeable)
        if own is not None:
            return [(own, None)]
    probes: ProbePoints = []
    for p in block.preds:
        pred = code.blocks[p]
        probe = _last_probeable(code, pred.first, pred.last, probeable)
        if p == n or pred.succs != [n] or probe is None:
            return None
        probes.append((probe, (n, p)))
    return probes or None


def _funnel(code: FunctionCode, i: int) -> Optional[tuple[int, int]]:
    """(block, last instruction of it) of the straight-line code right before the atomic
    at i, when every entry to the atomic comes through it (or from its own retry)."""
    n = code.block_of[i]
    if code.blocks[n].first != i:
        return n, i - 1
    if i == 0 or code.insns[i - 1].address + INSN_BYTES != code.insns[i].address:
        return None
    retry = code.block_of[i + 3] if code.insns[i].mnemonic == "ldxr" else None
    before = code.block_of[i - 1]
    if code.blocks[before].succs != [n] or \
            any(p not in (before, retry) for p in code.blocks[n].preds):
        return None
    return before, i - 1


def _last_probeable(code: FunctionCode, first: int, last: int,
                    probeable: Callable[[int], bool]) -> Optional[int]:
    for j in range(last, first - 1, -1):
        if probeable(j):
            return j
    return None


def _steppable(code: FunctionCode, j: int) -> bool:
    """Instruction j is one a kprobe may sit on by its kind alone (_UNPROBEABLE)."""
    return not _UNPROBEABLE.match(code.insns[j].mnemonic)


def _matches(word: int, mask_value: tuple[int, int]) -> bool:
    return word & mask_value[0] == mask_value[1]


def _cpu_register(code: FunctionCode, probe: int, mib_offset: int,
                  via: Optional[tuple[int, int]]) -> Optional[str]:
    """A register holding exactly this CPU's per-CPU offset before the probe instruction, on
    every path ``via`` selects."""
    for n in range(31):
        reg = f"x{n}"
        if code.values(probe, reg, mib_offset, via=via) == {Term(cpu=True)}:
            return reg
    return None


def _mib_register(code: FunctionCode, probe: int, mib_offset: int,
                  via: Optional[tuple[int, int]]) -> Optional[tuple[str, int]]:
    """(register, bias): a register holding ``net->mib.xfrm_statistics + bias`` (no per-CPU
    offset) before the probe instruction, on every path ``via`` selects."""
    for n in range(31):
        reg = f"x{n}"
        terms = code.values(probe, reg, mib_offset, via=via)
        if len(terms) == 1:
            (term,) = terms
            if term.mib and not term.cpu:
                return reg, term.offset
    return None
