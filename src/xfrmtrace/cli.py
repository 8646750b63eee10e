"""Command line: the only module that prints to the terminal or decides the exit status.

Everything beyond argument parsing is imported inside the command that needs it: that keeps
``xfrmtrace --help`` fast and working on machines without libbpf, capstone or pyroute2.  Each
such deferred import says so with a ``# deferred: start-up`` comment (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional, Sequence, TextIO

from xfrmtrace import __version__
from xfrmtrace.bpf.abi import XT_RINGBUF_DEFAULT
from xfrmtrace.context.xfrmnl.model import FINGERPRINT_SECRET_MIN, KeyPolicy
from xfrmtrace.errors import InputError, KernelFeatureMissing, XfrmtraceError
from xfrmtrace.native import use_bundled_capstone
from xfrmtrace.output.netnslabels import DEFAULT_NETNS_LIMIT
from xfrmtrace.output.safetext import printable

if TYPE_CHECKING:  # imported when used: `--help` must not load the tracing stack
    from xfrmtrace.output.metrics import MetricsServer
    from xfrmtrace.output.pcapng import PcapngWriter

COMMANDS = ("trace", "sites", "report")
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Trace every increment of the Linux XFRM (IPsec) error counters in
/proc/net/xfrm_stat to the kernel site, network namespace and packet behind it.

commands:
  trace   (default) attach a probe at every counter site and print each increment
  sites   list the counter sites found in kernel text (live, or offline from files)
  report  summarise a saved JSON log per distinct error, with explanations and history

Run `xfrmtrace COMMAND --help` for the options of each command."""


def _parse_mark(text: str) -> tuple[int, int]:
    value_text, _, mask_text = text.partition("/")
    try:
        value = int(value_text, 0)
        mask = int(mask_text, 0) if mask_text else 0xFFFFFFFF
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid mark {text!r}: use VALUE or VALUE/MASK, "
                                         "e.g. 0xd00/0xf00") from None
    if not (0 <= value <= 0xFFFFFFFF and 0 < mask <= 0xFFFFFFFF):
        raise argparse.ArgumentTypeError(f"mark {text!r} out of range (32-bit, mask non-zero)")
    return value, mask


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


_SIZE_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20}


def _ring_size(text: str) -> int:
    """``4`` (MiB), ``64K`` or ``8M`` -> bytes, at least one page."""
    number, unit = text.rstrip("kKmM"), text[len(text.rstrip("kKmM")):].lower()
    if not number.isdigit() or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use MiB or a K/M suffix, "
                                         "e.g. 4 or 64K")
    size = int(number) * _SIZE_UNITS[unit]
    if size < 4096:
        raise argparse.ArgumentTypeError(f"size {text!r} is below one page (4K)")
    return size


def _listen_address(text: str) -> tuple[str, int]:
    from xfrmtrace.output.metrics import parse_listen_address  # deferred: start-up

    try:
        return parse_listen_address(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _fingerprint_secret(text: str) -> bytes:
    """The secret in file ``text``, read when the command line is (a usage error if bad)."""
    try:
        secret = Path(text).read_bytes().strip()
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"cannot read {printable(text)}: {err.strerror}") from None
    if len(secret) < FINGERPRINT_SECRET_MIN:
        raise argparse.ArgumentTypeError(
            f"{printable(text)} holds {len(secret)} bytes: give at least "
            f"{FINGERPRINT_SECRET_MIN} (e.g. head -c 32 /dev/urandom | base64)")
    return secret


def _host_name() -> str:
    return socket.gethostname()


