"""Site resolver on real machine code assembled by GNU as: every provenance rule, root-free."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from xfrmtrace.kallsyms import Kallsyms
from xfrmtrace.sitecache import SiteCache
from xfrmtrace.sites import DOUBTFUL, OTHER, XFRM, SiteResolver

BASE = 0xFFFFFFFF81000000
MIB_OFFSET = 0x1B0
COUNTERS = {1: "XfrmInError", 2: "XfrmInBufferError", 3: "XfrmInHdrError", 4: "XfrmInNoStates"}

pytestmark = pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                                reason="GNU as/objcopy (Debian binutils) not installed")


class Assembled:
    """Functions assembled at BASE, with a kallsyms text and a byte reader."""

    def __init__(self, tmp: Path, body: str) -> None:
        src = tmp / "t.s"
        src.write_text(".intel_syntax noprefix\n.text\n" + body + "\n.globl _etext\n_etext:\n")
        subprocess.run(["as", "--64", "-o", tmp / "t.o", src], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", tmp / "t.o", tmp / "t.bin"],
                       check=True)
        self.code = (tmp / "t.bin").read_bytes()
        nm = subprocess.run(["nm", tmp / "t.o"], check=True, capture_output=True, text=True)
        lines = [f"{BASE:016x} T _stext"]
        self.symbols: dict[str, int] = {}
        for line in nm.stdout.splitlines():
            value, _kind, name = line.split()
            if name.startswith(".L") or name[0].isdigit():
                continue
            self.symbols[name] = BASE + int(value, 16)
            lines.append(f"{BASE + int(value, 16):016x} {'T' if name != '_etext' else 'T'} {name}")
        self.syms = Kallsyms.parse("\n".join(lines))

    def read(self, addr: int, size: int) -> bytes:
        off = addr - BASE
        return self.code[off:off + size] if 0 <= off < len(self.code) else b""

    def resolve(self):
        return SiteResolver(self.read, self.syms, MIB_OFFSET, COUNTERS).resolve(["vmlinux"])


@pytest.fixture
def asm(tmp_path):
    return lambda body: Assembled(tmp_path, body)


def _by_function(result):
    return {(a.function, a.classification) for a in result.audit}


def test_same_block_inc_and_add_forms_with_depth(asm):
    a = asm("""
f1:
  push rbx
  sub rsp, 0x10
  mov rax, qword ptr [rdi + 0x1b0]
  test esi, esi
  je 1f
  inc qword ptr gs:[rax + 0x20]
1:
  add qword ptr gs:[rax + 0x18], 1
  add rsp, 0x10
  pop rbx
  ret
""")
    result = a.resolve()
    assert [(s.function, s.counter) for s in result.sites] == [
        ("f1", "XfrmInNoStates"), ("f1", "XfrmInHdrError")]
    for site in result.sites:
        assert site.stack_depth == 0x18
        assert site.mib_reg == "rax"
        assert site.net_reg == "rdi"
        assert site.entry_function == "f1"
        assert a.read(site.address, 1) == b"\x65"


def test_load_in_other_block_and_register_copy(asm):
    a = asm("""
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  test esi, esi
  jne 2f
  mov rdx, rax
  inc qword ptr gs:[rdx + 0x08]
  ret
2:
  inc qword ptr gs:[rax + 0x10]
  ret
""")
    result = a.resolve()
    assert [(s.counter, s.mib_reg) for s in result.sites] == [
        ("XfrmInError", "rdx"), ("XfrmInBufferError", "rax")]


def test_mixed_provenance_is_doubtful(asm):
    a = asm("""
f1:
  test esi, esi
  je 1f
  mov rax, qword ptr [rdi + 0x1b0]
  jmp 2f
1:
  mov rax, qword ptr [rdi + 0x10]
2:
  inc qword ptr gs:[rax + 0x20]
  ret
""")
    result = a.resolve()
    assert result.sites == []
    assert [e.classification for e in result.audit] == [DOUBTFUL]


def test_other_offsets_and_clobbering_calls_are_not_sites(asm):
    a = asm("""
g_other:
  mov rax, qword ptr [rdi + 0x1a8]
  inc qword ptr gs:[rax + 0x20]
  ret
