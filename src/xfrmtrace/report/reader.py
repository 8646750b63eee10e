"""``xfrmtrace report LOG.jsonl ...``: saved JSON logs, summarised per distinct error.

A distinct error is one counter for one packet stream: node, namespace, counter, addresses,
IPsec protocol and SPI, and mark.  For each the report gives the first and last time, the
count, the sites, the explanation the live run printed (the last one), and the SA/policy
changes of that node's namespace that concern it.  :mod:`.cluster` joins the nodes.

Logs are files or directories of them, as the tool writes them or as ``kubectl logs
--prefix`` (and ``--timestamps``) prints them: ``[pod/xfrmtrace-x7k2p/xfrmtrace] {...}``.
Each object names its node (``--node-name``); one that does not (a log of an older version)
gets the pod's name from the prefix, or else the file's name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, TextIO, Union

from xfrmtrace.errors import InputError
from xfrmtrace.output.safetext import printable
from xfrmtrace.output.timefmt import parse_rfc3339

HISTORY_LINES = 10


@dataclass
class ErrorGroup:
    key: tuple
    node: str
    counter: str
    netns: int
    netns_name: Optional[str]
    stream: str  # "10.77.0.1 > 10.77.0.2 esp spi 0x1000 mark 0xd00"
    src: Optional[str]
    dst: Optional[str]
    spi: Optional[int]
    first: str
    last: str
    count: int = 0
    sites: dict[str, int] = field(default_factory=dict)
    explain: Optional[dict[str, Any]] = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    groups: list[ErrorGroup]
    changes: int
    skipped_lines: int
    event_times: list[tuple[str, str]] = field(default_factory=list)  # (counter, time)
    change_records: list[dict[str, Any]] = field(default_factory=list)
    first_times: dict[str, str] = field(default_factory=dict)  # node -> its first record


# kubectl logs --prefix: "[pod/NAME/CONTAINER] "; --timestamps: "2026-12-07T10:00:00.1Z ".
_KUBECTL_PREFIX = re.compile(r"^(?:\[(?:pod/)?(?P<pod>[^/\]]+)[^\]]*\] )?(?:\S+Z )?(?=\{)")


def log_files(paths: Iterable[Union[str, Path]]) -> list[Path]:
    """The files named, and the regular files directly inside directories named (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            try:
                found = sorted(p for p in path.iterdir() if p.is_file())
            except OSError as err:
                raise InputError(f"cannot read {path}: {err.strerror}") from err
            if not found:
                raise InputError(f"no log files in {path}")
            files += found
        else:
            files.append(path)
    return files


def read_log(path: Union[str, Path]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a log, each with its node; a line that is not one is counted by
    :func:`build`."""
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from err
    with handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            prefix = _KUBECTL_PREFIX.match(line)
            if prefix is not None:
                line = line[prefix.end():]
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                yield {"type": None}
                continue
            if not isinstance(record, dict):
                yield {"type": None}
                continue
            if not isinstance(record.get("node"), str) or not record["node"]:
                pod = prefix.group("pod") if prefix is not None else None
                record["node"] = pod or Path(path).name.split(".")[0]
            yield record


def read_logs(paths: Iterable[Union[str, Path]]) -> Iterator[dict[str, Any]]:
    """Every log's objects, one log after the other."""
    for path in log_files(paths):
        yield from read_log(path)


_TEXT = (str, type(None))
_INT = (int, type(None))
# The fields the report reads, with the types the tool writes them with.
_EVENT_TYPES = {"netns": _INT, "counter": str, "netns_name": _TEXT, "src": _TEXT,
                "dst": _TEXT, "encap": _TEXT, "proto": _TEXT, "spi": _INT, "mark": _INT,
                "function": _TEXT, "offset": _INT, "explain": (dict, type(None))}
_CHANGE_TYPES = {"netns": _INT, "sa": (dict, type(None)), "policy": (dict, type(None))}


def _is_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parse_rfc3339(value)
    except ValueError:
        return False
    return True


def _has_types(record: dict[str, Any], types: dict[str, Any]) -> bool:
    return all(isinstance(record.get(key), kinds) for key, kinds in types.items())


def _well_formed(record: dict[str, Any], kind: str) -> bool:
    """True when every field the report reads has the type xfrmtrace writes it with, so a
    line that only looks like ours is skipped (and counted) instead of failing the report."""
    if not _is_time(record.get("time")):
        return False
    if kind == "xfrm_error":
        explain = record.get("explain") or {}
        details = explain.get("details") if isinstance(explain, dict) else None
        return (_has_types(record, _EVENT_TYPES) and isinstance(explain.get("summary"), _TEXT)
                and isinstance(details, (list, type(None)))
                and all(isinstance(d, str) for d in details or ()))
    sa, policy = record.get("sa") or {}, record.get("policy") or {}
    selector = policy.get("selector") if isinstance(policy, dict) else None
    return (_has_types(record, _CHANGE_TYPES)
            and _has_types(sa, {"spi": _INT, "dst": _TEXT})
            and isinstance(selector, (dict, type(None)))
            and _has_types(selector or {}, {"dst": _TEXT}))


def _stream(event: dict[str, Any]) -> str:
    parts = [f"{event.get('src') or '?'} > {event.get('dst') or '?'}"]
    if event.get("encap"):
        parts.append(str(event["encap"]))
    elif event.get("proto"):
        parts.append(str(event["proto"]))
    if event.get("spi") is not None:
        parts.append(f"spi {event['spi']:#x}")
    if event.get("mark"):
        parts.append(f"mark {event['mark']:#x}")
    if event.get("context") == "flow":
        parts.append("(flow)")
    return " ".join(parts)


def _concerns(change: dict[str, Any], group: ErrorGroup) -> bool:
    sa = change.get("sa")
    if sa:
        return sa.get("dst") == group.dst or (group.spi is not None and sa.get("spi") == group.spi)
    policy = change.get("policy")
    if policy:
        selector = policy.get("selector") or {}
        return group.dst is not None and (selector.get("dst") or "").split("/")[0] == group.dst
    return change.get("action") == "flushed"


def build(records: Iterable[dict[str, Any]]) -> Report:
    groups: dict[tuple, ErrorGroup] = {}
    changes: list[dict[str, Any]] = []
    times: list[tuple[str, str]] = []
    first_times: dict[str, str] = {}
    skipped = 0
    for record in records:
        kind = record.get("type")
        if _is_time(record.get("time")):
            first_times.setdefault(str(record.get("node")), record["time"])
        if kind in ("sa", "policy", "xfrm_error") and not _well_formed(record, kind):
            skipped += 1
        elif kind in ("sa", "policy"):
            changes.append(record)
        elif kind == "xfrm_error":
            key = (record.get("node"), record.get("netns"), record.get("counter"),
                   record.get("src"), record.get("dst"),
                   record.get("encap") or record.get("proto"), record.get("spi"),
                   record.get("mark"))
            group = groups.get(key)
            if group is None:
                group = groups[key] = ErrorGroup(
                    key=key, node=str(record.get("node")), counter=str(record.get("counter")),
                    netns=record.get("netns") or 0,
                    netns_name=record.get("netns_name"), stream=_stream(record),
                    src=record.get("src"), dst=record.get("dst"), spi=record.get("spi"),
                    first=str(record.get("time")), last=str(record.get("time")))
            group.count += 1
            group.last = str(record.get("time"))
            times.append((group.counter, group.last))
            site = f"{record.get('function')}+{record.get('offset') or 0:#x}"
            group.sites[site] = group.sites.get(site, 0) + 1
            if record.get("explain"):
                group.explain = record["explain"]
        elif kind not in ("summary", "tc"):  # tc changes are not part of the report
            skipped += 1
    for group in groups.values():
        related = [c for c in changes if c.get("node") == group.node
                   and c.get("netns") == group.netns
                   and str(c.get("time")) <= group.last and _concerns(c, group)]
        group.history = related[-HISTORY_LINES:]
    ordered = sorted(groups.values(), key=lambda g: (-g.count, g.first))
    return Report(groups=ordered, changes=len(changes), skipped_lines=skipped,
                  event_times=times, change_records=changes, first_times=first_times)


def _change_line(change: dict[str, Any]) -> str:
    what = "SA" if change.get("type") == "sa" else "policy"
    sa, policy = change.get("sa"), change.get("policy")
    if sa:
        body = (f"{sa.get('proto')} spi {sa.get('spi') or 0:#x} {sa.get('src')} -> "
                f"{sa.get('dst')} reqid {sa.get('reqid')}")
    elif policy:
        sel = policy.get("selector") or {}
        body = (f"{policy.get('direction')} {sel.get('src') or 'any'} -> "
                f"{sel.get('dst') or 'any'} {policy.get('action')} index {policy.get('index')}")
    else:
        body = ""
    return f"{change.get('time')} {what} {change.get('action')}: {body}".rstrip(": ")


def write_text(report: Report, out: TextIO) -> None:
    """The report as text.  Every string in it comes from a log file, whoever wrote it: each
    line goes through :func:`~xfrmtrace.output.safetext.printable`."""
    def line(text: str) -> None:
        out.write(printable(text) + "\n")

    if not report.groups:
        line(f"no counter events in the log ({report.changes} SA/policy changes)")
    for group in report.groups:
        netns = f"netns {group.netns}" + (f" ({group.netns_name})" if group.netns_name else "")
        line(f"{group.counter} x{group.count}  {group.node}  {netns}  {group.stream}")
        line(f"  first {group.first}  last {group.last}")
        line("  sites: " + ", ".join(f"{s} ({n})" for s, n in group.sites.items()))
        if group.explain:
            line(f"  why: {group.explain.get('summary')}")
            for detail in group.explain.get("details") or []:
                line(f"       {detail}")
        else:
            line("  why: (the log has no explanation: traced with --no-xfrm-state)")
        if group.history:
            line("  history:")
            for change in group.history:
                line(f"    {_change_line(change)}")
        line("")
    if report.skipped_lines:
        line(f"({report.skipped_lines} lines of the log were not xfrmtrace JSON and were "
             "skipped)")
