"""Keep the probes in step with kernel modules that load and unload while we trace.

esp4, esp6, xfrm_interface and vti are usually loaded on demand, long after xfrmtrace
started.  Each poll compares /proc/modules (:class:`ModuleWatcher`), re-reads the symbols
of the modules that changed, detaches from the ones that went away and resolves and
attaches the ones that came, with the site cache.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from xfrmtrace.errors import XfrmtraceError
from xfrmtrace.kernel.kallsyms import VMLINUX
from xfrmtrace.kernel.modules import ModuleWatcher
from xfrmtrace.kernel.view import KernelView
from xfrmtrace.resolve.discovery import function_arguments, resolve_sites
from xfrmtrace.resolve.model import Site
from xfrmtrace.resolve.sitecache import SiteCache, decodes_as_resolved
from xfrmtrace.trace.tracer import Tracer

log = logging.getLogger("xfrmtrace.trace.modulesites")


class ModuleFollower:
    def __init__(self, watcher: ModuleWatcher, view: KernelView, cache: Optional[SiteCache],
                 status: Callable[[str], None]) -> None:
        """``watcher`` must have been created before ``view`` read kallsyms, so that a
        module loading in between is seen as new (and found already probed)."""
        self._watcher = watcher
        self._view = view
        self._cache = cache
        self._status = status

    def poll(self, tracer: Tracer) -> None:
        """Detach from modules that went away; resolve and attach to the ones that came."""
        changes = self._watcher.poll()
        if not changes:
            return
        log.info("modules loaded: %s; unloaded: %s", " ".join(changes.loaded) or "-",
                 " ".join(changes.unloaded) or "-")
        for name in changes.unloaded:
            removed = tracer.remove_object(name)
            if removed:
                self._status(f"Module {name} unloaded: removed its {removed} probes")
        try:
            self._view.syms.refresh_modules(changes.unloaded + changes.loaded)
        except XfrmtraceError as err:
            self._status(f"warning: cannot follow module changes: {err}")
            return
        misplaced = self.misplaced_objects(tracer)
        for name in misplaced:
            self._status(f"warning: module {name}: probed code now belongs to another module; "
                         "resolving its sites again")
            # Detach first, and wait until the probed bytes are back: a kprobe's int3 (or an
            # optimized probe's jump, restored a little later) would hide the instruction
            # from the neighbour's resolution.
            sites = [s for s in tracer.sites.values()
                     if s.object == name and s.address in tracer.attached_addresses(name)]
            tracer.remove_object(name)
            self._wait_for_original_text(sites)
        for name in sorted(set(changes.loaded) | misplaced):
            self._attach_module(tracer, name)

    def _wait_for_original_text(self, sites: list[Site], timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(sites)
        while pending and time.monotonic() < deadline:
            pending = [s for s in pending if not decodes_as_resolved(s, self._view.text.read)]
            if pending:
                time.sleep(0.02)
        for site in pending:
            log.warning("text at %s still differs after removing its probe", site.label)

    def misplaced_objects(self, tracer: Tracer) -> set[str]:
        """Modules with a probed site that the symbol table now places elsewhere.

        A module's last function has no end marker in kallsyms; while a neighbour is
        still being loaded (invisible until it is formed), the assumed extent can run
        into the neighbour's fresh code.  When the neighbour appears, its symbols show
        the mistake.
        """
        misplaced = set()
        for site in tracer.sites.values():
            if site.object == VMLINUX or site.address not in tracer.attached_addresses(
                    site.object):
                continue
            func = self._view.syms.lookup(site.address)
            if func is None or (func.object, func.name) != (site.object, site.function):
                misplaced.add(site.object)
        return misplaced

    def _attach_module(self, tracer: Tracer, name: str) -> None:
        started = time.monotonic()
        try:
            sites = resolve_sites(self._view, [name], self._cache).sites
        except (XfrmtraceError, OSError) as err:  # e.g. unloaded again while we read it
            self._status(f"warning: module {name} loaded, but its sites cannot be resolved: "
                         f"{err}")
            return
        if not sites or {s.address for s in sites} == tracer.attached_addresses(name):
            return  # nothing to probe, or already probed (loaded while we started)
        tracer.remove_object(name)
        report = tracer.add(sites, function_arguments(self._view, sites))
        for site, why in report.sites_failed:
            self._status(f"warning: cannot probe {site.label} ({site.counter}): {why}")
        self._status(f"Module {name} loaded: attached {report.sites_attached}/"
                     f"{report.sites_expected} probes "
                     f"({time.monotonic() - started:.2f}s after noticing it)")
