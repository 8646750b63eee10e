"""One tracing run: load and attach, stream decoded events, detach, summarize."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, TextIO

from xfrmtrace.discovery import KernelView, function_arguments
from xfrmtrace.errors import InputError, KernelFeatureMissing
from xfrmtrace.events import EventDecoder, XfrmErrorEvent
from xfrmtrace.model import Site
from xfrmtrace.netns import NetnsNames
from xfrmtrace.output import jsonl, text
from xfrmtrace.tracer import AttachReport, TraceConfig, Tracer

log = logging.getLogger("xfrmtrace.session")

_POLL_MS = 200


class StopFlag(Protocol):
    stopped: bool


@dataclass
class SessionOptions:
    output: str = "text"  # "text" or "json"
    stack: bool = False
    filter_netns: Optional[str] = None
    filter_mark: Optional[tuple[int, int]] = None
    rate_limit: int = 0
    ringbuf_mib: int = 4
    ready_file: Optional[Path] = None


@dataclass
class SiteTotal:
    site: Site
    count: int
    by_netns: dict[int, int] = field(default_factory=dict)


@dataclass
class Summary:
    """Exact in-kernel counts plus what reached user space."""

    sites: list[SiteTotal]
    events: int
    stats: dict[str, int]
    duration: float

    def by_counter(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for total in self.sites:
            totals[total.site.counter] += total.count
        return dict(totals)


class TraceSession:
    """Wires discovery, the tracer, the decoder and the formatter together."""

    def __init__(self, view: KernelView, sites: list[Site], options: SessionOptions,
                 out: TextIO, status: Callable[[str], None]) -> None:
        self._view = view
        self._sites = sites
        self._options = options
        self._out = out
        self._status = status
        self._netns = NetnsNames()
        self.netns_names = self._netns.name
        self._format = jsonl.format_event if options.output == "json" else text.format_event
        self.events = 0

    def _config(self, counter_filter: Optional[set[int]]) -> TraceConfig:
        netns = 0
        if self._options.filter_netns:
            found = self._netns.lookup(self._options.filter_netns)
            if found is None:
                raise InputError(f"no network namespace named {self._options.filter_netns!r} "
                                 "in /run/netns: give its name or inode number")
            netns = found
        mark_value, mark_mask = self._options.filter_mark or (0, 0)
        return TraceConfig(
            counter_indices=counter_filter,
            netns=netns,
            mark_value=mark_value,
            mark_mask=mark_mask,
            capture_stack=self._options.stack,
            site_rate_limit=self._options.rate_limit,
            ringbuf_bytes=max(1, self._options.ringbuf_mib) << 20,
        )

    def _decoder(self) -> EventDecoder:
        offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        return EventDecoder(
            sites=dict(enumerate(self._sites)),
            counter_names=self._view.model.counters,
            clock=lambda mono_ns: mono_ns + offset,
            netns_name=self._netns.name,
            symbolize=self._view.syms.symbolize,
        )

    def _on_event(self, decoder: EventDecoder) -> Callable[[bytes], None]:
        def handle(raw: bytes) -> None:
            event: XfrmErrorEvent = decoder.decode(raw)
            self._out.write(self._format(event) + "\n")
            self.events += 1
        return handle

    def run(self, stop: StopFlag, deadline: Optional[float] = None,
            counter_filter: Optional[set[int]] = None) -> Summary:
        """Trace until ``stop.stopped`` or ``deadline`` (monotonic seconds)."""
        started = time.monotonic()
        functions = function_arguments(self._view, self._sites)
        tracer = Tracer(self._sites, functions, self._config(counter_filter))
        try:
            tracer.load()
            log.info("BPF object loaded (%.2fs)", time.monotonic() - started)
            tracer.open_ring_buffer(self._on_event(self._decoder()))
            report = tracer.attach()
            log.info("%d site and %d entry probes attached (%.2fs)", report.sites_attached,
                     report.entries_attached, time.monotonic() - started)
            self._report_attach(report)
            if self._options.ready_file:
                self._options.ready_file.write_text(f"{report.sites_attached}\n")
            while not stop.stopped and (deadline is None or time.monotonic() < deadline):
                tracer.poll(_POLL_MS)
                self._out.flush()
            tracer.detach()
            tracer.drain()  # events already queued are still delivered
            self._out.flush()
            summary = self._summary(tracer, time.monotonic() - started)
        finally:
            tracer.close()
        return summary

    def _report_attach(self, report: AttachReport) -> None:
        for site, why in report.sites_failed:
            self._status(f"warning: cannot probe {site.label} ({site.counter}): {why}")
        if report.sites_attached == 0:
            raise KernelFeatureMissing(
                f"none of the {report.sites_expected} counter sites could be probed "
                f"(first error: {report.sites_failed[0][1] if report.sites_failed else '?'})")
        extra = ""
        if report.entries_failed:
            extra = f" ({len(report.entries_failed)} functions without packet context)"
        self._status(f"Attached {report.sites_attached}/{report.sites_expected} probes{extra}")

    def _summary(self, tracer: Tracer, duration: float) -> Summary:
        counts = tracer.site_counts()
        by_netns: dict[int, dict[int, int]] = defaultdict(dict)
        for (site_id, netns), n in tracer.netns_counts().items():
            by_netns[site_id][netns] = n
        totals = [SiteTotal(site, counts.get(i, 0), by_netns.get(i, {}))
                  for i, site in enumerate(self._sites)]
        return Summary(sites=totals, events=self.events, stats=tracer.stats(),
                       duration=duration)
