"""Across nodes: each receiver-side error joined with what its sender had.

On a Kubernetes IPsec node (Cilium, Calico) the cause of an inbound drop usually sits on the
other node: the receiver counts XfrmInNoStates because the sender uses an SPI the receiver
deleted or never installed (a reboot, a key rotation that removed the old inbound SA too
early, an agent restart), XfrmInStateProtoError when a key changed on one side only.  Given
every node's log, this module:

* finds which **endpoint** owns an address: a node's network namespace that holds SAs
  (one per node in the usual case; several when namespaces on one machine play nodes).
  An endpoint owns the source of its outbound SAs and policy templates, the destination of
  its inbound ones, and the destination of the packets it drops as receiver;
* for each receiver-side error (:data:`RECEIVER_COUNTERS`) looks up the sender by the
  packet's outer source address and says what the sender had (the outbound SA with that
  destination and SPI, since when) and what the receiver had (never installed, deleted at
  T, replaced by SPI Y);
* flags, per node pair: an SPI the sender uses that the receiver has no SA for; the same
  (destination, SPI) with different algorithms, key lengths or ICV lengths on the two sides;
  the same algorithms with different keys, by the keyed fingerprints the tracers logged
  with a shared ``--key-fingerprint-secret`` (keys are never in a log); a sender whose last
  sequence number is behind the receiver's replay window.

Everything comes from the logs: the SAs each tool found at start (``present``) and every
change after, with the times the tools wrote (node clocks are assumed to be in step, as
NTP keeps them; a difference of seconds can reorder events of two nodes, never of one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from xfrmtrace.report.reader import ErrorGroup, Report

RECEIVER_COUNTERS = ("XfrmInNoStates", "XfrmInStateProtoError", "XfrmInStateSeqError",
                     "XfrmInTmplMismatch")
_INSTALLS = ("present", "added", "updated")


@dataclass(frozen=True)
class Endpoint:
    """One node's network namespace that holds SAs."""

    node: str
    netns: int
    netns_name: Optional[str] = None

    def label(self, alone: bool) -> str:
        """The node's name, with the namespace when the node has several endpoints."""
        if alone:
            return self.node
        return f"{self.node}/{self.netns_name or self.netns}"


@dataclass
class SAState:
    """What one endpoint's log says of one SA (destination, SPI, protocol)."""

    sa: dict[str, Any]
    installed: str  # time of the first present/added of this run of it
    removed: Optional[str] = None  # time it was deleted (or expired hard), if it was
    updated: Optional[str] = None
    restarted: bool = False  # "removed" is when a later dump no longer listed it


@dataclass
class EndpointLog:
    endpoint: Endpoint
    first_time: str  # the log's first record: "never installed" means "not since then"
    sas: dict[tuple, list[SAState]] = field(default_factory=dict)  # key -> runs, oldest first
    addresses: dict[str, int] = field(default_factory=dict)  # owned address -> evidence rank
    dump_time: Optional[str] = None  # time of the last dump seen (one time per dump)
    dump: Optional[tuple[str, set[tuple]]] = None  # a later dump: its time, the SAs it listed

    def runs(self, dst: Optional[str], spi: Optional[int]) -> list[SAState]:
        return [run for (d, s, _p), runs in self.sas.items() if d == dst and s == spi
                for run in runs]

    def live_at(self, dst: Optional[str], spi: Optional[int], time: str) -> Optional[SAState]:
        """The SA with that destination and SPI as it was at ``time``, if it existed."""
        for run in self.runs(dst, spi):
            if run.installed <= time and (run.removed is None or run.removed > time):
                return run
        return None

    def current(self) -> list[SAState]:
        """SAs still installed at the end of the log."""
        return [runs[-1] for runs in self.sas.values() if runs and runs[-1].removed is None]


