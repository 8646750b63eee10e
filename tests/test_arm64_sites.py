"""The arm64 site resolver (resolve/arm64_sites.py).

Two layers.  Hand-encoded A64 words (their encodings checked against capstone by the first
test) pin down each rule: the LL/SC loop and the LSE forms give the same site, the probe
sits on the last probeable instruction before the atomic, a counter that differs by path
gets one probe per path, anything unproven is not a site.  Then the real thing: Debian's
arm64 6.12 kernel (its -dbg vmlinux and System.map, from the archive like the lab's
kernels), resolved as the file holds it (LL/SC) and as the kernel runs it after patching
its alternatives for LSE atomics and VHE (``tpidr_el2``): the same sites either way, none
doubtful, with every counter the source increments.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import capstone
import pytest

from xfrmtrace.kernel.kallsyms import Kallsyms
from xfrmtrace.kernel.ktext import open_vmlinux
from xfrmtrace.resolve.arm64_sites import Arm64SiteResolver
from xfrmtrace.resolve.model import DOUBTFUL, OTHER, UNPROBEABLE, XFRM

BASE = 0xFFFF800080010000
MIB_OFFSET = 0x1D0
COUNTERS = {1: "XfrmInError", 2: "XfrmInBufferError", 9: "XfrmInStateMismatch",
            14: "XfrmInPolError"}

# A64 encodings (little-endian words), as capstone prints them.
WORDS = {
    "ldr x0, [x23, #0x1d0]": 0xF940EAE0,  # the MIB pointer
    "ldr x0, [x23, #0x1c8]": 0xF940E6E0,  # a neighbouring field: not the MIB
    "mrs x1, tpidr_el1": 0xD538D081,
    "mrs x1, tpidr_el2": 0xD53CD041,
    "mov x2, #1": 0xD2800022,
    "mov x2, #2": 0xD2800042,
    "add x0, x0, #0x10": 0x91004000,
    "add x0, x0, #0x48": 0x91012000,
    "add x0, x0, #0x70": 0x9101C000,
    "add x0, x0, x1": 0x8B010000,
    "ldxr x4, [x0]": 0xC85F7C04,
    "add x4, x4, x2": 0x8B020084,
    "stxr w3, x4, [x0]": 0xC8037C04,
    "cbnz w3, back to the ldxr": 0x35FFFFA3,
    "stadd x2, [x0]": 0xF822001F,
    "ldadd x2, x4, [x0]": 0xF8220004,
    "nop": 0xD503201F,
    "ret": 0xD65F03C0,
    "casa w1, w0, [x24]": 0x88E17F00,  # a spin_lock's compare-and-swap (load-acquire class)
    "ldaxr w1, [x24]": 0x885FFF01,  # an exclusive load (LL/SC): opens a monitor
    "stlrb wzr, [x0]": 0x089FFC1F,  # its unlock (store-release: ends an atomic context)
}
LLSC = ["ldxr x4, [x0]", "add x4, x4, x2", "stxr w3, x4, [x0]", "cbnz w3, back to the ldxr"]
LSE = ["stadd x2, [x0]", "nop", "nop", "nop"]
LSE_618 = ["ldadd x2, x4, [x0]", "nop", "nop", "nop"]
PROLOGUE = ["ldr x0, [x23, #0x1d0]", "mrs x1, tpidr_el1", "mov x2, #1", "add x0, x0, #0x10",
            "add x0, x0, x1"]


def _branch(at: int, to: int, op: str = "b") -> int:
    """``b``/``cbz x5`` from word index ``at`` to word index ``to``."""
    delta = to - at
    if op == "b":
        return 0x14000000 | (delta & 0x3FFFFFF)
    return 0xB4000005 | ((delta & 0x7FFFF) << 5)  # cbz x5


class Code:
    """One function ``f`` of encoded words at BASE, with kallsyms and a reader."""

    def __init__(self, words: list) -> None:
        self.words = [WORDS[w] if isinstance(w, str) else w for w in words]
        self.code = b"".join(struct.pack("<I", w) for w in self.words)
        end = BASE + len(self.code)
        self.syms = Kallsyms.parse(f"{BASE:016x} T _stext\n{BASE:016x} T f\n"
                                   f"{end:016x} T _etext\n")

    def read(self, addr: int, size: int) -> bytes:
        off = addr - BASE
        return self.code[off:off + size] if 0 <= off < len(self.code) else b""

    def resolve(self):
        return Arm64SiteResolver(self.read, self.syms, MIB_OFFSET, COUNTERS).resolve(["vmlinux"])


def test_encodings_are_what_capstone_prints() -> None:
    md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    for text, word in WORDS.items():
        (insn,) = md.disasm(struct.pack("<I", word), 0x1000)
        if "back to" not in text:
            assert f"{insn.mnemonic} {insn.op_str}".strip() == text


@pytest.mark.parametrize("atomic", [LLSC, LSE, LSE_618], ids=["ll/sc", "lse-stadd", "lse-ldadd"])
def test_each_form_gives_the_same_site(atomic) -> None:
    result = Code([*PROLOGUE, *atomic, "ret"]).resolve()
    (site,) = result.sites
    assert (site.counter, site.offset, site.instruction) == ("XfrmInBufferError", 0x10,
                                                             "add x0, x0, x1")
    assert (site.mib_reg, site.mib_bias) == ("x0", 0x10)  # the MIB pointer + 8 * counter
    (entry,) = result.audit
    assert entry.classification == XFRM and entry.offset == 0x14  # the atomic itself
    assert "probed at f+0x10" in entry.reason


CASA = "casa w1, w0, [x24]"
LDAXR = "ldaxr w1, [x24]"


@pytest.mark.parametrize("opener, between, how", [
    (CASA, [], "breakpoint"),  # the whole funnel follows the casa: the kernel refuses a kprobe
    (CASA, ["stlrb wzr, [x0]"], "kprobe"),  # a store-release ends the atomic context it sees
    (CASA, ["nop"] * 27, "breakpoint"),  # the funnel's last instruction: 32nd after the casa
    (CASA, ["nop"] * 28, "kprobe"),  # the 33rd: out of the kernel's 32-instruction look-back
    (LDAXR, [], "unprobeable"),  # an exclusive monitor is open: a trap would break it too
    (LDAXR, ["nop"] * 28, "kprobe"),
])
def test_where_the_kernel_sees_an_atomic_context(opener, between, how) -> None:
    """arch/arm64/kernel/probes/decode-insn.c refuses a kprobe that follows a load-exclusive
    class instruction (casa counts) within 32 instructions, with no store-exclusive between:
    the site goes where the kernel accepts it; after a casa, which holds no exclusive
    monitor, a hardware breakpoint counts it; after a real exclusive load it is
    unprobeable.  Never a failed attach."""
    result = Code([opener, *between, *PROLOGUE, *LSE, "ret"]).resolve()
    (entry,) = [e for e in result.audit if e.classification != OTHER]
    if how == "unprobeable":
        assert result.sites == [] and entry.classification == UNPROBEABLE
        assert entry.counter == "XfrmInBufferError" and "is_probed_address_atomic" in entry.reason
        return
    (site,) = result.sites
    assert site.offset == 4 * (len(between) + 1) + 0x10 and entry.classification == XFRM
    assert site.hw_breakpoint == (how == "breakpoint")
    # What tells a repeated trap from the next increment: the per-CPU offset's register.
    assert site.cpu_reg == ("x1" if how == "breakpoint" else None)
    assert ("hardware breakpoint" in entry.reason) == (how == "breakpoint")


def test_vhe_reads_the_per_cpu_offset_from_tpidr_el2() -> None:
    words = [*PROLOGUE, *LSE, "ret"]
    words[1] = "mrs x1, tpidr_el2"
    (site,) = Code(words).resolve().sites
    assert site.counter == "XfrmInBufferError"


def test_the_probe_skips_what_kprobes_refuse() -> None:
    # The per-CPU offset read last, right before the atomic: mrs is not steppable.
    words = ["ldr x0, [x23, #0x1d0]", "mov x2, #1", "add x0, x0, #0x10", "mrs x1, tpidr_el1",
             "add x0, x0, x1", *LLSC, "ret"]
    (site,) = Code(words).resolve().sites
    assert site.instruction == "add x0, x0, x1"
    words = ["ldr x0, [x23, #0x1d0]", "mov x2, #1", "add x0, x0, #0x10", "add x0, x0, x1",
             "mrs x1, tpidr_el1", *LLSC, "ret"]  # the address lacks the offset now
    assert not Code(words).resolve().sites


def test_adding_another_value_or_another_address_is_no_site() -> None:
    two = [*PROLOGUE, *LSE, "ret"]
    two[2] = "mov x2, #2"
    (entry,) = Code(two).resolve().audit
    assert entry.classification == OTHER and "adds 2" in entry.reason
    other = [*PROLOGUE, *LSE, "ret", "ldr x0, [x23, #0x1d0]"]  # it loads the MIB elsewhere
    other[0] = "ldr x0, [x23, #0x1c8]"
    (entry,) = Code(other).resolve().audit
    assert entry.classification == OTHER
    assert entry.reason == "address comes from ldr x0, [x23, #0x1c8]"


def test_a_counter_chosen_by_path_gets_a_probe_per_path() -> None:
    # Two paths set the counter's offset, then meet at the add of the per-CPU offset:
    #  0 cbz x5, 7 | 1 ldr | 2 mrs | 3 mov | 4 add #0x48 | 5 b 11 | 6 ret
    #  7 ldr | 8 mrs | 9 mov | 10 add #0x70 | 11 add x0, x0, x1 | 12.. ldxr loop | ret
    words = [_branch(0, 7, "cbz"), "ldr x0, [x23, #0x1d0]", "mrs x1, tpidr_el1", "mov x2, #1",
             "add x0, x0, #0x48", _branch(5, 11), "ret",
             "ldr x0, [x23, #0x1d0]", "mrs x1, tpidr_el1", "mov x2, #1", "add x0, x0, #0x70",
             "add x0, x0, x1", *LLSC, "ret"]
    result = Code(words).resolve()
    assert sorted((s.offset, s.counter, s.mib_bias) for s in result.sites) == [
        (5 * 4, "XfrmInStateMismatch", 0x48), (10 * 4, "XfrmInPolError", 0x0)]
    assert [e.classification for e in result.audit] == [XFRM, XFRM]


def test_an_atomic_entered_from_elsewhere_is_doubtful() -> None:
    # 0..4 the prologue | 5 cbz x5 -> 7 (the ldxr) | 6 nop | 7..10 the LL/SC loop | ret: the
    # same counter either way, but no instruction before the ldxr runs once per increment.
    words = [*PROLOGUE, _branch(5, 7, "cbz"), "nop", *LLSC, "ret"]
    (entry,) = Code(words).resolve().audit
    assert entry.classification == DOUBTFUL and "runs once per increment" in entry.reason


# --- a real Debian arm64 kernel --------------------------------------------------------


@pytest.fixture(scope="module")
def debian_arm64():
    """Debian's arm64 6.12 vmlinux + System.map (lab cache; a 1 GB download the first
    time).  Without network and cache: skipped here, a failure in CI."""
    from vmlab.host import kernels

    try:
        return kernels.fetch_debug_vmlinux("arm64-6.12")
    except (kernels.KernelFetchError, subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"Debian arm64 debug vmlinux unavailable: {err}")


def _system_map(path: Path) -> dict[str, int]:
    result = {}
    for line in path.read_text().splitlines():
        value, _kind, name = line.split()[:3]
        result.setdefault(name, int(value, 16))
    return result


def _patched_reader(read, symbols: dict[str, int]):
    """``read`` with the kernel's alternatives for LSE atomics and VHE applied, as
    arch/arm64/kernel/alternative.c does at boot on a CPU with both: each ``struct
    alt_instr { s32 orig_offset; s32 alt_offset; u16 cpucap; u8 orig_len; u8 alt_len; }``
    of those capabilities copies its replacement over the original.  The capabilities are
    recognised by what they replace (ldxr -> ldadd/stadd, tpidr_el1 -> tpidr_el2): their
    numbers differ between kernel versions.  Returns the reader and how many were applied."""
    md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    start, end = symbols["__alt_instructions"], symbols["__alt_instructions_end"]
    table = read(start, end - start)
    entries = []
    for off in range(0, len(table) - 11, 12):
        orig, alt, cap, orig_len, alt_len = struct.unpack_from("<iiHBB", table, off)
        entries.append((start + off + orig, start + off + 4 + alt, cap, orig_len, alt_len))

    def first(addr: int) -> str:
        insn = next(md.disasm(read(addr, 4), addr, 1), None)
        return f"{insn.mnemonic} {insn.op_str}" if insn else ""

    wanted = set()
    for orig, alt, cap, _orig_len, _alt_len in entries:
        o, a = first(orig), first(alt)
        if (o.startswith("ldxr x") and a.startswith(("ldadd x", "stadd x"))) or (
                o.endswith("tpidr_el1") and a.endswith("tpidr_el2")):
            wanted.add(cap)
    patches = {}
    for orig, alt, cap, orig_len, alt_len in entries:
        if cap in wanted and orig_len == alt_len:
            patches[orig] = read(alt, alt_len)

    def patched(addr: int, size: int) -> bytes:
        data = bytearray(read(addr, size))
        for where, code in patches.items():
            if addr <= where < addr + size:
                data[where - addr:where - addr + len(code)] = code[:addr + size - where]
        return bytes(data)

    return patched, len(patches), len(wanted)


def _resolve_real(read, kernel, with_arguments: bool = False) -> object:
    """The kernel's sites; ``with_arguments``: where each finds its function's arguments
    too, with the jump label table as the tracer reads it."""
    from xfrmtrace.bpf.btf import Btf
    from xfrmtrace.kernel import jumplabels
    from xfrmtrace.kernel.view import kernel_model
    from xfrmtrace.resolve.funcargs import function_args

    btf = Btf.from_file(kernel.vmlinux)
    try:
        model = kernel_model(btf)
        syms = Kallsyms.load(kernel.system_map)
        if not with_arguments:
            return Arm64SiteResolver(read, syms, model.mib_offset,
                                     model.counters).resolve(["vmlinux"])

        def needs(function: str, obj: str) -> dict[int, int]:
            args = function_args(btf, function, syms.address(function) or 0)
            return args.needs if args is not None else {}

        labels = jumplabels.read_table(syms.jump_table_range(), read, syms.core_text_range())
        return Arm64SiteResolver(read, syms, model.mib_offset, model.counters, needs,
                                 labels).resolve(["vmlinux"])
    finally:
        btf.close()


def test_debian_arm64_kernel_as_shipped_and_as_patched(debian_arm64) -> None:
    with open_vmlinux(debian_arm64.vmlinux) as text:
        shipped = _resolve_real(text.read, debian_arm64)
        patched_read, applied, caps = _patched_reader(text.read,
                                                      _system_map(debian_arm64.system_map))
        patched = _resolve_real(patched_read, debian_arm64)
    by_class = Counter(e.classification for e in shipped.audit)
    print(f"{debian_arm64.version}: {dict(by_class)}; {len(shipped.sites)} sites; "
          f"{applied} alternatives of {caps} capabilities applied")
    assert caps == 2 and applied > 1000
    assert by_class[DOUBTFUL] == 0
    # The two increments in xfrm_input's spin_locked region (the kernel refused both kprobes
    # in the arm64 VM lab with EINVAL before the resolver knew its rule): a casa opened it,
    # so hardware breakpoints count them.
    assert by_class[UNPROBEABLE] == 0
    assert sorted((s.function, s.counter) for s in shipped.sites if s.hw_breakpoint) == [
        ("xfrm_input", "XfrmInStateInvalid"), ("xfrm_input", "XfrmInStateMismatch")]
    assert all(s.cpu_reg is not None for s in shipped.sites if s.hw_breakpoint)
    assert not [e for e in patched.audit if e.classification == DOUBTFUL]

    def key(s):
        return (s.address, s.counter, s.mib_reg, s.mib_bias, s.code, s.hw_breakpoint)

    assert [key(s) for s in patched.sites] == [key(s) for s in shipped.sites]
    # The patched text increments with LSE atomics: the audit saw them, not the LL/SC loop.
    assert {e.instruction.split()[0] for e in patched.audit if e.classification == XFRM} \
        <= {"stadd", "ldadd"}
    counters = {s.counter for s in shipped.sites}
    functions = {s.function for s in shipped.sites}
    # What the x86 matrix traces on 6.12, by function (each has its counters' sites there).
    assert {"xfrm_input", "__xfrm_policy_check", "xfrm_lookup_with_ifid", "xfrm_output",
            "xfrm_output_resume", "xfrm_resolve_and_create_bundle"} <= functions
    assert {"XfrmInNoStates", "XfrmInNoPols", "XfrmInStateMismatch", "XfrmOutNoStates",
            "XfrmOutPolBlock", "XfrmInTmplMismatch", "XfrmOutBundleGenError"} <= counters
    assert len(shipped.sites) >= 50


def test_debian_arm64_kernel_sites_find_their_arguments(debian_arm64) -> None:
    """As the kernel runs (alternatives applied), with its jump label table: most sites
    read every argument themselves, and the functions healthy ESP traffic runs through
    (xfrm_output on the sender, __xfrm_policy_check and xfrm_input on the receiver) get no
    record probe at their entry, which would fire on every packet."""
    from xfrmtrace.resolve.model import ENTRY_RECORDS

    entry = ENTRY_RECORDS["aarch64"]
    with open_vmlinux(debian_arm64.vmlinux) as text:
        read, _applied, _caps = _patched_reader(text.read, _system_map(debian_arm64.system_map))
        result = _resolve_real(read, debian_arm64, with_arguments=True)
    at_entry = Counter(s.function for s in result.sites if entry in s.records)
    itself = sum(1 for s in result.sites if not s.records)
    print(f"{len(result.sites)} sites: {itself} read every argument themselves; entry "
          f"records in {dict(at_entry)}")
    assert itself > len(result.sites) // 2
    for function in ("xfrm_output", "__xfrm_policy_check", "xfrm_input"):
        assert function not in at_entry, function


def test_sites_command_reads_an_arm64_vmlinux_offline(debian_arm64) -> None:
    proc = subprocess.run([sys.executable, "-m", "xfrmtrace", "sites", "--vmlinux",
                           str(debian_arm64.vmlinux), "--kallsyms",
                           str(debian_arm64.system_map)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "XfrmInNoStates" in proc.stdout and "xfrm_input+0x" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith("sites in 1 objects")
