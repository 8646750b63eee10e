"""Everything the tracer needs to know about a kernel before attaching.

Live: /proc/kallsyms + /proc/kcore + /sys/kernel/btf.  Offline: a vmlinux
file (its .BTF section) + a kallsyms file from the same kernel.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from xfrmtrace import counters as counters_mod
from xfrmtrace import jumplabels
from xfrmtrace.btf import Btf
from xfrmtrace.errors import BtfLookupError, InputError, KernelFeatureMissing
from xfrmtrace.funcargs import function_args
from xfrmtrace.kallsyms import VMLINUX, Kallsyms
from xfrmtrace.ktext import TextReader, open_kcore, open_vmlinux, vmlinux_has_btf
from xfrmtrace.model import FunctionArgs, Resolution, Site, in_registers
from xfrmtrace.sitecache import SiteCache, kernel_build_id, module_build_id

log = logging.getLogger("xfrmtrace.discovery")

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

    def close(self) -> None:
        self.text.close()
        self.model.btf.close()


def open_live(host_proc: Path = HOST_PROC) -> KernelView:
    """The running kernel (needs root).

    ``host_proc`` is a procfs of the host: in a container, where the runtime masks
    /proc/kcore, the host's /proc mounted elsewhere (``--host-proc``).
    """
    started = time.monotonic()
    btf = Btf.vmlinux()
    try:
        model = kernel_model(btf, counters_mod.read_proc_names())
        syms = Kallsyms.load(host_proc / "kallsyms")
        text = open_kcore(host_proc / "kcore")
    except BaseException:
        btf.close()
        raise
    log.info("kernel BTF, kallsyms and kcore opened (%.2fs)", time.monotonic() - started)
    return KernelView(syms, text, model, live=True, source="running kernel")


def open_offline(vmlinux: Union[str, Path], kallsyms: Union[str, Path]) -> KernelView:
    """A vmlinux file plus the kallsyms of a running instance of the same build."""
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
    return KernelView(syms, text, model, live=False, source=str(vmlinux))


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


class ArgumentRoles:
    """Argument roles (funcargs.py) of functions in vmlinux and modules, from their BTF."""

    def __init__(self, view: KernelView) -> None:
        self._view = view
        self._module_btf: dict[str, Optional[Btf]] = {}

    def of(self, function: str, obj: str) -> Optional[FunctionArgs]:
        btf = self._view.model.btf
        if obj != VMLINUX:
            if obj not in self._module_btf:
                self._module_btf[obj] = Btf.module(obj, self._view.model.btf)
            btf = self._module_btf[obj] or btf
        address = self._view.syms.address(function, obj)
        if address is None:
            return None
        return function_args(btf, function, address, obj)

    def slots(self, function: str, obj: str) -> frozenset[int]:
        """Argument positions an event of ``function``'s sites reads."""
        args = self.of(function, obj)
        return args.slots if args is not None else frozenset()

    def close(self) -> None:
        for btf in self._module_btf.values():
            if btf is not None:
                btf.close()
        self._module_btf.clear()


def resolve_sites(view: KernelView, objects: Optional[list[str]] = None,
                  cache: Optional[SiteCache] = None) -> Resolution:
    """Sites of ``objects`` (default: vmlinux + every module), from the cache when valid."""
    names = objects if objects is not None else view.syms.objects()
    if not view.live:
        names = [VMLINUX]  # offline we only have the vmlinux file's bytes
    roles = ArgumentRoles(view)
    resolver = None
    result = Resolution()
    try:
        for obj in names:
            started = time.monotonic()
            build_id = _build_id(view, obj)
            part = cache.load(obj, build_id, view) if cache and build_id else None
            how = "from cache"
            if part is None:
                if resolver is None:
                    # Imported here: a warm start, all from the cache, loads no disassembler.
                    from xfrmtrace.sites import SiteResolver

                    # Only vmlinux's functions use the table: a module loaded while tracing
                    # does not read and parse it again.
                    labels = (jumplabels.read_table(view.syms.jump_table_range(),
                                                    view.text.read,
                                                    view.syms.core_text_range())
                              if VMLINUX in names else None)
                    resolver = SiteResolver(view.text.read, view.syms, view.model.mib_offset,
                                            view.model.counters, roles.slots, labels)
                part = resolver.resolve([obj])
                how = "resolved"
                if cache and build_id:
                    cache.store(obj, build_id, part)
            log.info("%s: %d sites %s (%.2fs)", obj, len(part.sites), how,
                     time.monotonic() - started)
            result.sites.extend(part.sites)
            result.audit.extend(part.audit)
    finally:
        roles.close()
    result.sites.sort(key=lambda s: s.address)
    return result


def _build_id(view: KernelView, obj: str) -> Optional[str]:
    if not view.live:
        return None
    return kernel_build_id() if obj == VMLINUX else module_build_id(obj)


def function_arguments(view: KernelView, sites: list[Site]) -> list[FunctionArgs]:
    """Argument roles of each distinct entry function among ``sites``, and where they are
    recorded: nowhere when every site of the function holds them in registers."""
    by_function: dict[tuple[str, str], list[Site]] = {}
    for site in sites:
        if site.entry_function is not None:
            by_function.setdefault((site.object, site.entry_function), []).append(site)
    result: list[FunctionArgs] = []
    roles = ArgumentRoles(view)
    try:
        for (obj, function), its_sites in by_function.items():
            args = roles.of(function, obj)
            if args is None:
                continue
            if all(in_registers(site.arg_regs, args.slots) for site in its_sites):
                args.record = None
            elif its_sites[0].record is not None:
                args.record = its_sites[0].record
            result.append(args)
    finally:
        roles.close()
    return result