@dataclass
class Finding:
    """One receiver-side error stream, joined with its sender."""

    group: ErrorGroup
    receiver: str
    sender: Optional[str]  # None: no log owns the packet's source address
    sender_sa: Optional[dict[str, Any]] = None  # spi, dst, mark, installed, state
    receiver_sa: dict[str, Any] = field(default_factory=dict)  # status, at, replaced_by
    summary: str = ""


@dataclass
class Flag:
    sender: str
    receiver: str
    kind: str  # "no-inbound-sa", "algorithms-differ", "key-differs", "sequence-behind"
    spi: int
    dst: Optional[str]
    text: str


@dataclass
class ClusterReport:
    endpoints: list[str]
    findings: list[Finding]
    flags: list[Flag]

    @property
    def joined(self) -> bool:
        """Whether any error found its sender, or any pair disagrees: one node's log alone
        has nothing to join, and the text and HTML reports then leave the section out."""
        return bool(self.flags) or any(f.sender is not None for f in self.findings)

    def pairs(self) -> list[tuple[str, str]]:
        """(sender, receiver) with something to say, in order of appearance."""
        seen: dict[tuple[str, str], None] = {}
        for f in self.findings:
            seen[(f.sender or "?", f.receiver)] = None
        for flag in self.flags:
            seen[(flag.sender, flag.receiver)] = None
        return list(seen)


# --- reading the logs ----------------------------------------------------------------------

def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_removal(change: dict[str, Any]) -> bool:
    action = change.get("action")
    return action == "deleted" or (action == "expired" and change.get("hard") is True)


def _claim(log: EndpointLog, address: Optional[str], rank: int) -> None:
    """``address`` belongs to this endpoint; lower ``rank`` is stronger evidence."""
    if address:
        log.addresses[address] = min(rank, log.addresses.get(address, rank))


# Evidence of who owns an address, strongest first.
_BY_SA_DIRECTION, _BY_POLICY, _BY_TRAFFIC = 0, 1, 2


def _learn_policy(log: EndpointLog, policy: dict[str, Any]) -> None:
    direction = policy.get("direction")
    for tmpl in policy.get("templates") or []:
        if not isinstance(tmpl, dict):
            continue
        if direction == "out":
            _claim(log, _text(tmpl.get("src")), _BY_POLICY)
        elif direction in ("in", "fwd"):
            _claim(log, _text(tmpl.get("dst")), _BY_POLICY)


def _learn_sa(log: EndpointLog, change: dict[str, Any], sa: dict[str, Any]) -> None:
    key = (_text(sa.get("dst")), _int(sa.get("spi")), _text(sa.get("proto")))
    runs = log.sas.setdefault(key, [])
    time = str(change.get("time"))
    action = change.get("action")
    if action in _INSTALLS:
        if runs and runs[-1].removed is None:
            runs[-1].sa = sa
            runs[-1].updated = time
        else:
            runs.append(SAState(sa=sa, installed=time))
    elif _is_removal(change) and runs and runs[-1].removed is None:
        runs[-1].removed = time
    if sa.get("direction") == "out":
        _claim(log, _text(sa.get("src")), _BY_SA_DIRECTION)
    elif sa.get("direction") == "in":
        _claim(log, _text(sa.get("dst")), _BY_SA_DIRECTION)


def _flush(log: EndpointLog, change: dict[str, Any]) -> None:
    proto = change.get("flushed_proto")
    for (_dst, _spi, sa_proto), runs in log.sas.items():
        if runs and runs[-1].removed is None and proto in (None, sa_proto):
            runs[-1].removed = str(change.get("time"))


def _end_dump(log: EndpointLog) -> None:
    """A dump after earlier records (the tool restarted, or resynchronised after lost
    notifications) is the whole SAD: SAs it did not list were removed by then."""
    if log.dump is None:
        return
    time, listed = log.dump
    for key, runs in log.sas.items():
        if key not in listed and runs and runs[-1].removed is None:
            runs[-1].removed, runs[-1].restarted = time, True
    log.dump = None


