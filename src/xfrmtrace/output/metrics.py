"""Prometheus metrics (``--metrics-addr``): exact in-kernel counts, served over HTTP.

Counts are read from the BPF maps when Prometheus scrapes, not from the events that reached
user space, so they stay exact under filters, rate limits and ring-buffer loss.  The
HTTP server runs in its own thread; :class:`MetricsSnapshot` is taken by a callback the
tracing session provides, under the session's lock.

prometheus-client is an optional dependency (extra ``metrics``): it is imported only when
metrics are asked for.
"""

from __future__ import annotations

import platform
import socket
import threading
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterator, Mapping, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from xfrmtrace import __version__
from xfrmtrace.errors import InputError
from xfrmtrace.output.netnslabels import NetnsLabeller
from xfrmtrace.output.safetext import printable
from xfrmtrace.resolve.model import Site

DEFAULT_HOST = "127.0.0.1"  # metrics stay on the host unless an address is given
UNKNOWN_NETNS = "unknown"

# (counter, function, netns label) -> increments
ErrorCounts = dict[tuple[str, str, str], int]


@dataclass
class MetricsSnapshot:
    """Everything one scrape reports, read at one moment."""

    errors: ErrorCounts = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)  # enum xt_stat names, lower case
    probes_attached: int = 0
    probes_expected: int = 0
    netns_names: dict[int, str] = field(default_factory=dict)  # inode -> name, named ones


