"""Load the BPF object, attach it at every site, and hand over raw events.

One program (``xt_site``) is attached at every site and one (``xt_entry``) at
the record point of every function whose arguments are not all in registers at
its sites (its entry, or a later point: see argregs.py).  Both identify the
probe that fired by its address, so no per-attachment cookie is needed
(kprobe cookies only arrived in Linux 5.15; the matrix starts at 5.10).  An arm64
site the kernel will not kprobe (``Site.hw_breakpoint``) gets a hardware breakpoint
on every CPU instead, running ``xt_site_bp`` (kernel/breakpoints.py).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from xfrmtrace.bpf import abi
from xfrmtrace.bpf.btf import Btf
from xfrmtrace.bpf.objects import BpfObject, Link, RingBuffer, kprobe_pmu_available
from xfrmtrace.kernel import arch, breakpoints
from xfrmtrace.resolve.model import REGISTER_SLOTS, FunctionArgs, Site

log = logging.getLogger("xfrmtrace.trace.tracer")


def bpf_object(machine: str) -> Path:
    """The BPF object built for ``machine`` (``uname -m`` spelling; Makefile BPF_OBJS)."""
    return Path(__file__).parents[1] / "bpf" / f"xfrm.{machine}.bpf.o"


#: The object for the machine this runs on.
BPF_OBJECT = bpf_object(arch.running_machine())

# With IBT (CONFIG_X86_KERNEL_IBT) a kprobe on a function's first byte is
# moved past the 4-byte endbr64, so entry probes may report either address.
_ENDBR64_SIZE = 4


@dataclass
class TraceConfig:
    """What the BPF side reports; zero/None means "everything"."""

    counter_indices: Optional[set[int]] = None
    netns: int = 0
    mark_value: int = 0
    mark_mask: int = 0
    capture_stack: bool = False
    site_rate_limit: int = 0
    ringbuf_bytes: int = abi.XT_RINGBUF_DEFAULT

    def to_abi(self) -> abi.XtConfig:
        mask = 0
        for index in self.counter_indices or ():
            mask |= 1 << (index & 63)
        return abi.XtConfig(
            counter_mask=mask,
            netns=self.netns,
            mark_value=self.mark_value & self.mark_mask,
            mark_mask=self.mark_mask,
            capture_stack=int(self.capture_stack),
            site_rate_limit=self.site_rate_limit,
        )


@dataclass
class AttachReport:
    """Which probes are in place."""

    sites_attached: int = 0
    sites_failed: list[tuple[Site, str]] = field(default_factory=list)
    entries_attached: int = 0
    entries_failed: list[tuple[str, str]] = field(default_factory=list)
    entries_unneeded: int = 0  # functions whose sites hold every argument in registers

    @property
    def sites_expected(self) -> int:
        return self.sites_attached + len(self.sites_failed)


class Tracer:
    """Owns the BPF object, its probes and its ring buffer.

    Sites and functions can be added and removed while tracing (modules come
    and go).  Each keeps its id for the whole run: a module that is unloaded
    and loaded again gets its old site ids back, so its counts add up and an
    event still queued from before the unload decodes to the right site.
    """

    def __init__(self, config: TraceConfig, machine: Optional[str] = None,
                 object_path: Optional[Path] = None) -> None:
        """``machine``: whose kernel (``uname -m`` spelling), default this one's."""
        machine = machine or arch.running_machine()
        self.config = config
        self.sites: dict[int, Site] = {}  # site_id -> site, as the decoder reads it
        self._machine = machine
        self._slots = REGISTER_SLOTS[machine]
        self._object_path = object_path or bpf_object(machine)
        self._obj: Optional[BpfObject] = None
        self._ring: Optional[RingBuffer] = None
        self._site_ids: dict[tuple[str, str, int], int] = {}
        self._func_ids: dict[tuple[str, str], int] = {}
        self._links: dict[str, list[Link]] = {}  # object -> its probes
        self._addresses: dict[str, list[tuple[str, int]]] = {}  # object -> (map, address)
        # Site probes per object, wanted and attached (entry probes are not counted).
        self._sites_expected: dict[str, int] = {}
        self._sites_attached: dict[str, int] = {}
        self._by_address: Optional[bool] = None
        self._breakpoint_hazard: Optional[str] = None  # why not, once looked at ("": none)

    # --- setup -------------------------------------------------------------------------------

    def load(self) -> None:
        """Open and load the object; probes come with :meth:`add`."""
        obj = BpfObject.open_file(self._object_path)
        self._obj = obj
        obj.set_rodata("cfg", bytes(self.config.to_abi()))
        obj.map("events").set_max_entries(_power_of_two(self.config.ringbuf_bytes))
        obj.load()
        self._by_address = kprobe_pmu_available()

    def add(self, sites: list[Site], functions: list[FunctionArgs]) -> AttachReport:
        """Fill the maps for ``sites`` and attach their probes.

        Entry probes go first, so the first site hit already finds its frame.
        """
        assert self._obj is not None
        report = AttachReport()
        entry_prog = self._obj.program("xt_entry")
        for func in functions:
            func_id = self._register_function(func)
            if func_id is None:
                report.entries_failed.append((func.function, "function table full"))
                continue
            if not func.records:
                report.entries_unneeded += 1
                continue
            for point in func.records:
                try:
                    self._keep(func.object, _attach(entry_prog, func.function, point.offset,
                                                     func.address + point.offset,
                                                     bool(self._by_address)))
                    report.entries_attached += 1
                except OSError as err:
                    report.entries_failed.append((func.function, err.strerror or str(err)))
                    log.info("no argument recording for %s+%#x: %s", func.function,
                             point.offset, err)
        site_prog = self._obj.program("xt_site")
        for site in sites:
            self._sites_expected[site.object] = self._sites_expected.get(site.object, 0) + 1
            if not self._register_site(site):
                report.sites_failed.append((site, "site table full"))
                continue
            try:
                if site.hw_breakpoint:
                    self._attach_breakpoints(site)
                else:
                    self._keep(site.object, _attach(site_prog, site.function, site.offset,
                                                    site.address, bool(self._by_address)))
                self._sites_attached[site.object] = self._sites_attached.get(site.object, 0) + 1
                report.sites_attached += 1
            except OSError as err:
                report.sites_failed.append((site, err.strerror or str(err)))
        return report

    def _attach_breakpoints(self, site: Site) -> None:
        """A hardware execution breakpoint at the site on every online CPU, all or none
        (raises OSError with the reason)."""
        assert self._obj is not None
        if self._breakpoint_hazard is None:
            btf = Btf.vmlinux()
            try:
                self._breakpoint_hazard = breakpoints.unsupported_reason(btf, self._machine) or ""
            finally:
                btf.close()
        if self._breakpoint_hazard:
            raise OSError(errno.EOPNOTSUPP, f"no hardware breakpoint: {self._breakpoint_hazard}")
        prog = self._obj.program("xt_site_bp")
        made: list[Link] = []
        try:
            for cpu in breakpoints.online_cpus():
                fd = breakpoints.open_execute_breakpoint(site.address, cpu, self._machine)
                try:
                    made.append(prog.attach_perf_event(fd, f"breakpoint {site.label} cpu {cpu}"))
                except OSError:
                    os.close(fd)  # the link owns it only once attached
                    raise
        except OSError:
            for link in made:
                link.destroy()
            raise
        for link in made:
            self._keep(site.object, link)

    def remove_object(self, obj: str) -> int:
        """Detach every probe in ``obj`` (an unloaded module); returns how many."""
        assert self._obj is not None
        links = self._links.pop(obj, [])
        for link in links:
            link.destroy()
        self._sites_expected.pop(obj, None)
        self._sites_attached.pop(obj, None)
        # The addresses may be reused by the next module loaded there.
        for map_name, address in self._addresses.pop(obj, []):
            self._obj.map(map_name).delete(_u64(address))
        return len(links)

    def site_probes(self) -> tuple[int, int]:
        """(attached, expected) site probes in the objects loaded now."""
        return sum(self._sites_attached.values()), sum(self._sites_expected.values())

    def attached_addresses(self, obj: str) -> set[int]:
        """Addresses of the sites currently registered for ``obj``."""
        return {address for map_name, address in self._addresses.get(obj, [])
                if map_name == "sites"}

    def _register_function(self, func: FunctionArgs) -> Optional[int]:
        assert self._obj is not None
        key = (func.object, func.function)
        func_id = self._func_ids.get(key, len(self._func_ids))
        if func_id >= abi.XT_MAX_FUNCS:
            return None
        self._func_ids[key] = func_id
        info = abi.XtFuncInfo(func_id=func_id)
        for i in range(abi.XtArgRole.NUM):
            info.arg_slot[i] = abi.XT_NO_ARG
        for role, position in func.positions.items():
            info.arg_slot[role] = position
        self._obj.map("funcs").update(_u32(func_id), bytes(info))
        entries = self._obj.map("entries")
        for point in func.records:
            entry = abi.XtEntryInfo(depth=point.depth, func_id=func_id)
            for slot in range(len(entry.arg_reg)):
                entry.arg_reg[slot] = self._register_number(point.registers, slot)
            address = func.address + point.offset
            addresses = [address]
            if point.offset == 0 and self._machine == arch.X86_64:
                addresses.append(address + _ENDBR64_SIZE)
            for address in addresses:
                entries.update(_u64(address), bytes(entry))
                self._addresses.setdefault(func.object, []).append(("entries", address))
        return func_id

    def _register_site(self, site: Site) -> bool:
        assert self._obj is not None
        key = (site.object, site.function, site.offset)
        site_id = self._site_ids.get(key, len(self._site_ids))
        if site_id >= abi.XT_MAX_SITES:
            return False
        self._site_ids[key] = site_id
        self.sites[site_id] = site
        info = abi.XtSiteInfo(
            stack_depth=abi.XT_DEPTH_UNKNOWN if site.stack_depth is None else site.stack_depth,
            site_id=site_id,
            counter=site.counter_index,
            func_id=self._func_ids.get((site.object, site.entry_function or ""), 0xFFFFFFFF),
            mib_bias=site.mib_bias,
            mib_reg=self._slots[site.mib_reg],
            net_reg=self._slots.get(site.net_reg or "", abi.XT_NO_REG),
            cpu_reg=self._slots.get(site.cpu_reg or "", abi.XT_NO_REG),
        )
        for slot in range(len(info.arg_reg)):
            info.arg_reg[slot] = self._register_number(site.arg_regs, slot)
            stack = site.arg_stack[slot] if slot < len(site.arg_stack) else None
            if info.arg_reg[slot] == abi.XT_NO_REG and stack is not None:
                info.arg_reg[slot] = abi.XT_ARG_IN_STACK
                info.arg_sp_off[slot] = stack
        self._obj.map("sites").update(_u64(site.address), bytes(info))
        self._addresses.setdefault(site.object, []).append(("sites", site.address))
        return True

    def _register_number(self, registers: tuple[Optional[str], ...], slot: int) -> int:
        """The BPF side's number of ``registers[slot]``, or XT_NO_REG when there is none."""
        name = registers[slot] if slot < len(registers) else None
        return self._slots.get(name or "", abi.XT_NO_REG)

    def _keep(self, obj: str, link: Link) -> None:
        self._links.setdefault(obj, []).append(link)

    def open_ring_buffer(self, callback: Callable[[bytes], Optional[int]]) -> None:
        assert self._obj is not None
        self._ring = RingBuffer(self._obj.map("events"), callback)

    # --- running -----------------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> int:
        """Deliver pending events to the callback; returns how many."""
        assert self._ring is not None
        return self._ring.poll(timeout_ms)

    def fileno(self) -> int:
        """Readable when events are waiting (for select/poll)."""
        assert self._ring is not None
        return self._ring.fileno()

    def drain(self) -> int:
        """Deliver what is in the ring buffer now: the number of records, or the callback's
        negative value when it asked to stop early (more may be waiting)."""
        return self._ring.consume() if self._ring is not None else 0

    def detach(self) -> None:
        """Remove every probe; counts and queued events stay readable."""
        for links in self._links.values():
            for link in links:
                link.destroy()
        self._links.clear()
        self._sites_attached.clear()

    def site_counts(self) -> dict[int, int]:
        """site_id -> exact number of increments seen (all CPUs)."""
        assert self._obj is not None
        counts_map = self._obj.map("site_counts")
        counts = {}
        for site_id in self.sites:
            values = counts_map.lookup_percpu(_u32(site_id)) or []
            counts[site_id] = sum(int.from_bytes(v[:8], "little") for v in values)
        return counts

    def netns_counts(self) -> dict[tuple[int, int], int]:
        """(site_id, netns inode) -> increments."""
        assert self._obj is not None
        counts_map = self._obj.map("netns_counts")
        result = {}
        for key in counts_map.keys():
            parsed = abi.XtNetnsKey.from_buffer_copy(key)
            values = counts_map.lookup_percpu(key) or []
            result[(parsed.site_id, parsed.netns)] = sum(
                int.from_bytes(v[:8], "little") for v in values)
        return result

    def stats(self) -> dict[str, int]:
        """enum xt_stat name (lower case) -> count."""
        assert self._obj is not None
        stats_map = self._obj.map("stats")
        result = {}
        for stat in abi.XtStat:
            if stat.name == "NUM":
                continue
            values = stats_map.lookup_percpu(_u32(stat)) or []
            result[stat.name.lower()] = sum(int.from_bytes(v[:8], "little") for v in values)
        return result

    def close(self) -> None:
        """Detach and free everything; safe to call twice."""
        self.detach()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attach(prog, function: str, offset: int, address: int, by_address: bool) -> Link:
    """Attach at an absolute address when possible: names can be ambiguous across modules."""
    if by_address:
        return prog.attach_kprobe(None, address)
    return prog.attach_kprobe(function, offset)


def _power_of_two(n: int) -> int:
    """Ring buffers must be a power-of-two number of pages."""
    size = 4096
    while size < n:
        size <<= 1
    return size


def _u32(value: int) -> bytes:
    return ctypes.c_uint32(value).value.to_bytes(4, "little")


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little")