def endpoint_logs(report: Report) -> dict[tuple[str, int], EndpointLog]:
    """Per (node, netns): its SA runs and the addresses it owns, from the well-formed SA and
    policy records the report kept (in log order) and its error streams."""
    logs: dict[tuple[str, int], EndpointLog] = {}

    def log_of(node: str, netns: int, name: Optional[str]) -> EndpointLog:
        if (node, netns) not in logs:
            logs[(node, netns)] = EndpointLog(Endpoint(node, netns, name),
                                              first_time=report.first_times.get(node, ""))
        return logs[(node, netns)]

    # In time order (stable: one tool writes in order), so logs given in any order, such as a
    # node's logs from before and after its reboot, read as one timeline.
    for record in sorted(report.change_records, key=lambda r: str(r.get("time"))):
        log = log_of(str(record.get("node")), _int(record.get("netns")) or 0,
                     _text(record.get("netns_name")))
        present, time = record.get("action") == "present", str(record.get("time"))
        if present and time != log.dump_time:  # a new dump: its records share one time
            _end_dump(log)
            if log.sas:
                log.dump = (time, set())
            log.dump_time = time
        elif not present:
            _end_dump(log)
        if record.get("type") == "sa":
            sa = record.get("sa")
            if isinstance(sa, dict):
                if present and log.dump is not None:
                    log.dump[1].add((_text(sa.get("dst")), _int(sa.get("spi")),
                                     _text(sa.get("proto"))))
                _learn_sa(log, record, sa)
            elif record.get("action") == "flushed":
                _flush(log, record)
        elif isinstance(record.get("policy"), dict):
            _learn_policy(log, record["policy"])
    for log in logs.values():
        _end_dump(log)
    for group in report.groups:
        log = log_of(group.node, group.netns, group.netns_name)
        if group.counter in RECEIVER_COUNTERS:
            _claim(log, group.dst, _BY_TRAFFIC)
        elif group.counter.startswith("XfrmOut"):
            _claim(log, group.src, _BY_TRAFFIC)
    return logs


def owners(logs: dict[tuple[str, int], EndpointLog]) -> dict[str, EndpointLog]:
    """Address -> the endpoint with the strongest evidence of owning it."""
    best: dict[str, tuple[int, EndpointLog]] = {}
    for log in logs.values():
        for address, rank in log.addresses.items():
            if address not in best or rank < best[address][0]:
                best[address] = (rank, log)
    return {address: log for address, (_rank, log) in best.items()}


# --- joining -------------------------------------------------------------------------------

def _sa_brief(run: SAState) -> dict[str, Any]:
    sa = run.sa
    return {"spi": sa.get("spi"), "src": sa.get("src"), "dst": sa.get("dst"),
            "proto": sa.get("proto"), "mark": sa.get("mark"), "mark_mask": sa.get("mark_mask"),
            "installed": run.installed, "removed": run.removed}


def _receiver_side(log: EndpointLog, group: ErrorGroup, src: Optional[str]) -> dict[str, Any]:
    """What the receiver had for the packet's (destination, SPI) when the errors began."""
    live = log.live_at(group.dst, group.spi, group.first)
    if live is not None:
        return {"status": "present", "at": live.installed}
    runs = [r for r in log.runs(group.dst, group.spi) if r.removed and r.removed <= group.first]
    if not runs:
        return {"status": "never", "since": log.first_time}
    removed = str(runs[-1].removed)
    side: dict[str, Any] = {"status": "deleted", "at": removed}
    if runs[-1].restarted:
        side["status"] = "gone-at-restart"
    # What it has instead: an SA between the same addresses, live when the errors began
    # (a rotation installs the new one before it deletes the old).
    instead = sorted(
        (run.installed, _int(run.sa.get("spi"))) for runs_ in log.sas.values() for run in runs_
        if _text(run.sa.get("dst")) == group.dst and _text(run.sa.get("src")) == src
        and _int(run.sa.get("spi")) != group.spi and run.installed <= group.first
        and (run.removed is None or run.removed > group.first))
    if instead:
        side.update(status="replaced", replaced_at=instead[-1][0], replaced_by=instead[-1][1])
    return side


