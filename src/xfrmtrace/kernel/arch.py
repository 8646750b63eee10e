"""The machine a kernel runs on, and what xfrmtrace can do there.

Two instruction sets have a site resolver (x86-64: resolve/sites.py, arm64:
resolve/arm64_sites.py) and a BPF object (``xfrm.<machine>.bpf.o``, trace/tracer.py).
Anything else gets one line saying so, before any file or kernel object is touched.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from xfrmtrace.errors import InputError, KernelFeatureMissing

X86_64 = "x86_64"
ARM64 = "aarch64"
#: Machines whose kernel text the resolver reads and the tracer attaches on (``uname -m``
#: spelling).
SUPPORTED = (X86_64, ARM64)
_ELF_MACHINES = {62: X86_64, 183: ARM64}  # e_machine: EM_X86_64, EM_AARCH64
_UNAME_ALIASES = {"arm64": ARM64, "amd64": X86_64}


def running_machine() -> str:
    """``uname -m`` of this machine (``arm64`` spelled ``aarch64``, as Linux does)."""
    machine = os.uname().machine
    return _UNAME_ALIASES.get(machine, machine)


def require_supported(machine: str) -> None:
    """KernelFeatureMissing (one line) unless xfrmtrace knows ``machine``."""
    if machine not in SUPPORTED:
        raise KernelFeatureMissing(
            f"unsupported architecture {machine}: xfrmtrace reads x86-64 and arm64 kernel "
            "code only")


def elf_machine(stream: BinaryIO, name: str) -> str:
    """The machine an ELF file (a vmlinux) is for, from its header."""
    stream.seek(0)
    header = stream.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise InputError(f"{name} is not an ELF file: give the uncompressed vmlinux")
    if header[5] != 1:
        raise InputError(f"{name} is a big-endian ELF file: xfrmtrace reads little-endian "
                         "x86-64 and arm64 kernels")
    e_machine = int.from_bytes(header[18:20], "little")
    machine = _ELF_MACHINES.get(e_machine)
    if machine is None:
        raise KernelFeatureMissing(f"unsupported architecture in {name} (ELF machine "
                                   f"{e_machine}): xfrmtrace reads x86-64 and arm64 kernels")
    return machine
