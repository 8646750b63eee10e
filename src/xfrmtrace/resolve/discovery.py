"""The sites of a kernel (from the site cache, else resolved) and the arguments their
functions record: what the tracer needs before attaching."""

from __future__ import annotations

import logging
import time
from typing import Optional

from xfrmtrace.bpf.btf import Btf
from xfrmtrace.kernel import jumplabels
from xfrmtrace.kernel.kallsyms import VMLINUX
from xfrmtrace.kernel.view import KernelView
from xfrmtrace.resolve.funcargs import function_args
from xfrmtrace.resolve.model import ENTRY_RECORDS, FunctionArgs, Resolution, Site
from xfrmtrace.resolve.sitecache import SiteCache, kernel_build_id, module_build_id

log = logging.getLogger("xfrmtrace.resolve.discovery")


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

    def needs(self, function: str, obj: str) -> dict[int, int]:
        """Argument positions an event of ``function``'s sites reads -> bytes it uses."""
        args = self.of(function, obj)
        return args.needs if args is not None else {}

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
                    resolver = _resolver(view, roles, VMLINUX in names)
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


def _resolver(view: KernelView, roles: ArgumentRoles, with_vmlinux: bool):  # -> CounterScan
    """The site resolver for the view's instruction set."""
    # deferred: start-up (a warm start, all from the cache, loads no disassembler: capstone)
    from xfrmtrace.kernel import arch
    from xfrmtrace.resolve.arm64_sites import Arm64SiteResolver
    from xfrmtrace.resolve.sites import SiteResolver

    # Only vmlinux's functions use the table: a module loaded while tracing does not read
    # and parse it again.
    labels = (jumplabels.read_table(view.syms.jump_table_range(), view.text.read,
                                    view.syms.core_text_range())
              if with_vmlinux else None)
    if view.machine == arch.ARM64:
        return Arm64SiteResolver(view.text.read, view.syms, view.model.mib_offset,
                                 view.model.counters, roles.needs, labels)
    return SiteResolver(view.text.read, view.syms, view.model.mib_offset,
                        view.model.counters, roles.needs, labels)


def _build_id(view: KernelView, obj: str) -> Optional[str]:
    if not view.live:
        return None
    return kernel_build_id() if obj == VMLINUX else module_build_id(obj)


def function_arguments(view: KernelView, sites: list[Site]) -> list[FunctionArgs]:
    """Argument roles of each distinct entry function among ``sites``, and where they are
    recorded: nowhere when every site of the function finds them itself (register, stack)."""
    by_function: dict[tuple[str, str], list[Site]] = {}
    for site in sites:
        if site.entry_function is not None:
            by_function.setdefault((site.object, site.entry_function), []).append(site)
    result: list[FunctionArgs] = []
    entry = ENTRY_RECORDS[view.machine]
    roles = ArgumentRoles(view)
    try:
        for (obj, function), its_sites in by_function.items():
            args = roles.of(function, obj)
            if args is None:
                continue
            if all(site.holds(args.slots) for site in its_sites):
                args.records = ()
            else:
                # Each site's points cut every path to it; the union serves them all.  A site
                # without any (resolved without roles) keeps the entry.
                points = {point for site in its_sites if not site.holds(args.slots)
                          for point in site.records or (entry,)}
                args.records = tuple(sorted(points, key=lambda p: p.offset))
            result.append(args)
    finally:
        roles.close()
    return result