def _node_name(text: str) -> str:
    """A node name as Kubernetes allows one: 1-253 printable characters, no space."""
    if not 0 < len(text) <= 253 or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError(
            f"invalid node name {printable(text)!r}: 1-253 printable characters, no spaces")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xfrmtrace", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"xfrmtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    trace = sub.add_parser("trace", help="trace counter increments (default)",
                           description="Attach a kprobe at every XFRM counter increment site and "
                           "print one line per increment; Ctrl-C prints a per-counter, per-site "
                           "summary.")
    _common_options(trace)
    out = trace.add_argument_group("output")
    out.add_argument("--output", choices=("text", "json"), default="text",
                     help="event format: text lines or one JSON object per line (default text)")
    out.add_argument("--output-stack", action="store_true",
                     help="add the kernel stack of each increment")
    out.add_argument("--no-xfrm-state", action="store_true",
                     help="do not follow SAs and policies over netlink: no SA/policy "
                     "timeline, no explanations")
    out.add_argument("--node-name", type=_node_name, default=_host_name(), metavar="NAME",
                     help="this node's name, in every JSON object (key node) so that "
                     "`xfrmtrace report` can join several nodes' logs (default: the host "
                     "name; the Helm chart passes the Kubernetes node name)")
    out.add_argument("--key-fingerprint-secret", type=_fingerprint_secret, metavar="FILE",
                     help="log a fingerprint of each SA key: HMAC-SHA-256 keyed with the "
                     f"secret in FILE (at least {FINGERPRINT_SECRET_MIN} bytes). Give every "
                     "node the same secret and `xfrmtrace report` tells a key changed on "
                     "one side only; the key itself is never logged")
    out.add_argument("--show-keys", action="store_true",
                     help="print SA keys in the SA/policy timeline (default: <redacted>)")
    out.add_argument("--output-file", type=Path, metavar="PATH",
                     help="write events and the summary to PATH instead of stdout, rotated by "
                     "size (status lines go to stderr)")
    out.add_argument("--output-file-size", type=_positive_number, default=100.0, metavar="MIB",
                     help="rotate PATH when it would grow past this many MiB (default 100)")
    out.add_argument("--output-file-count", type=_positive_int, default=5, metavar="N",
                     help="rotated files kept: PATH.1 .. PATH.N (default 5)")
    out.add_argument("--output-pcap", type=Path, metavar="FILE",
                     help="also write each traced packet to FILE (pcapng), with a comment "
                     "naming counter, site, namespace and mark")
    out.add_argument("--metrics-addr", metavar="[HOST:]PORT", type=_listen_address,
                     help="serve Prometheus metrics (exact counts per counter, function and "
                     "namespace) on http://HOST:PORT/metrics; HOST defaults to 127.0.0.1")
    out.add_argument("--metrics-netns-limit", type=_positive_int, default=DEFAULT_NETNS_LIMIT,
                     metavar="N", help="at most N namespaces get a metrics label of their own, "
                     "the rest count under netns=\"other\"; a gone namespace gives its label "
                     f"back (default {DEFAULT_NETNS_LIMIT}, 0: none)")
    filt = trace.add_argument_group("filters (counts stay exact; only events are filtered)")
    filt.add_argument("--filter-counter", metavar="NAME[,NAME]",
                      help="only these counters, e.g. XfrmInNoStates,XfrmOutNoStates")
    filt.add_argument("--filter-netns", metavar="INODE|NAME",
                      help="only this network namespace (inode, or name under /run/netns): "
                      "its events and its SA/policy/tc changes")
    filt.add_argument("--filter-mark", metavar="VALUE[/MASK]", type=_parse_mark,
                      help="only packets/flows whose mark matches, e.g. 0xd00/0xf00")
    run = trace.add_argument_group("run")
    run.add_argument("--duration", type=float, metavar="SECONDS",
                     help="stop after this many seconds (default: until Ctrl-C/SIGTERM)")
    run.add_argument("--rate-limit", type=_positive_int, default=0, metavar="N",
                     help="at most N events per site per second, over all CPUs (0: no limit); "
                     "counts stay exact")
    run.add_argument("--ringbuf-size", type=_ring_size, default=XT_RINGBUF_DEFAULT,
                     metavar="SIZE",
                     help="ring buffer size: MiB, or with a K or M suffix, e.g. 64K (default "
                     f"{XT_RINGBUF_DEFAULT >> 20}; rounded up to a power of two); counts stay "
                     "exact when it overflows")
    run.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)

    sites = sub.add_parser("sites", help="list counter increment sites",
                           description="List every instruction that increments an XFRM "
                           "counter, from the running kernel or offline from a vmlinux file "
                           "and a kallsyms file of the same build.")
    _common_options(sites)
    sites.add_argument("--output", choices=("text", "json"), default="text",
                       help="table or JSON array (default text)")
    sites.add_argument("--vmlinux", type=Path, metavar="FILE",
                       help="uncompressed vmlinux with .BTF (offline; needs --kallsyms)")
    sites.add_argument("--kallsyms", type=Path, metavar="FILE",
                       help="kallsyms of a running instance of that kernel (offline)")
    sites.add_argument("--audit", action="store_true",
                       help="list every per-CPU increment (x86-64: gs-relative; arm64: "
                            "atomic add) with how it was classified: xfrm, other, doubtful, "
                            "or unprobeable (an XFRM counter increment neither a kprobe nor a "
                            "hardware breakpoint can count exactly)")

    report = sub.add_parser("report", help="summarise saved JSON logs, across nodes",
                            description="Read logs written by `xfrmtrace --output json` (files, "
                            "directories of them, or `kubectl logs --prefix` output) and "
                            "print, per distinct error (node, counter, namespace, addresses, "
                            "SPI, mark), the first and last time, the count, the sites, the "
                            "explanation and the SA/policy changes that concern it; then, "
                            "across nodes, what the sender of each receiver-side error had "
                            "and the SAs the two sides disagree on.")
    report.add_argument("logs", type=Path, nargs="+", metavar="LOG",
                        help="a JSON log (one per node) or a directory of them")
    report.add_argument("--output", choices=("text", "json"), default="text",
                        help="text or one JSON object (default text)")
    report.add_argument("--html", type=Path, metavar="FILE",
                        help="also write a self-contained page with a timeline plot")
    report.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    return parser


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="site cache directory (default /var/cache/xfrmtrace as root)")
    parser.add_argument("--no-cache", action="store_true", help="resolve sites from scratch")
    parser.add_argument("--host-proc", type=Path, default=Path("/proc"), metavar="DIR",
                        help="the host's procfs, for kallsyms, kcore and modules (default /proc; "
                        "in a container, where /proc/kcore is masked, mount the host's /proc "
                        "e.g. at /host/proc)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens (twice: debug)")