f_call:
  mov rax, qword ptr [rdi + 0x1b0]
  call g_other
  inc qword ptr gs:[rax + 0x20]
  ret
f_ok:
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  ret
""")
    result = a.resolve()
    assert [s.function for s in result.sites] == ["f_ok"]
    classes = {a.function: a for a in result.audit}
    assert classes["g_other"].classification == OTHER
    assert "never loads" in classes["g_other"].reason
    assert classes["f_call"].classification == OTHER
    assert "call" in classes["f_call"].reason


def test_cold_part_belongs_to_its_function(asm):
    a = asm("""
f2:
  push r12
  push rbx
  mov rbx, qword ptr [rdi + 0x1b0]
  test esi, esi
  jne f2.cold
  pop rbx
  pop r12
  ret
  int3
f2.cold:
  inc qword ptr gs:[rbx + 0x20]
  pop rbx
  pop r12
  ret
""")
    result = a.resolve()
    (site,) = result.sites
    assert site.function == "f2.cold" and site.offset == 0
    assert site.entry_function == "f2"
    assert site.stack_depth == 16
    assert site.net_reg == "rdi"


def test_clobbered_base_is_not_reported_as_net_register(asm):
    a = asm("""
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  xor edi, edi
  inc qword ptr gs:[rax + 0x20]
  ret
""")
    (site,) = a.resolve().sites
    assert site.net_reg is None


def test_unknown_counter_and_misaligned_bytes(asm):
    a = asm("""
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x400]
  movabs rcx, 0x2040ff4865
  ret
""")
    result = a.resolve()
    assert result.sites == []
    reasons = sorted((e.classification, e.reason.split(" ")[0]) for e in result.audit)
    assert reasons == [(DOUBTFUL, "XFRM"), (OTHER, "not")]


def test_stack_depth_unknown_after_realignment(asm):
    a = asm("""
f1:
  push rbp
  mov rbp, rsp
  and rsp, -16
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  leave
  ret
""")
    (site,) = a.resolve().sites
    assert site.stack_depth is None


def test_site_cache_round_trip_and_corruption(asm, tmp_path):
    a = asm("""
f1:
  push rbx
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  pop rbx
  ret
""")
    result = a.resolve()
    view = SimpleNamespace(syms=a.syms, text=SimpleNamespace(read=a.read))
    cache = SiteCache(tmp_path / "cache")
    cache.store("vmlinux", "abc", result)
    loaded = cache.load("vmlinux", "abc", view)
    assert loaded is not None and loaded.sites == result.sites
    assert cache.load("vmlinux", "other-build", view) is None
    path = next((tmp_path / "cache").glob("*.json"))
    path.write_text(path.read_text()[:-20])
    assert cache.load("vmlinux", "abc", view) is None
    # A cache from another build whose offsets point elsewhere is refused too.
    cache.store("vmlinux", "abc", result)
    assert '"offset": 8' in path.read_text()
    text = path.read_text().replace('"offset": 8', '"offset": 1')
    path.write_text(text)
    assert cache.load("vmlinux", "abc", view) is None
    # A site that kallsyms now places in another function (a symbol appeared between the
    # function's start and the site) is refused, even though the bytes still match.
    cache.store("vmlinux", "abc", result)
    site = result.sites[0]
    split = Kallsyms.parse(f"{BASE:016x} T _stext\n{BASE:016x} T f1\n"
                           f"{site.address - 1:016x} t neighbour\n"
                           f"{BASE + len(a.code):016x} T _etext\n")
    assert cache.load("vmlinux", "abc", SimpleNamespace(syms=split, text=view.text)) is None
    assert cache.load("vmlinux", "abc", view) is not None


def test_classification_is_exhaustive(asm):
    """Every gs increment in the text appears in the audit exactly once."""
    a = asm("""
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  inc qword ptr gs:[rcx + 0x20]
  add qword ptr gs:[rax + 0x8], 2
  ret
""")
    result = a.resolve()
    assert [e.classification for e in result.audit] == [XFRM, DOUBTFUL, OTHER]
    assert "entry" in result.audit[1].reason  # rcx: an argument, provenance unknown