def parse_listen_address(text: str) -> tuple[str, int]:
    """``PORT``, ``:PORT``, ``HOST:PORT``, ``[V6]:PORT`` or ``V6:PORT`` -> (host, port).

    Without a host the server binds to 127.0.0.1: exposing it is a deliberate choice.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise InputError(f"invalid metrics address {text!r}: use [HOST:]PORT, "
                         "e.g. 127.0.0.1:9477") from None
    if not 0 < port < 65536:
        raise InputError(f"invalid metrics port in {text!r}: must be 1-65535")
    return host, port


def error_counts(sites: Mapping[int, Site], site_counts: Mapping[int, int],
                 netns_counts: Mapping[tuple[int, int], int],
                 labeller: Optional[NetnsLabeller] = None) -> ErrorCounts:
    """Per (counter, function, netns label) totals from the per-site and per-(site, netns)
    maps.

    The per-site count is exact; per-netns entries can be missing (netns 0 when the
    namespace was not found, or the map was full).  What the netns entries do not
    account for is reported under netns ``"unknown"``.  Without ``labeller`` every
    namespace is labelled by its inode and the sum equals the per-site totals; with it,
    namespaces past its limit share ``"other"`` and gone ones are left out
    (output/netnslabels.py).
    """
    totals: ErrorCounts = {}

    def add(site_id: int, netns: str, count: int) -> None:
        site = sites.get(site_id)
        if site is not None and count > 0:
            key = (site.counter, site.function, netns)
            totals[key] = totals.get(key, 0) + count

    attributed: dict[int, int] = {}
    known: dict[tuple[int, int], int] = {}
    for (site_id, netns), count in netns_counts.items():
        if site_id not in sites or not count:
            continue
        attributed[site_id] = attributed.get(site_id, 0) + count
        if netns:
            known[(site_id, netns)] = count
        else:
            add(site_id, UNKNOWN_NETNS, count)
    labelled = (labeller.labels(known) if labeller is not None
                else {(site_id, str(netns)): n for (site_id, netns), n in known.items()})
    for (site_id, label), count in labelled.items():
        add(site_id, label, count)
    for site_id, count in site_counts.items():
        add(site_id, UNKNOWN_NETNS, count - attributed.get(site_id, 0))
    return totals


class _Collector:
    """A prometheus-client collector that turns a snapshot into metric families."""

    def __init__(self, snapshot: Callable[[], Optional[MetricsSnapshot]]) -> None:
        self._snapshot = snapshot
        self._build = {"version": __version__, "kernel": platform.release(),
                       "python": platform.python_version()}

    def collect(self) -> Iterator[Any]:
        # deferred: optional dependency (the metrics extra), only with --metrics-addr
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        yield InfoMetricFamily("xfrmtrace_build", "xfrmtrace version and the kernel it runs on",
                               value=self._build)
        snap = self._snapshot()
        if snap is None:  # not tracing (yet, or any more)
            return
        errors = CounterMetricFamily(
            "xfrmtrace_xfrm_errors", "XFRM error counter increments seen by the probes, per "
            "counter (as in /proc/net/xfrm_stat), kernel function and network namespace inode "
            "(\"other\": namespaces past --metrics-netns-limit; \"unknown\": not known)",
            labels=["counter", "function", "netns"])
        for (counter, function, netns), count in sorted(snap.errors.items()):
            errors.add_metric([counter, function, netns], count)
        yield errors
        for stat, help_text in _STATS.items():
            yield CounterMetricFamily(f"xfrmtrace_events_{stat}", help_text,
                                      value=snap.stats.get(stat, 0))
        yield GaugeMetricFamily("xfrmtrace_probes_attached",
                                "Counter-site kprobes attached now", value=snap.probes_attached)
        yield GaugeMetricFamily("xfrmtrace_probes_expected",
                                "Counter sites found in the kernel and loaded modules",
                                value=snap.probes_expected)
        names = InfoMetricFamily("xfrmtrace_netns", "Name under /run/netns of a network "
                                 "namespace inode (join on the netns label)",
                                 labels=["netns", "name"])
        for inode, name in sorted(snap.netns_names.items()):
            # The exposition format escapes only \\, \n and ": a name's ESC would reach
            # whoever curls the endpoint (output/safetext.py).
            names.add_metric([str(inode), printable(name)], {})
        yield names


# enum xt_stat counters exported as xfrmtrace_events_<name>_total.
_STATS = {
    "lost": "Events dropped because the ring buffer was full (counts stay exact)",
    "sampled": "Events not sent because of the per-site rate limit (counts stay exact)",
    "filtered": "Increments not sent because of a filter (counts stay exact)",
}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass  # a scrape every few seconds is not worth a log line


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck client must not keep the tool from exiting


class MetricsServer:
    """Binds at construction, so a taken port fails before any work is done, and serves
    from :meth:`start` on: until then a scrape waits, so a successful scrape (Kubernetes'
    readiness probe) means the probes are attached."""

    def __init__(self, address: tuple[str, int]) -> None:
        # deferred: optional dependency (the metrics extra)
        from prometheus_client import CollectorRegistry, make_wsgi_app

        self._snapshot: Callable[[], Optional[MetricsSnapshot]] = lambda: None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(lambda: self._snapshot()))  # type: ignore[arg-type]
        host, port = address
        server_class = type("_Server", (_ThreadingServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        try:
            self._server: WSGIServer = make_server(host, port, make_wsgi_app(registry),
                                       server_class=server_class, handler_class=_QuietHandler)
        except OSError as err:
            raise InputError(f"cannot serve metrics on {host}:{port}: "
                             f"{err.strerror or err}") from None
        self._host = host
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._server.server_port}/metrics"

    def start(self, snapshot: Callable[[], Optional[MetricsSnapshot]]) -> None:
        """Serve, taking each scrape's numbers from ``snapshot`` (None: not tracing)."""
        self._snapshot = snapshot
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="xfrmtrace-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


def metrics_available() -> bool:
    """Whether prometheus-client can be imported (extra ``metrics``)."""
    try:
        import prometheus_client  # noqa: F401  # deferred: optional dependency, checked here
    except ImportError:
        return False
    return True


def require_metrics() -> None:
    if not metrics_available():
        raise InputError("--metrics-addr needs the Python package prometheus-client: "
                         "pip install 'xfrmtrace[metrics]' (or prometheus-client)")