def _with_default_command(argv: list[str]) -> list[str]:
    if argv and (argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["trace", *argv]


class _PrintableFormatter(logging.Formatter):
    """Log lines quote names from netlink and /run/netns: no control character gets through
    (output/safetext.py); a traceback (-vv) keeps its line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - base name
        return printable(super().formatMessage(record))


def main(argv: Optional[Sequence[str]] = None) -> int:
    use_bundled_capstone()  # before the resolver imports capstone (the zipapp on arm64)
    args_list = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("xfrmtrace: %(levelname)s: %(message)s"))
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        handlers=[handler])
    try:
        if args.command == "sites":
            return _cmd_sites(args, sys.stdout)
        if args.command == "report":
            return _cmd_report(args, sys.stdout)
        return _cmd_trace(args, sys.stdout)
    except XfrmtraceError as err:
        print(printable(f"xfrmtrace: error: {err}"), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - one line, never a traceback, unless asked
        if args.verbose >= 2:
            raise
        print(printable(f"xfrmtrace: internal error: {type(err).__name__}: {err} "
                        "(run with -vv for a traceback)"), file=sys.stderr)
        return EXIT_ERROR


# --- sites ---------------------------------------------------------------------------------


def _site_cache(args: argparse.Namespace):  # -> Optional[SiteCache]
    from xfrmtrace.resolve.sitecache import SiteCache, default_cache_dir  # deferred: start-up

    if args.no_cache:
        return None
    return SiteCache(args.cache_dir or default_cache_dir())


def _open_view(args: argparse.Namespace):  # -> KernelView
    from xfrmtrace.kernel import preflight  # deferred: start-up
    from xfrmtrace.kernel import view as kernel_view  # deferred: start-up

    if getattr(args, "vmlinux", None) or getattr(args, "kallsyms", None):
        if not (args.vmlinux and args.kallsyms):
            raise InputError("offline resolution needs both --vmlinux FILE and --kallsyms FILE")
        return kernel_view.open_offline(args.vmlinux, args.kallsyms)
    preflight.check_privileges()
    preflight.check_btf()
    return kernel_view.open_live(args.host_proc)


def _cmd_sites(args: argparse.Namespace, out: TextIO) -> int:
    from xfrmtrace.resolve import discovery  # deferred: start-up
    from xfrmtrace.resolve.model import argument_sources  # deferred: start-up

    view = _open_view(args)
    try:
        resolution = discovery.resolve_sites(view, cache=_site_cache(args))
        functions = {(f.object, f.function): f
                     for f in discovery.function_arguments(view, resolution.sites)}
    finally:
        view.close()
    if args.output == "json":
        if args.audit:
            records = [asdict(a) for a in resolution.audit]
        else:
            records = [asdict(s) | {"arguments": argument_sources(
                s, functions.get((s.object, s.entry_function or "")))}
                for s in resolution.sites]
        json.dump(records, out, indent=1)
        out.write("\n")
        return 0
    if args.audit:
        for a in resolution.audit:
            print(f"{a.classification:8s} {a.function}+{a.offset:#x} [{a.object}] "
                  f"{a.instruction:40s} {a.counter or '':24s} {a.reason}", file=out)
        return 0
    print(f"{'COUNTER':26s} {'SITE':48s} {'ADDRESS':18s} INSTRUCTION", file=out)
    for s in resolution.sites:
        print(f"{s.counter:26s} {s.label:48s} {s.address:#018x} {s.instruction}", file=out)
    print(f"{len(resolution.sites)} sites in {len({s.object for s in resolution.sites})} "
          "objects", file=out)
    return 0


# --- report --------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    from xfrmtrace.report import cluster  # deferred: start-up
    from xfrmtrace.report import reader as report  # deferred: start-up

    result = report.build(report.read_logs(args.logs))
    nodes = cluster.join(result)
    if args.html:
        from xfrmtrace.report.html import write_html  # deferred: start-up

        try:
            with open(args.html, "w", encoding="utf-8") as page:
                write_html(result, nodes, page)
        except OSError as err:
            raise InputError(f"cannot write {args.html}: {err.strerror}") from err
    if args.output == "json":
        json.dump({"groups": [asdict(g) | {"key": list(g.key)} for g in result.groups],
                   "changes": result.changes, "skipped_lines": result.skipped_lines,
                   "cluster": cluster.to_dict(nodes)}, out)
        out.write("\n")
    else:
        report.write_text(result, out)
        for line in cluster.text_lines(nodes):
            out.write(printable(line) + "\n")
    return 0


# --- trace ---------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGINT/SIGTERM; the poll loop checks it between polls."""

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self, signum: int, frame: object) -> None:
        self.stopped = True


