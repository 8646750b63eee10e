"""`xfrmtrace report` over several nodes' logs: receiver-side errors joined with the sender.

The logs are written by the tool's own formatters (JSON lines with --node-name), one per
node, for the cases operators of Kubernetes IPsec meet: a peer that rebooted, a key rotation
that removed the old inbound SA too early, an SA replaced under the sender, a key length that
differs between the two sides, a sender behind the receiver's replay window.  Each file is
read as written, as `kubectl logs --prefix` prints it, and as a directory.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from xfrmtrace.context.xfrmnl.changes import XfrmChange
from xfrmtrace.context.xfrmnl.model import SA, Algorithm, Policy, Selector, Template
from xfrmtrace.decode.events import XfrmErrorEvent
from xfrmtrace.output import changes as changes_out
from xfrmtrace.output import jsonl
from xfrmtrace.report import cluster, reader

HOST_NETNS = 4026531840  # the same inode on every node: nodes are told apart by name
A, B = "10.0.0.1", "10.0.0.2"
T0 = 1_796_000_000_000_000_000
SECOND = 1_000_000_000
AEAD = (Algorithm("aead", "rfc4106(gcm(aes))", 160, 128),)


class NodeLog:
    """One node's JSON log, written line by line as the tool writes it."""

    def __init__(self, node: str, address: str, peer: str) -> None:
        self.node, self.address, self.peer = node, address, peer
        self.lines: list[str] = []

    def _change(self, kind: str, action: str, at: int, **fields: Any) -> None:
        change = XfrmChange(kind=kind, action=action, netns=HOST_NETNS, monotonic_ns=at,
                            time_ns=T0 + at * SECOND, **fields)
        self.lines.append(changes_out.format_change_json(change, node=self.node))

    def policies(self, at: int) -> None:
        """Cilium-like: out to the peer and in from it, each with one ESP template."""
        for direction, src, dst in (("out", self.address, self.peer),
                                    ("in", self.peer, self.address)):
            tmpl = Template(src=src, dst=dst, spi=0, proto="esp", mode="tunnel", reqid=1,
                            optional=False)
            self._change("policy", "present", at, policy=Policy(
                selector=Selector(src="0.0.0.0/0", dst="0.0.0.0/0"), direction=direction,
                action="allow", priority=0, index=8 if direction == "out" else 16,
                templates=(tmpl,)))

    def sa(self, action: str, at: int, spi: int, src: str, dst: str,
           algorithms: tuple[Algorithm, ...] = AEAD, **fields: Any) -> None:
        self._change("sa", action, at, sa=SA(src=src, dst=dst, spi=spi, proto="esp",
                                             mode="tunnel", reqid=1,
                                             family=socket.AF_INET, algorithms=algorithms,
                                             replay_window=32, **fields))

    def error(self, at: int, counter: str, spi: int, src: str, dst: str, n: int = 1) -> None:
        for i in range(n):
            event = XfrmErrorEvent(counter=counter, netns=HOST_NETNS, context="skb",
                                   family="ipv4", src=src, dst=dst, proto="esp", encap="esp",
                                   spi=spi, seq=i + 1, function="xfrm_input", offset=0x569,
                                   monotonic_ns=at, time_ns=T0 + (at + i) * SECOND)
            self.lines.append(jsonl.format_event(event, node=self.node))

    def write(self, directory: Path, prefix: Optional[str] = None,
              name: Optional[str] = None) -> Path:
        path = directory / f"{name or self.node}.jsonl"
        lines = [f"[pod/{prefix}/xfrmtrace] {line}" for line in self.lines] if prefix \
            else self.lines
        path.write_text("\n".join(lines) + "\n")
        return path


def nodes() -> tuple[NodeLog, NodeLog]:
    a, b = NodeLog("node-a", A, B), NodeLog("node-b", B, A)
    for log in (a, b):
        log.policies(0)
    return a, b


def joined(*logs: NodeLog, tmp_path: Path) -> cluster.ClusterReport:
    paths = [log.write(tmp_path) for log in logs]
    return cluster.join(reader.build(reader.read_logs(paths)))


def only(report: cluster.ClusterReport) -> cluster.Finding:
    (finding,) = report.findings
    return finding


def test_peer_reboot_names_the_senders_sa_and_a_receiver_that_never_had_it(
        tmp_path: Path) -> None:
    a, b = nodes()
    a.sa("present", 0, 0x1000, A, B)  # node-a's outbound SA to node-b, from before
    a.sa("present", 0, 0x2000, B, A)
    # node-b rebooted: its log starts empty but for a new outbound SA its agent installed.
    b.sa("added", 5, 0x3000, B, A)
    b.error(10, "XfrmInNoStates", 0x1000, A, B, n=3)
    report = joined(a, b, tmp_path=tmp_path)
    finding = only(report)
    assert (finding.sender, finding.receiver) == ("node-a", "node-b")
    assert finding.sender_sa is not None and finding.sender_sa["spi"] == 0x1000
    assert finding.sender_sa["installed"].startswith("2026-") and not finding.sender_sa["removed"]
    assert finding.receiver_sa["status"] == "never"
    assert "node-a sends with its outbound SA spi 0x1000 to 10.0.0.2" in finding.summary
    assert "node-b never had an inbound SA spi 0x1000" in finding.summary
    kinds = {(f.sender, f.receiver, f.kind, f.spi) for f in report.flags}
    assert ("node-a", "node-b", "no-inbound-sa", 0x1000) in kinds
    # node-b's new SA 0x3000 to node-a: node-a never installed it either.
    assert ("node-b", "node-a", "no-inbound-sa", 0x3000) in kinds


