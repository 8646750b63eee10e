"""Build helper and ctypes mirrors for the test-only BPF object ``selftest.bpf.c``.

Imported by the libbpf and BTF tests as ``tests.bpf.selftest``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SOURCE = HERE / "selftest.bpf.c"
BPF_HELPERS = Path("/usr/include/bpf/bpf_helpers.h")


class SelftestCfg(ctypes.Structure):
    """Mirror of ``struct selftest_cfg`` (the .rodata config)."""

    _fields_ = [
        ("tag", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class SelftestEvent(ctypes.Structure):
    """Mirror of ``struct selftest_event`` (one ring buffer record)."""

    _fields_ = [
        ("tag", ctypes.c_uint64),
        ("syscall_nr", ctypes.c_int64),
        ("tgid", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
    ]


def why_not_buildable() -> Optional[str]:
    """Why the object cannot be built on this machine, or None if it can."""
    if platform.machine() != "x86_64":
        return f"vmlinux.h and -D__TARGET_ARCH_x86 are for x86_64, this is {platform.machine()}"
    if shutil.which("clang") is None:
        return "clang is not installed (Debian package clang)"
    if not BPF_HELPERS.exists():
        return f"{BPF_HELPERS} is missing (Debian package libbpf-dev)"
    if not (REPO / "vmlinux.h").exists():
        return f"{REPO / 'vmlinux.h'} is missing"
    return None


def why_not_loadable() -> Optional[str]:
    """Why BPF programs cannot be loaded by this process, or None if they can."""
    if os.geteuid() != 0:
        return "loading BPF programs needs root"
    return why_not_buildable()


def build(out_dir: Path) -> Path:
    """Compile selftest.bpf.c into ``out_dir``; a compiler error fails loudly."""
    out = out_dir / "selftest.bpf.o"
    cmd = ["clang", "-g", "-O2", "-Wall", "-Werror", "-target", "bpf", "-D__TARGET_ARCH_x86",
           f"-I{REPO}", "-c", str(SOURCE), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return out