def _counter_filter(text: Optional[str], counters: dict[int, str]) -> Optional[set[int]]:
    if not text:
        return None
    by_name = {name.lower(): index for index, name in counters.items()}
    wanted = set()
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name.lower() not in by_name:
            raise InputError(f"unknown counter {name!r}; this kernel has: "
                             + ", ".join(counters[i] for i in sorted(counters)))
        wanted.add(by_name[name.lower()])
    return wanted


def _cmd_trace(args: argparse.Namespace, out: TextIO) -> int:
    from xfrmtrace.kernel import preflight  # deferred: start-up

    preflight.check_tracing()
    with ExitStack() as cleanup:
        metrics = None
        if args.metrics_addr:
            from xfrmtrace.output.metrics import (  # deferred: start-up
                MetricsServer,
                require_metrics,
            )

            require_metrics()
            metrics = MetricsServer(args.metrics_addr)
            cleanup.callback(metrics.close)
        pcap = None
        if args.output_pcap:
            from xfrmtrace.output.pcapng import PcapngWriter  # deferred: start-up

            pcap = PcapngWriter(cleanup.enter_context(_open_output(args.output_pcap)))
        if args.output_file:
            from xfrmtrace.output.rotating import RotatingFile  # deferred: start-up

            rotating = RotatingFile(args.output_file, int(args.output_file_size * (1 << 20)),
                                    args.output_file_count)
            cleanup.callback(rotating.close)
            out = rotating  # type: ignore[assignment]
        # Status lines go to stdout with text output, to stderr when stdout carries JSON or
        # the events go to a file.
        status_stream = sys.stderr if args.output == "json" or args.output_file else out
        return _trace(args, out, status_stream, pcap, metrics)