def _summary(finding: Finding) -> str:
    group, side = finding.group, finding.receiver_sa
    spi = f"{group.spi:#x}" if group.spi is not None else "?"
    if finding.sender is None:
        return (f"no log has the sender of {group.src or '?'}: add that node's log to "
                "join it")
    sender = finding.sender_sa
    if sender is None:
        told = f"{finding.sender} had no outbound SA spi {spi} to {group.dst} in its log"
    else:
        told = (f"{finding.sender} sends with its outbound SA spi {spi} to {group.dst}, "
                f"installed {sender['installed']}")
        if sender.get("removed"):
            told += f", removed {sender['removed']}"
    status = side.get("status")
    if status == "never":
        have = (f"{finding.receiver} never had an inbound SA spi {spi} (its log starts "
                f"{side['since']})")
    elif status == "deleted":
        have = f"{finding.receiver} deleted its inbound SA spi {spi} at {side['at']}"
    elif status == "gone-at-restart":
        have = (f"{finding.receiver}'s inbound SA spi {spi} was gone when its tracer started "
                f"again at {side['at']} (node reboot or restart)")
    elif status == "replaced":
        have = (f"{finding.receiver} deleted its inbound SA spi {spi} at {side['at']} and "
                f"has spi {side['replaced_by']:#x} (installed {side['replaced_at']}) instead, "
                f"which {finding.sender} does not send with yet")
    else:
        have = (f"{finding.receiver} has the inbound SA spi {spi} (since {side.get('at')}): "
                "it does not accept these packets")
    return f"{told}; {have}"


def _algorithms(sa: dict[str, Any]) -> list[tuple]:
    return sorted((a.get("kind"), a.get("name"), a.get("key_bits"), a.get("icv_bits"))
                  for a in sa.get("algorithms") or [] if isinstance(a, dict))


def _fingerprints(sa: dict[str, Any]) -> list[Optional[str]]:
    """Key fingerprints in algorithm order (None where a tracer had no secret)."""
    return [a.get("key_fingerprint") if isinstance(a.get("key_fingerprint"), str) else None
            for a in sorted((a for a in sa.get("algorithms") or [] if isinstance(a, dict)),
                            key=lambda a: str(a.get("kind")))]


def _describe_algorithms(sa: dict[str, Any]) -> str:
    return ", ".join(f"{k} {n} {bits}-bit" + (f"/{icv}" if icv else "")
                     for k, n, bits, icv in _algorithms(sa)) or "none"


def _pair_flags(sender: EndpointLog, receiver: EndpointLog, names: dict[int, str]) -> list[Flag]:
    flags = []
    s_label, r_label = names[id(sender)], names[id(receiver)]
    for run in sender.current():
        sa = run.sa
        dst, spi = _text(sa.get("dst")), _int(sa.get("spi"))
        if spi is None or dst not in receiver.addresses or sa.get("direction") == "in":
            continue
        if _text(sa.get("src")) not in sender.addresses:
            continue  # not an SA this endpoint sends with
        theirs = next((r for r in reversed(receiver.runs(dst, spi)) if r.removed is None), None)
        if theirs is None:
            flags.append(Flag(s_label, r_label, "no-inbound-sa", spi, dst,
                              f"{s_label} sends with spi {spi:#x} to {dst} (since "
                              f"{run.installed}); {r_label} has no inbound SA for it"))
            continue
        if _algorithms(sa) != _algorithms(theirs.sa):
            flags.append(Flag(s_label, r_label, "algorithms-differ", spi, dst,
                              f"spi {spi:#x} to {dst}: {s_label} has "
                              f"{_describe_algorithms(sa)}, {r_label} has "
                              f"{_describe_algorithms(theirs.sa)}"))
        elif _fingerprints(sa) != _fingerprints(theirs.sa) and None not in (
                _fingerprints(sa) + _fingerprints(theirs.sa)):
            flags.append(Flag(s_label, r_label, "key-differs", spi, dst,
                              f"spi {spi:#x} to {dst}: the same algorithms, but the key "
                              f"fingerprints differ between {s_label} and {r_label}: a key "
                              "changed on one side only (the receiver fails to authenticate)"))
        oseq, seq = _int(sa.get("oseq")) or 0, _int(theirs.sa.get("seq")) or 0
        window = _int(theirs.sa.get("replay_window")) or 0
        if oseq and seq and seq - oseq > window:
            flags.append(Flag(s_label, r_label, "sequence-behind", spi, dst,
                              f"spi {spi:#x} to {dst}: {s_label} last sent seq {oseq}, "
                              f"{r_label} has seen {seq} (replay window {window}): its "
                              "packets are replays to the receiver"))
    return flags


