"""Offline resolution (``sites --vmlinux F --kallsyms F``) refuses a kallsyms from another
build: every function would be read at the wrong place and the sites found be nonsense.

The vmlinux stand-in is linked by GNU ld at a kernel address with a version string where
``linux_banner`` says, and read through the tool's own ELF reader with a KASLR slide.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xfrmtrace.errors import InputError
from xfrmtrace.kernel.kallsyms import Kallsyms
from xfrmtrace.kernel.ktext import open_vmlinux
from xfrmtrace.kernel.view import check_same_build

LINK_ADDRESS = 0xFFFFFFFF81000000
SLIDE = 0x2E000000  # KASLR: kallsyms addresses are the file's plus this

SOURCE = """
.text
.globl _text, _stext, _etext
_text:
_stext:
  nop
  ret
_etext:
.section .rodata
.globl linux_banner
  .ascii "padding "
linux_banner:
  .ascii "Linux version 6.99.0-test (someone@somewhere)\\n"
"""


@pytest.fixture()
def vmlinux(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld (Debian binutils) not installed")
    (tmp_path / "k.s").write_text(SOURCE)
    subprocess.run(["as", "--64", "-o", tmp_path / "k.o", tmp_path / "k.s"], check=True)
    subprocess.run(["ld", "-Ttext", hex(LINK_ADDRESS), "-e", "_text", "-o",
                    tmp_path / "vmlinux", tmp_path / "k.o"], check=True)
    nm = subprocess.run(["nm", tmp_path / "vmlinux"], check=True, capture_output=True,
                        text=True).stdout
    symbols = {name: int(value, 16) for value, _kind, name in
               (line.split() for line in nm.splitlines())}
    return tmp_path / "vmlinux", symbols


def _kallsyms(symbols: dict[str, int], banner_shift: int = 0) -> Kallsyms:
    at = {name: addr + SLIDE for name, addr in symbols.items()}
    return Kallsyms.parse("\n".join([
        f"{at['_text']:016x} T _text", f"{at['_stext']:016x} T _stext",
        f"{at['_etext']:016x} T _etext",
        f"{at['linux_banner'] + banner_shift:016x} D linux_banner"]))


def test_the_same_build_passes_and_another_is_refused(vmlinux) -> None:
    path, symbols = vmlinux
    same = _kallsyms(symbols)
    with open_vmlinux(path, same.address("_text")) as text:
        check_same_build(same, text, "kallsyms", str(path))
    other = _kallsyms(symbols, banner_shift=-8)  # another build: its banner is elsewhere
    with open_vmlinux(path, other.address("_text")) as text:
        with pytest.raises(InputError, match="linux_banner is not the version string"):
            check_same_build(other, text, "kallsyms", str(path))


def test_kallsyms_without_data_symbols_is_checked_by_its_text_only(vmlinux) -> None:
    path, symbols = vmlinux
    at = {name: addr + SLIDE for name, addr in symbols.items()}
    bare = Kallsyms.parse(f"{at['_stext']:016x} T _stext\n{at['_etext']:016x} T _etext\n")
    with open_vmlinux(path, at["_stext"]) as text:
        check_same_build(bare, text, "kallsyms", str(path))  # nothing to tell them apart
    with open_vmlinux(path, at["_stext"] + 0x10000000) as text:
        with pytest.raises(InputError, match="_stext is not in its text"):
            check_same_build(bare, text, "kallsyms", str(path))
