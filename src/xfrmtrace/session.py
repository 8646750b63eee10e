"""One tracing run: load and attach, stream decoded events, detach, summarize."""

from __future__ import annotations

import functools
import logging
import select
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, TextIO, TypeVar

from xfrmtrace.bpf.abi import XT_RINGBUF_DEFAULT
from xfrmtrace.context.explain import explain
from xfrmtrace.context.xfrmnl.changes import PRESENT, XfrmChange
from xfrmtrace.context.xfrmnl.listener import XfrmWatcher
from xfrmtrace.context.xfrmnl.model import REDACT, KeyPolicy
from xfrmtrace.decode.events import EventDecoder, XfrmErrorEvent
from xfrmtrace.errors import InputError, KernelFeatureMissing
from xfrmtrace.kernel.modules import ModuleWatcher
from xfrmtrace.kernel.netns import NetnsNames
from xfrmtrace.kernel.view import KernelView
from xfrmtrace.output import changes as changes_out
from xfrmtrace.output import jsonl, text
from xfrmtrace.output.metrics import MetricsServer, MetricsSnapshot, error_counts
from xfrmtrace.output.netnslabels import DEFAULT_NETNS_LIMIT, NetnsLabeller, live_netns
from xfrmtrace.output.pcapng import PcapngWriter
from xfrmtrace.output.summary import SiteTotal, Summary
from xfrmtrace.resolve.discovery import function_arguments
from xfrmtrace.resolve.model import Site
from xfrmtrace.resolve.sitecache import SiteCache
from xfrmtrace.trace.modulesites import ModuleFollower
from xfrmtrace.trace.tracer import AttachReport, TraceConfig, Tracer

log = logging.getLogger("xfrmtrace.session")

_POLL_MS = 200
# How often /proc/modules is compared: a module's counters move unseen for at most about this
# long (plus the time to resolve and attach its sites) after it loads.
_MODULE_POLL_S = 0.25
# Events decoded per drain of the ring buffer before they are written out.
_DRAIN_BATCH = 1024
_STOP_DRAIN = -1  # the ring buffer callback's "stop here"; the record counts as consumed
T = TypeVar("T")


def bounded_callback(decode: Callable[[bytes], T], pending: list[T],
                     batch: int = _DRAIN_BATCH) -> Callable[[bytes], int]:
    """A ring-buffer callback that decodes into ``pending`` and stops a drain once it holds
    ``batch`` items.  Under a storm libbpf would keep calling back for as long as records keep
    coming: stopping after a batch lets events be written (and memory freed), and modules and
    netlink be followed, while it lasts.  The caller drains again while it gets _STOP_DRAIN."""
    def handle(raw: bytes) -> int:
        pending.append(decode(raw))
        return _STOP_DRAIN if len(pending) >= batch else 0
    return handle