def join(report: Report) -> ClusterReport:
    """The cross-node view of a report built from several nodes' logs."""
    logs = endpoint_logs(report)
    per_node: dict[str, int] = {}
    for node, _netns in logs:
        per_node[node] = per_node.get(node, 0) + 1
    names = {id(log): log.endpoint.label(per_node[log.endpoint.node] == 1)
             for log in logs.values()}
    owner = owners(logs)
    findings = []
    for group in report.groups:
        receiver = logs[(group.node, group.netns)]
        if group.counter not in RECEIVER_COUNTERS:
            continue
        src = group.src
        sender = owner.get(src) if src else None
        if sender is receiver:
            sender = None
        finding = Finding(group, receiver=names[id(receiver)],
                          sender=names[id(sender)] if sender else None)
        if sender is not None:
            run = sender.live_at(group.dst, group.spi, group.last) or next(
                iter(reversed(sender.runs(group.dst, group.spi))), None)
            finding.sender_sa = _sa_brief(run) if run is not None else None
        finding.receiver_sa = _receiver_side(receiver, group, src)
        finding.summary = _summary(finding)
        findings.append(finding)
    flags = []
    ordered = list(logs.values())
    for sender in ordered:
        for receiver in ordered:
            if sender is not receiver:
                flags += _pair_flags(sender, receiver, names)
    return ClusterReport(endpoints=[names[id(log)] for log in ordered if log.sas],
                         findings=findings, flags=flags)


# --- output --------------------------------------------------------------------------------

def to_dict(report: ClusterReport) -> dict[str, Any]:
    return {
        "endpoints": report.endpoints,
        "pairs": [{
            "sender": sender, "receiver": receiver,
            "errors": [{"counter": f.group.counter, "count": f.group.count,
                        "stream": f.group.stream, "first": f.group.first, "last": f.group.last,
                        "sender_sa": f.sender_sa, "receiver_sa": f.receiver_sa,
                        "summary": f.summary}
                       for f in report.findings if (f.sender or "?", f.receiver)
                       == (sender, receiver)],
            "flags": [{"kind": x.kind, "spi": x.spi, "dst": x.dst, "text": x.text}
                      for x in report.flags if (x.sender, x.receiver) == (sender, receiver)],
        } for sender, receiver in report.pairs()],
    }


def text_lines(report: ClusterReport) -> list[str]:
    """The cross-node section of the text report (empty when there is nothing to join)."""
    if not report.joined:
        return []
    lines = [f"Across nodes ({len(report.endpoints)} endpoints with SAs: "
             f"{', '.join(report.endpoints)})"]
    for pair in to_dict(report)["pairs"]:
        lines.append(f"  {pair['sender']} -> {pair['receiver']}")
        for error in pair["errors"]:
            lines.append(f"    {error['counter']} x{error['count']}  {error['stream']}  "
                         f"first {error['first']}")
            lines.append(f"      {error['summary']}")
        for flag in pair["flags"]:
            lines.append(f"    flag {flag['kind']}: {flag['text']}")
    return lines