def test_rotation_that_removed_the_old_inbound_sa_too_early(tmp_path: Path) -> None:
    a, b = nodes()
    a.sa("present", 0, 0x1000, A, B)
    b.sa("present", 0, 0x1000, A, B)
    b.sa("added", 10, 0x1001, A, B)   # node-b installs the new inbound SA ...
    b.sa("deleted", 12, 0x1000, A, B)  # ... and drops the old one at once
    b.error(15, "XfrmInNoStates", 0x1000, A, B, n=2)  # node-a still sends with the old
    a.sa("added", 30, 0x1001, A, B)   # node-a switches later
    a.sa("deleted", 31, 0x1000, A, B)
    finding = only(joined(a, b, tmp_path=tmp_path))
    side = finding.receiver_sa
    assert side["status"] == "replaced" and side["replaced_by"] == 0x1001
    assert side["at"] < finding.group.first
    assert finding.sender_sa is not None and finding.sender_sa["spi"] == 0x1000
    assert finding.sender_sa["removed"] > finding.group.last  # still in use at the errors
    assert "node-b deleted its inbound SA spi 0x1000 at" in finding.summary
    assert "and has spi 0x1001 (installed" in finding.summary


def test_sa_replaced_under_the_sender(tmp_path: Path) -> None:
    a, b = nodes()
    a.sa("present", 0, 0x1000, A, B)
    b.sa("present", 0, 0x1000, A, B)
    a.sa("deleted", 20, 0x1000, A, B)  # an agent restart re-keys with a new SPI ...
    a.sa("added", 20, 0x5000, A, B)    # ... that node-b never learns
    b.error(25, "XfrmInNoStates", 0x5000, A, B)
    report = joined(a, b, tmp_path=tmp_path)
    finding = only(report)
    assert finding.sender_sa is not None and finding.sender_sa["spi"] == 0x5000
    assert finding.receiver_sa["status"] == "never"
    assert [(f.kind, f.spi) for f in report.flags] == [("no-inbound-sa", 0x5000)]


def test_key_length_differs_and_keys_are_never_compared(tmp_path: Path) -> None:
    a, b = nodes()
    a.sa("present", 0, 0x1000, A, B)
    b.sa("present", 0, 0x1000, A, B, algorithms=(Algorithm("aead", "rfc4106(gcm(aes))",
                                                            288, 128),))
    b.error(5, "XfrmInStateProtoError", 0x1000, A, B)
    report = joined(a, b, tmp_path=tmp_path)
    finding = only(report)
    assert finding.receiver_sa["status"] == "present"
    assert "it does not accept these packets" in finding.summary
    (flag,) = report.flags
    assert flag.kind == "algorithms-differ"
    assert "160-bit/128" in flag.text and "288-bit/128" in flag.text
    dumped = json.dumps(cluster.to_dict(report))
    assert "<redacted>" not in dumped and "key\"" not in dumped  # no key field, not even redacted


def test_sender_behind_the_replay_window(tmp_path: Path) -> None:
    a, b = nodes()
    a.sa("present", 0, 0x1000, A, B, oseq=5)  # node-a restarted its sequence numbers
    b.sa("present", 0, 0x1000, A, B, seq=4000)
    b.error(5, "XfrmInStateSeqError", 0x1000, A, B)
    report = joined(a, b, tmp_path=tmp_path)
    assert [(f.kind, f.spi) for f in report.flags] == [("sequence-behind", 0x1000)]
    assert "last sent seq 5" in report.flags[0].text and "seen 4000" in report.flags[0].text
    a2, b2 = nodes()
    a2.sa("present", 0, 0x1000, A, B, oseq=3990)
    b2.sa("present", 0, 0x1000, A, B, seq=4000)
    assert joined(a2, b2, tmp_path=tmp_path).flags == []  # within the window: fine


def test_sender_not_in_the_logs(tmp_path: Path) -> None:
    _a, b = nodes()
    b.sa("present", 0, 0x1000, A, B)
    b.error(5, "XfrmInNoStates", 0x7777, "10.0.0.9", B)
    report = joined(b, tmp_path=tmp_path)
    finding = only(report)
    assert finding.sender is None and not report.joined
    assert "no log has the sender of 10.0.0.9" in finding.summary