def _open_output(path: Path) -> BinaryIO:
    try:
        return open(path, "wb")
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror}") from None


def _trace(args: argparse.Namespace, out: TextIO, status_stream: TextIO,
           pcap: Optional[PcapngWriter], metrics: Optional[MetricsServer]) -> int:
    # deferred: start-up (the whole tracing stack: libbpf, pyroute2, BTF)
    from xfrmtrace.kernel import view as kernel_view
    from xfrmtrace.kernel.modules import ModuleWatcher
    from xfrmtrace.output import summary as summary_out
    from xfrmtrace.resolve import discovery
    from xfrmtrace.resolve.model import UNPROBEABLE
    from xfrmtrace.session import SessionOptions, TraceSession

    options = SessionOptions(
        output=args.output, stack=args.output_stack, filter_netns=args.filter_netns,
        filter_mark=args.filter_mark, rate_limit=args.rate_limit, ringbuf_bytes=args.ringbuf_size,
        ready_file=args.ready_file, follow_xfrm=not args.no_xfrm_state,
        keys=KeyPolicy(show=args.show_keys, fingerprint_secret=args.key_fingerprint_secret),
        node_name=args.node_name, metrics_netns_limit=args.metrics_netns_limit,
        host_proc=args.host_proc)

    def status(line: str) -> None:
        print(printable(line), file=status_stream, flush=True)  # names in it: safetext

    stop = _StopFlag()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    # Read /proc/modules before kallsyms: a module loading in between is then seen as new
    # (and found already attached) rather than missed.
    modules = ModuleWatcher(args.host_proc / "modules")
    view = kernel_view.open_live(args.host_proc)
    try:
        cache = _site_cache(args)
        resolution = discovery.resolve_sites(view, cache=cache)
        if not resolution.sites:
            raise KernelFeatureMissing(
                "no XFRM counter increment sites found in kernel text: run `xfrmtrace sites "
                "--audit` to see why (another tracer's kprobes on them hide them from a first "
                "scan: start xfrmtrace before it, or keep its --cache-dir)")
        for entry in resolution.audit:
            if entry.classification == UNPROBEABLE:
                status(f"warning: cannot count {entry.counter} at {entry.function}+"
                       f"{entry.offset:#x}: {entry.reason}")
        session = TraceSession(view, resolution.sites, options, out, status, modules, cache,
                               pcap=pcap, metrics=metrics)
        deadline = time.monotonic() + args.duration if args.duration else None
        summary = session.run(stop, deadline,
                              _counter_filter(args.filter_counter, view.model.counters))
        netns_names = session.netns_names
    finally:
        view.close()
    if args.output == "json":
        out.write(summary_out.format_json(summary, netns_names, args.node_name) + "\n")
    else:
        out.write(summary_out.format_text(summary, netns_names))
    out.flush()
    if pcap is not None:
        status(f"Wrote {pcap.packets} packets to {args.output_pcap}")
    return 0