class _ModuleThread:
    """Follows module loads and unloads on a thread of its own.

    Re-reading kallsyms and resolving a module's sites take seconds under emulation (and
    a while on any busy host); the tracing loop keeps draining events and reading netlink
    meanwhile, so a namespace created during that time is followed before its SAs change.
    Probe changes happen under ``lock``, as for the metrics thread.
    """

    def __init__(self, follower: Optional[ModuleFollower], tracer: Tracer,
                 lock: threading.Lock, status: Callable[[str], None]) -> None:
        self._follower, self._tracer, self._lock, self._status = follower, tracer, lock, status
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if follower is not None:
            self._thread = threading.Thread(target=self._run, name="xfrmtrace-modules",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._follower is not None
        while True:
            with self._lock:
                if self._done.is_set():
                    return
                try:
                    self._follower.poll(self._tracer)
                except Exception as err:  # noqa: BLE001 - tracing goes on without it
                    log.debug("module following failed", exc_info=True)
                    self._status(f"warning: modules loaded from now on are not followed "
                                 f"({type(err).__name__}: {err})")
                    return
            if self._done.wait(_MODULE_POLL_S):
                return

    def stop(self) -> None:
        """Wait for the work under way (probes being added) to finish, then stop."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()


class StopFlag(Protocol):
    stopped: bool


@dataclass
class SessionOptions:
    output: str = "text"  # "text" or "json"
    stack: bool = False
    filter_netns: Optional[str] = None
    filter_mark: Optional[tuple[int, int]] = None
    rate_limit: int = 0
    ringbuf_bytes: int = XT_RINGBUF_DEFAULT
    ready_file: Optional[Path] = None
    follow_xfrm: bool = True  # SA/policy timeline and explanations (NETLINK_XFRM)
    keys: KeyPolicy = REDACT  # --show-keys, --key-fingerprint-secret
    node_name: Optional[str] = None  # "node" of every JSON object
    metrics_netns_limit: int = DEFAULT_NETNS_LIMIT  # namespaces with a metrics label of their own
    host_proc: Path = Path("/proc")  # the host's /proc (--host-proc): which namespaces exist


class TraceSession:
    """Wires discovery, the tracer, the decoder and the formatter together."""

    def __init__(self, view: KernelView, sites: list[Site], options: SessionOptions,
                 out: TextIO, status: Callable[[str], None],
                 modules: Optional[ModuleWatcher] = None,
                 cache: Optional[SiteCache] = None,
                 pcap: Optional[PcapngWriter] = None,
                 metrics: Optional[MetricsServer] = None) -> None:
        """``modules``, if given, was created before ``view`` read kallsyms: modules that
        load later get their sites probed while tracing.  ``pcap`` also gets every event
        with packet bytes; ``metrics`` starts serving once the probes are attached."""
        self._view = view
        self._sites = sites
        self._modules = modules
        self._cache = cache
        self._options = options
        self._out = out
        self._status = status
        self._netns = NetnsNames()
        self.netns_names = self._netns.name
        node = options.node_name
        self._format: Callable[[XfrmErrorEvent], str] = (
            functools.partial(jsonl.format_event, node=node) if options.output == "json"
            else text.format_event)
        self._format_change: Callable[[XfrmChange], str] = (
            functools.partial(changes_out.format_change_json, node=node)
            if options.output == "json" else changes_out.format_change_text)
        self._clock_offset = time.time_ns() - time.monotonic_ns()
        self._pending: list[XfrmErrorEvent] = []
        self.events = 0
        self._pcap = pcap
        self._metrics = metrics
        self._netns_labels = NetnsLabeller(
            options.metrics_netns_limit,
            alive=functools.partial(live_netns, options.host_proc))
        # The metrics thread reads the tracer's maps; this lock keeps it from doing so while
        # the tracing thread adds or removes probes, or closes the tracer.
        self._lock = threading.Lock()
        self._tracer: Optional[Tracer] = None  # set while probes may be attached
        self._netns_filter = 0  # --filter-netns as an inode (0: every namespace)

    def _config(self, counter_filter: Optional[set[int]]) -> TraceConfig:
        netns = 0
        if self._options.filter_netns:
            found = self._netns.lookup(self._options.filter_netns)
            if found is None:
                raise InputError(f"no network namespace named {self._options.filter_netns!r} "
                                 "in /run/netns: give its name or inode number")
            netns = found
        self._netns_filter = netns
        mark_value, mark_mask = self._options.filter_mark or (0, 0)
        return TraceConfig(
            counter_indices=counter_filter,
            netns=netns,
            mark_value=mark_value,
            mark_mask=mark_mask,
            capture_stack=self._options.stack,
            site_rate_limit=self._options.rate_limit,
            ringbuf_bytes=self._options.ringbuf_bytes,
        )

    def _wall_clock(self, monotonic_ns: int) -> int:
        return monotonic_ns + self._clock_offset  # bpf_ktime_get_ns is CLOCK_MONOTONIC

    def _decoder(self, tracer: Tracer) -> EventDecoder:
        return EventDecoder(
            sites=tracer.sites,  # the tracer adds module sites to it as they load
            counter_names=self._view.model.counters,
            clock=self._wall_clock,
            netns_name=self._netns.name,
            symbolize=self._view.syms.symbolize,
        )

    def _on_event(self, decoder: EventDecoder) -> Callable[[bytes], int]:
        return bounded_callback(decoder.decode, self._pending)

    def _start_xfrm_watch(self) -> Optional[XfrmWatcher]:
        if not self._options.follow_xfrm:
            return None
        watcher = XfrmWatcher(keys=self._options.keys)
        try:
            watcher.start()
        except OSError as err:
            self._status(f"warning: cannot follow SA/policy changes ({err}): events come "
                         "without explanations")
            watcher.close()
            return None
        return watcher

    def _emit(self, watcher: Optional[XfrmWatcher], changes: list[XfrmChange]) -> None:
        """Write what arrived: SA/policy changes first (a notification is queued before
        anything it causes can happen), then the counter events, each explained."""
        for change in changes:
            if change.action == PRESENT and self._options.output != "json":
                continue  # the state at start is for the JSON log (report); text shows changes
            if self._netns_filter and change.netns != self._netns_filter:
                continue  # --filter-netns: that namespace's timeline only
            change.time_ns = self._wall_clock(change.monotonic_ns)
            change.netns_name = self._netns.name(change.netns)
            self._out.write(self._format_change(change) + "\n")
        events = self._pending[:]
        self._pending.clear()  # in place: the ring buffer callback appends to this list
        for event in events:
            if watcher is not None:
                event.explain = explain(event, watcher.db)
            self._out.write(self._format(event) + "\n")
            if self._pcap is not None:
                self._pcap.write_event(event)
            self.events += 1
        self._out.flush()
        if self._pcap is not None:
            self._pcap.flush()

    def run(self, stop: StopFlag, deadline: Optional[float] = None,
            counter_filter: Optional[set[int]] = None) -> Summary:
        """Trace until ``stop.stopped`` or ``deadline`` (monotonic seconds)."""
        started = time.monotonic()
        tracer = Tracer(self._config(counter_filter), self._view.machine)
        watcher = self._start_xfrm_watch()
        try:
            tracer.load()
            log.info("BPF object loaded (%.2fs)", time.monotonic() - started)
            tracer.open_ring_buffer(self._on_event(self._decoder(tracer)))
            report = tracer.add(self._sites, function_arguments(self._view, self._sites))
            log.info("%d site and %d entry probes attached, %d functions need none (%.2fs)",
                     report.sites_attached, report.entries_attached, report.entries_unneeded,
                     time.monotonic() - started)
            self._report_attach(report)
            self._tracer = tracer
            if self._metrics is not None:
                self._metrics.start(self.metrics_snapshot)
                self._status(f"Serving metrics on {self._metrics.url}")
            if self._options.ready_file:
                self._options.ready_file.write_text(f"{report.sites_attached}\n")
            modules = self._follow_modules(tracer)
            try:
                while not stop.stopped and (deadline is None or time.monotonic() < deadline):
                    fds = [tracer.fileno(), *(watcher.fds() if watcher else [])]
                    try:
                        ready = set(select.select(fds, [], [], _POLL_MS / 1000)[0])
                    except InterruptedError:
                        ready = set()
                    tracer.drain()
                    # Netlink after the ring buffer: a change the kernel queued before an
                    # error happened is then read before that error is explained.  With
                    # events pending every socket is read, not only those select() saw
                    # ready: the change may have come after select() returned.
                    changes = (watcher.poll(None if self._pending else ready)
                               if watcher else [])
                    self._emit(watcher, changes)
            finally:
                modules.stop()
            with self._lock:
                tracer.detach()
            while tracer.drain() == _STOP_DRAIN:  # events already queued are still delivered
                self._emit(watcher, [])
            self._emit(watcher, watcher.poll() if watcher else [])
            summary = self._summary(tracer, time.monotonic() - started)
        finally:
            with self._lock:
                self._tracer = None
                tracer.close()
            if watcher is not None:
                watcher.close()
        return summary

    def _follow_modules(self, tracer: Tracer) -> _ModuleThread:
        return _ModuleThread(
            ModuleFollower(self._modules, self._view, self._cache, self._status)
            if self._modules is not None else None, tracer, self._lock, self._status)

    def metrics_snapshot(self) -> Optional[MetricsSnapshot]:
        """Exact counts from the kernel maps, for a metrics scrape (any thread)."""
        with self._lock:
            tracer = self._tracer
            if tracer is None:
                return None
            sites = dict(tracer.sites)
            errors = error_counts(sites, tracer.site_counts(), tracer.netns_counts(),
                                  self._netns_labels)
            stats = tracer.stats()
            attached, expected = tracer.site_probes()
        inodes = {int(netns) for _c, _f, netns in errors if netns.isdigit()}
        names = {inode: name for inode in inodes if (name := self._netns.name(inode))}
        return MetricsSnapshot(errors=errors, stats=stats, probes_attached=attached,
                               probes_expected=expected, netns_names=names)

    def _report_attach(self, report: AttachReport) -> None:
        for site, why in report.sites_failed:
            self._status(f"warning: cannot probe {site.label} ({site.counter}): {why}")
        if report.sites_attached == 0:
            raise KernelFeatureMissing(
                f"none of the {report.sites_expected} counter sites could be probed "
                f"(first error: {report.sites_failed[0][1] if report.sites_failed else '?'})")
        # Argument probes are what healthy traffic pays for (argregs.py): say how many.
        extra = (f" (+{report.entries_attached} recording packet context, "
                 f"{report.entries_unneeded} functions need none")
        if report.entries_failed:
            extra += f"; {len(report.entries_failed)} functions without packet context"
        self._status(f"Attached {report.sites_attached}/{report.sites_expected} probes{extra})")

    def _summary(self, tracer: Tracer, duration: float) -> Summary:
        counts = tracer.site_counts()
        by_netns: dict[int, dict[int, int]] = defaultdict(dict)
        for (site_id, netns), n in tracer.netns_counts().items():
            by_netns[site_id][netns] = n
        totals = [SiteTotal(site, counts.get(i, 0), by_netns.get(i, {}))
                  for i, site in sorted(tracer.sites.items())]
        return Summary(sites=totals, events=self.events, stats=tracer.stats(),
                       duration=duration)