def run_report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xfrmtrace", "report", *args],
                          capture_output=True, text=True)


def rotation_logs() -> tuple[NodeLog, NodeLog]:
    a, b = nodes()
    a.sa("present", 0, 0x1000, A, B)
    b.sa("present", 0, 0x1000, A, B)
    b.sa("added", 10, 0x1001, A, B)
    b.sa("deleted", 12, 0x1000, A, B)
    b.error(15, "XfrmInNoStates", 0x1000, A, B, n=2)
    return a, b


def test_command_line_files_kubectl_prefix_and_directory(tmp_path: Path) -> None:
    a, b = rotation_logs()
    plain = [str(a.write(tmp_path)), str(b.write(tmp_path))]
    text = run_report(*plain)
    assert text.returncode == 0, text.stderr
    section = text.stdout.split("Across nodes", 1)[1]
    assert ("  node-a -> node-b\n"
            "    XfrmInNoStates x2  10.0.0.1 > 10.0.0.2 esp spi 0x1000") in section
    assert "node-b deleted its inbound SA spi 0x1000" in section
    # kubectl logs --prefix of the pods, all in one file, in a directory of its own.
    pods = tmp_path / "pods"
    pods.mkdir()
    lines = [f"[pod/xfrmtrace-{log.node[-1]}x7k2/xfrmtrace] {line}" for log in (a, b)
             for line in log.lines]
    (pods / "all.log").write_text("\n".join(lines) + "\n")
    as_json = run_report(str(pods), "--output", "json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["skipped_lines"] == 0
    (pair,) = data["cluster"]["pairs"]
    assert (pair["sender"], pair["receiver"]) == ("node-a", "node-b")
    assert pair["errors"][0]["receiver_sa"]["replaced_by"] == 0x1001


def test_node_from_the_prefix_or_the_file_when_the_objects_have_none(tmp_path: Path) -> None:
    record = json.loads(rotation_logs()[1].lines[-1])
    record.pop("node")
    (tmp_path / "worker-7.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "pods.log").write_text(f"[pod/xfrmtrace-q2/xfrmtrace] {json.dumps(record)}\n")
    found = [r["node"] for r in reader.read_logs([tmp_path])]
    assert sorted(found) == ["worker-7", "xfrmtrace-q2"]


def test_both_logs_of_a_rebooted_node(tmp_path: Path) -> None:
    """node-b's log before and after its reboot, given together: the second run's dump is
    the whole SAD then, so the SA it no longer lists was gone at the restart."""
    a = NodeLog("node-a", A, B)
    a.policies(0)
    a.sa("present", 0, 0x1000, A, B)
    before, after = NodeLog("node-b", B, A), NodeLog("node-b", B, A)
    before.policies(0)
    before.sa("present", 0, 0x1000, A, B)
    after.policies(60)  # the tracer's second start, after the reboot
    after.sa("present", 60, 0x3000, B, A)
    after.error(70, "XfrmInNoStates", 0x1000, A, B)
    paths = [after.write(tmp_path), a.write(tmp_path),  # given in any order
             before.write(tmp_path, name="node-b-previous")]
    report = cluster.join(reader.build(reader.read_logs(paths)))
    finding = only(report)
    assert finding.receiver_sa["status"] == "gone-at-restart"
    assert "was gone when its tracer started again at 2026-" in finding.summary


def test_key_changed_on_one_side_by_fingerprint(tmp_path: Path) -> None:
    """Tracers with one shared secret log a keyed fingerprint per key: the same algorithms
    with different fingerprints is a key changed on one side; equal ones are no flag."""
    def aead(fingerprint: Optional[str]) -> tuple[Algorithm, ...]:
        return (Algorithm("aead", "rfc4106(gcm(aes))", 160, 128, key_fingerprint=fingerprint),)

    a, b = nodes()
    a.sa("present", 0, 0x1000, A, B, algorithms=aead("11" * 16))
    b.sa("present", 0, 0x1000, A, B, algorithms=aead("22" * 16))
    b.error(5, "XfrmInStateProtoError", 0x1000, A, B)
    report = joined(a, b, tmp_path=tmp_path)
    assert [(f.kind, f.spi) for f in report.flags] == [("key-differs", 0x1000)]
    assert "11111111" not in report.flags[0].text  # the fingerprints themselves are not shown
    same_a, same_b = nodes()
    same_a.sa("present", 0, 0x1000, A, B, algorithms=aead("33" * 16))
    same_b.sa("present", 0, 0x1000, A, B, algorithms=aead("33" * 16))
    assert joined(same_a, same_b, tmp_path=tmp_path).flags == []
    unknown_a, unknown_b = nodes()  # one tracer without the secret: nothing to compare
    unknown_a.sa("present", 0, 0x1000, A, B, algorithms=aead("33" * 16))
    unknown_b.sa("present", 0, 0x1000, A, B, algorithms=aead(None))
    assert joined(unknown_a, unknown_b, tmp_path=tmp_path).flags == []
