"""Machine code assembled at a kernel address, with kallsyms: the resolver's input for tests.
x86-64 by GNU as (tests/test_sites.py, tests/test_argregs.py); arm64 by clang's integrated
assembler, the one that builds the BPF objects (tests/test_arm64_args.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xfrmtrace.kernel.kallsyms import Kallsyms
from xfrmtrace.resolve.arm64_sites import Arm64SiteResolver
from xfrmtrace.resolve.sites import SiteResolver

BASE = 0xFFFFFFFF81000000
MIB_OFFSET = 0x1B0
COUNTERS = {1: "XfrmInError", 2: "XfrmInBufferError", 3: "XfrmInHdrError", 4: "XfrmInNoStates"}

ARM64_BASE = 0xFFFF800080010000
ARM64_MIB_OFFSET = 0x1D0

needs_binutils = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("objcopy") is None,
    reason="GNU as/objcopy (Debian binutils) not installed")
needs_clang = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("clang", "llvm-objcopy", "llvm-nm")),
    reason="clang, llvm-objcopy or llvm-nm (Debian clang, llvm) not installed")


class Assembled:
    """Functions assembled at BASE, with a kallsyms text and a byte reader."""

    base = BASE

    def __init__(self, tmp: Path, body: str) -> None:
        src = tmp / "t.s"
        src.write_text(".intel_syntax noprefix\n.text\n" + body + "\n.globl _etext\n_etext:\n")
        self._assemble(src, tmp / "t.o")
        subprocess.run([self._objcopy, "-O", "binary", "-j", ".text", tmp / "t.o", tmp / "t.bin"],
                       check=True)
        self.code = (tmp / "t.bin").read_bytes()
        nm = subprocess.run([self._nm, tmp / "t.o"], check=True, capture_output=True, text=True)
        lines = [f"{self.base:016x} T _stext"]
        self.symbols: dict[str, int] = {}
        for line in nm.stdout.splitlines():
            value, _kind, name = line.split()
            if name.startswith((".L", "$")) or name[0].isdigit():
                continue
            self.symbols[name] = self.base + int(value, 16)
            lines.append(f"{self.base + int(value, 16):016x} T {name}")
        self.syms = Kallsyms.parse("\n".join(lines))

    _objcopy = "objcopy"
    _nm = "nm"

    def _assemble(self, src: Path, obj: Path) -> None:
        subprocess.run(["as", "--64", "-o", obj, src], check=True)

    def read(self, addr: int, size: int) -> bytes:
        off = addr - self.base
        return self.code[off:off + size] if 0 <= off < len(self.code) else b""

    def resolve(self, needed_slots=None, jump_labels=None):
        """Resolution of the text; ``needed_slots(function, object)`` and ``jump_labels``
        as for SiteResolver."""
        return SiteResolver(self.read, self.syms, MIB_OFFSET, COUNTERS,
                            needed_slots, jump_labels).resolve(["vmlinux"])


class Arm64Assembled(Assembled):
    """arm64 functions assembled at ARM64_BASE (GNU syntax, no ``.intel_syntax``)."""

    base = ARM64_BASE
    _objcopy = "llvm-objcopy"
    _nm = "llvm-nm"

    def _assemble(self, src: Path, obj: Path) -> None:
        src.write_text(src.read_text().replace(".intel_syntax noprefix\n", ""))
        # armv8.3-a + LSE: paciasp/autiasp and stadd, as Debian's kernel has them
        subprocess.run(["clang", "--target=aarch64-linux-gnu", "-march=armv8.3-a+lse", "-c",
                        "-o", obj, src], check=True)

    def resolve(self, needed_slots=None, jump_labels=None):
        return Arm64SiteResolver(self.read, self.syms, ARM64_MIB_OFFSET, COUNTERS,
                                 needed_slots, jump_labels).resolve(["vmlinux"])
