"""A kernel to trace or inspect: its symbols, text and BTF facts, live or from files.

Live: /proc/kallsyms + /proc/kcore + /sys/kernel/btf.  Offline: a vmlinux file (its .BTF
section) + a kallsyms file from a running instance of the same build.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from xfrmtrace.bpf.btf import Btf
from xfrmtrace.errors import BtfLookupError, InputError, KernelFeatureMissing
from xfrmtrace.kernel import arch
from xfrmtrace.kernel import counters as counters_mod
from xfrmtrace.kernel.kallsyms import Kallsyms
from xfrmtrace.kernel.ktext import (
    TextReader,
    open_kcore,
    open_vmlinux,
    vmlinux_has_btf,
    vmlinux_machine,
)

log = logging.getLogger("xfrmtrace.kernel")

MIB_MEMBER = ("net", "mib.xfrm_statistics")
HOST_PROC = Path("/proc")


@dataclass
class KernelModel:
    """BTF-derived facts: where the XFRM MIB pointer lives and what counters exist."""

    btf: Btf
    mib_offset: int
    counters: dict[int, str]  # LINUX_MIB_XFRM* value -> /proc name


def kernel_model(btf: Btf, proc_names: Optional[list[str]] = None) -> KernelModel:
    """Read the MIB offset and counter enum; missing ones mean no XFRM statistics."""
    try:
        offset = btf.member_offset(*MIB_MEMBER)
    except BtfLookupError as err:
        raise KernelFeatureMissing(
            "kernel has no XFRM statistics (struct net has no mib.xfrm_statistics): "
            "it was built without CONFIG_XFRM_STATISTICS"
        ) from err
    try:
        enum = btf.enum_values(counters_mod.ENUM_SENTINEL)
    except BtfLookupError as err:
        raise KernelFeatureMissing(
            "kernel BTF has no LINUX_MIB_XFRM* counters: built without CONFIG_XFRM_STATISTICS"
        ) from err
    names = counters_mod.counter_names(enum, proc_names or ())
    return KernelModel(btf=btf, mib_offset=offset, counters=names)


@dataclass
class KernelView:
    """A kernel to trace or inspect: symbols, text and BTF, live or from files."""

    syms: Kallsyms
    text: TextReader
    model: KernelModel
    live: bool
    source: str
    machine: str = arch.X86_64  # ``uname -m`` spelling: whose instructions the text holds

    def close(self) -> None:
        self.text.close()
        self.model.btf.close()


def open_live(host_proc: Path = HOST_PROC) -> KernelView:
    """The running kernel (needs root).

    ``host_proc`` is a procfs of the host: in a container, where the runtime masks
    /proc/kcore, the host's /proc mounted elsewhere (``--host-proc``).
    """
    started = time.monotonic()
    machine = arch.running_machine()
    arch.require_supported(machine)
    btf = Btf.vmlinux()
    try:
        model = kernel_model(btf, counters_mod.read_proc_names())
        syms = Kallsyms.load(host_proc / "kallsyms")
        text = open_kcore(host_proc / "kcore")
    except BaseException:
        btf.close()
        raise
    log.info("kernel BTF, kallsyms and kcore opened (%.2fs)", time.monotonic() - started)
    return KernelView(syms, text, model, live=True, source="running kernel", machine=machine)


def open_offline(vmlinux: Union[str, Path], kallsyms: Union[str, Path]) -> KernelView:
    """A vmlinux file plus the kallsyms of a running instance of the same build."""
    machine = vmlinux_machine(vmlinux)
    if not vmlinux_has_btf(vmlinux):
        raise InputError(f"{vmlinux} has no .BTF section: give the uncompressed vmlinux of a "
                         "kernel built with CONFIG_DEBUG_INFO_BTF")
    syms = Kallsyms.load(kallsyms)
    btf = Btf.from_file(vmlinux)
    try:
        model = kernel_model(btf)
        text = open_vmlinux(vmlinux, syms.address("_text") or syms.address("_stext"))
    except BaseException:
        btf.close()
        raise
    try:
        check_same_build(syms, text, str(kallsyms), str(vmlinux))
    except InputError:
        text.close()
        btf.close()
        raise
    return KernelView(syms, text, model, live=False, source=str(vmlinux), machine=machine)


_BANNER = b"Linux version "


def check_same_build(syms: Kallsyms, text: TextReader, kallsyms: str, vmlinux: str) -> None:
    """InputError unless the kallsyms is from a running instance of this very vmlinux:
    with another kernel's kallsyms every function would be read at the wrong place and
    the sites found would be nonsense.  ``linux_banner`` (with data symbols) must hold the
    version string in the file; at least ``_stext`` must be in its text."""
    if not text.read(syms.core_text_range()[0], 1):
        raise InputError(f"{kallsyms} does not match {vmlinux}: _stext is not in its text")
    banner = syms.data_address("linux_banner")
    if banner is not None and not text.read(banner, len(_BANNER)).startswith(_BANNER):
        raise InputError(f"{kallsyms} is not from a running {vmlinux}: its linux_banner is "
                         "not the version string in that file (give the /proc/kallsyms of "
                         "that very build)")
