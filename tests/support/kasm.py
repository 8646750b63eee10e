"""Machine code assembled by GNU as at a kernel address, with kallsyms: the resolver's input
for tests (tests/test_sites.py, tests/test_argregs.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xfrmtrace.kernel.kallsyms import Kallsyms
from xfrmtrace.resolve.sites import SiteResolver

BASE = 0xFFFFFFFF81000000
MIB_OFFSET = 0x1B0
COUNTERS = {1: "XfrmInError", 2: "XfrmInBufferError", 3: "XfrmInHdrError", 4: "XfrmInNoStates"}

needs_binutils = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("objcopy") is None,
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

    def resolve(self, needed_slots=None, jump_labels=None):
        """Resolution of the text; ``needed_slots(function, object)`` and ``jump_labels``
        as for SiteResolver."""
        return SiteResolver(self.read, self.syms, MIB_OFFSET, COUNTERS,
                            needed_slots, jump_labels).resolve(["vmlinux"])
