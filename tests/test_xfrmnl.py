"""NETLINK_XFRM decoding, the SAD/SPD mirror, key redaction and explanations.

Decoding runs on real datagrams recorded in a VM (tests/fixtures/netlink); the live test at
the end uses this machine's kernel, whose XFRM netlink handles policies (it has no ESP, so
SAs cannot be added here).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.guest import record_netlink
from vmlab.guest import xfrm_netlink
from xfrmtrace.context.explain import explain
from xfrmtrace.context.xfrmnl import database
from xfrmtrace.context.xfrmnl.changes import XfrmChange, change_from
from xfrmtrace.context.xfrmnl.database import XfrmDatabase
from xfrmtrace.context.xfrmnl.model import KeyPolicy
from xfrmtrace.context.xfrmnl.socket import parse, split_messages
from xfrmtrace.decode.events import XfrmErrorEvent
from xfrmtrace.output import changes as changes_out
from xfrmtrace.output import jsonl, text

FIXTURES = Path(__file__).parent / "fixtures" / "netlink"
KEYS = [bytes.fromhex(k[2:]) for k in (record_netlink.KEY_AEAD, record_netlink.KEY_ENC,
                                       record_netlink.KEY_AUTH)]
NETNS = 4026532999


def changes(name: str, show_keys: bool = False, at: int = 0,
            secret: Optional[bytes] = None) -> list[XfrmChange]:
    result = []
    for line in (FIXTURES / f"{name}.hex").read_text().split():
        for msg in parse(bytes.fromhex(line)):
            change = change_from(msg, NETNS, at, KeyPolicy(show=show_keys,
                                                           fingerprint_secret=secret))
            if change is not None:
                change.time_ns = 1_795_000_000_000_000_000 + at
                result.append(change)
    return result


def test_every_fixture_decodes_to_the_change_it_recorded() -> None:
    (added,) = changes("sa-add-aead")
    assert (added.kind, added.action) == ("sa", "added")
    sa = added.sa
    assert (sa.src, sa.dst, sa.spi, sa.proto, sa.mode, sa.reqid) == (
        "10.9.0.1", "10.9.0.2", 0x1000, "esp", "tunnel", 7)
    assert (sa.mark, sa.mark_mask, sa.replay_window) == (0xD00, 0xF00, 32)
    (aead,) = sa.algorithms
    assert (aead.kind, aead.name, aead.key_bits, aead.icv_bits) == (
        "aead", "rfc4106(gcm(aes))", 160, 128)

    (cbc,) = changes("sa-add-cbc-encap")
    assert cbc.sa.encap == "espinudp 4500->4500"
    assert [(a.kind, a.name, a.key_bits, a.icv_bits) for a in cbc.sa.algorithms] == [
        ("auth", "hmac(sha256)", 256, 128), ("crypt", "cbc(aes)", 128, None)]
    assert cbc.sa.lifetime.hard_packets == 1000

    (v6,) = changes("sa-add-ipv6")
    assert (v6.sa.src, v6.sa.dst, v6.sa.mode, v6.sa.family) == (
        "fd00:9::1", "fd00:9::2", "transport", 10)

    assert [c.action for c in changes("sa-update")] == ["updated"]
    assert changes("sa-update")[0].sa.replay_window == 64
    (deleted,) = changes("sa-delete")
    assert (deleted.action, deleted.sa.spi, deleted.sa.mark) == ("deleted", 0x1000, 0xD00)
    soft, hard = changes("sa-expire")
    assert (soft.action, soft.hard, hard.hard, hard.sa.spi) == ("expired", False, True, 0x4000)
    (flushed,) = changes("sa-flush")
    assert (flushed.kind, flushed.action, flushed.flushed_proto) == ("sa", "flushed", None)

    (pol,) = changes("policy-add")
    p = pol.policy
    assert (p.direction, p.action, p.priority, p.mark, p.mark_mask) == (
        "out", "allow", 100, 0xD00, 0xF00)
    assert (p.selector.src, p.selector.dst) == ("10.9.0.1", "10.9.0.2")
    (tmpl,) = p.templates
    assert (tmpl.src, tmpl.dst, tmpl.proto, tmpl.mode, tmpl.reqid) == (
        "10.9.0.1", "10.9.0.2", "esp", "tunnel", 7)
    (block,) = changes("policy-add-block")
    b = block.policy
    assert (b.action, b.direction, b.selector.src, b.selector.dst, b.selector.proto,
            b.selector.dport) == ("block", "in", "10.9.1.0/24", "10.9.2.0/24", 17, 53)
    assert changes("policy-update")[0].policy.priority == 50
    assert changes("policy-delete")[0].policy.index == b.index
    assert [(c.kind, c.action) for c in changes("policy-flush")] == [("policy", "flushed")]


def test_dump_replies_decode_like_notifications() -> None:
    sas = [c.sa.spi for c in changes("dump-sa")]
    assert sorted(sas) == [0x1000, 0x2000, 0x3000]
    assert sorted(c.policy.index for c in changes("dump-policy")) == [1, 8]


def test_database_follows_adds_updates_deletes_and_flushes() -> None:
    db = XfrmDatabase()
    order = ["sa-add-aead", "sa-add-cbc-encap", "sa-add-ipv6", "sa-update", "policy-add",
             "policy-add-block", "policy-update", "sa-add-expiring", "sa-expire", "sa-delete",
             "policy-delete"]
    for n, name in enumerate(order):
        for change in changes(name, at=n * 1_000_000_000):
            db.apply(change)
    state = db.state(NETNS)
    assert sorted(sa.spi for sa in state.sas.values()) == [0x2000, 0x3000]  # 0x4000 expired
    assert [p.priority for p in state.policies.values()] == [50]
    for change in changes("sa-flush") + changes("policy-flush"):
        db.apply(change)
    assert not state.sas and not state.policies
    assert db.last_change(NETNS, lambda c: c.action == "deleted" and c.kind == "sa").sa.spi \
        == 0x1000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["added", "deleted", "expired-hard", "expired-soft"]),
                          st.integers(1, 4), st.sampled_from(["10.0.0.1", "10.0.0.2"])),
                max_size=40))
def test_removal_index_answers_like_a_history_scan(ops: list) -> None:
    """last_removal and last_removal_to (indices by SPI and by destination, kept in step
    with the bounded history) find what a scan of the history would, also once old changes
    fell out of it."""
    sa_fields = next(c.sa for c in changes("sa-add-aead"))
    db = XfrmDatabase()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(database, "HISTORY", 8)
        for n, (action, spi, dst) in enumerate(ops):
            sa = dataclasses.replace(sa_fields, spi=spi, dst=dst)
            kind, _, hardness = action.partition("-")
            db.apply(XfrmChange(kind="sa", action=kind, netns=NETNS, monotonic_ns=n, sa=sa,
                                hard=(hardness == "hard") if hardness else None))
    for spi in range(1, 5):
        for dst in ("10.0.0.1", "10.0.0.2"):
            def same(sa, spi=spi, dst=dst):
                return sa.spi == spi and sa.dst == dst
            scanned = db.last_change(NETNS, lambda c, same=same: database.sa_removed(c)
                                     and same(c.sa))
            assert db.last_removal(NETNS, spi, same) is scanned
    for dst in ("10.0.0.1", "10.0.0.2"):
        scanned = db.last_change(NETNS, lambda c, dst=dst: database.sa_removed(c)
                                 and c.sa.dst == dst)
        assert db.last_removal_to(NETNS, dst) is scanned
    assert db.last_removal_to(NETNS, "10.0.0.3") is None


def _all_output(show_keys: bool, secret: Optional[bytes] = None) -> str:
    """Every way a change or an explanation can be printed, for every fixture."""
    db = XfrmDatabase()
    out = []
    for path in sorted(FIXTURES.glob("*.hex")):
        for change in changes(path.stem, show_keys, secret=secret):
            db.apply(change)
            out += [changes_out.format_change_text(change), changes_out.format_change_json(change)]
    event = XfrmErrorEvent(counter="XfrmInNoStates", netns=NETNS, context="skb",
                           family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="esp",
                           encap="esp", spi=0x1000, seq=5, mark=0xD00,
                           monotonic_ns=10**12, time_ns=1_795_000_001_000_000_000)
    event.explain = explain(event, db)
    out += [text.format_event(event), jsonl.format_event(event)]
    return "\n".join(out)


def _leaks(output: str) -> list[str]:
    found = []
    lowered = output.lower()
    for key in KEYS:
        for form in (key.hex(), base64.b64encode(key).decode(), repr(key)[2:-1]):
            if form.lower() in lowered:
                found.append(form)
        if key.hex()[:16] in lowered.replace(":", "").replace(" ", ""):
            found.append(key.hex()[:16])
    return found


def test_no_key_bytes_in_any_output_by_default() -> None:
    output = _all_output(show_keys=False)
    assert "<redacted>" in output
    assert _leaks(output) == []


def test_show_keys_prints_them() -> None:
    """The redaction test above can fail: with --show-keys the same outputs carry keys."""
    output = _all_output(show_keys=True)
    assert record_netlink.KEY_AEAD[2:] in output and record_netlink.KEY_AUTH[2:] in output


def test_key_fingerprints_tell_keys_apart_and_leak_none() -> None:
    secret = b"a cluster-wide secret of 32 bytes"
    output = _all_output(show_keys=False, secret=secret)
    assert _leaks(output) == [] and "<redacted>" in output and "fingerprint " in output
    (sa,) = [c.sa for c in changes("sa-add-aead", secret=secret)]
    (again,) = [c.sa for c in changes("sa-add-aead", secret=secret)]
    other = b"another secret, 32 bytes long!"
    (other_secret,) = [c.sa for c in changes("sa-add-aead", secret=other)]
    fingerprint = sa.algorithms[0].key_fingerprint
    assert fingerprint and len(fingerprint) == 32
    assert again.algorithms[0].key_fingerprint == fingerprint  # same key, same secret
    assert other_secret.algorithms[0].key_fingerprint not in (None, fingerprint)
    assert changes("sa-add-aead")[0].sa.algorithms[0].key_fingerprint is None  # no secret
    # A different key under the same secret: the fixture's other SA.
    keys = {a.key_fingerprint for path in sorted(FIXTURES.glob("*.hex"))
            for c in changes(path.stem, secret=secret) if c.sa for a in c.sa.algorithms}
    assert len(keys - {None}) >= 2


def test_explanation_names_the_deleted_sa_and_what_came_since() -> None:
    db = XfrmDatabase()
    for n, name in enumerate(["sa-add-aead", "sa-delete", "sa-add-expiring"]):
        for change in changes(name, at=n * 60_000_000_000):
            db.apply(change)
    event = XfrmErrorEvent(counter="XfrmInNoStates", netns=NETNS, context="skb",
                           family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="esp",
                           encap="esp", spi=0x1000, mark=0xD00, monotonic_ns=16 * 60 * 10**9)
    exp = explain(event, db)
    assert exp.summary == "SA spi 0x1000 dst 10.9.0.2 was deleted 15.0 min before"
    assert exp.details == ["installed since: spi 0x4000 dst 10.9.0.3"]
    # A packet for an SPI never seen says so, and lists what exists for that dst.
    event.spi = 0x77
    assert "no SA with dst 10.9.0.2 spi 0x77 was seen" in explain(event, db).summary
    # An unfollowed namespace is said to be unfollowed, not guessed about.
    event.netns = 1
    assert "not followed" in explain(event, db).summary


def test_replacement_read_in_the_same_batch_as_the_deletion_is_named() -> None:
    """One netlink read gives every change in it the same time: an SA deleted and replaced
    in one go (the classic rekeying mistake) must still show its replacement."""
    db = XfrmDatabase()
    for change in changes("sa-add-aead", at=0):
        db.apply(change)
    for name in ["sa-delete", "sa-add-expiring"]:
        for change in changes(name, at=5_000_000_000):
            db.apply(change)
    event = XfrmErrorEvent(counter="XfrmInNoStates", netns=NETNS, context="skb",
                           family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="esp",
                           encap="esp", spi=0x1000, mark=0xD00, monotonic_ns=6 * 10**9)
    exp = explain(event, db)
    assert exp.summary.startswith("SA spi 0x1000 dst 10.9.0.2 was deleted")
    assert exp.details == ["installed since: spi 0x4000 dst 10.9.0.3"]
    # What came before the deletion, even at the same time, is not "since".
    db = XfrmDatabase()
    for name in ["sa-add-expiring", "sa-add-aead", "sa-delete"]:
        for change in changes(name, at=5_000_000_000):
            db.apply(change)
    assert explain(event, db).details == ["no SA was installed since"]


def test_out_no_states_explains_the_template_gap() -> None:
    db = XfrmDatabase()
    for name in ["policy-add", "sa-add-cbc-encap"]:
        for change in changes(name):
            db.apply(change)
    event = XfrmErrorEvent(counter="XfrmOutNoStates", netns=NETNS, context="flow",
                           family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="icmp",
                           proto_num=1, mark=0xD00)
    exp = explain(event, db)
    assert exp.summary.startswith("out policy 10.9.0.1 -> 10.9.0.2")
    assert exp.details == ["template [esp tunnel 10.9.0.1 -> 10.9.0.2 reqid 7]: no esp SA to "
                           "10.9.0.2 exists"]


def test_truncated_and_odd_messages_are_skipped_with_a_warning(caplog) -> None:
    raw = bytes.fromhex((FIXTURES / "sa-add-aead.hex").read_text().split()[0])
    assert list(split_messages(raw[:40])) == []  # length field overruns the datagram
    assert "overruns" in caplog.text
    bad = bytearray(raw)
    bad[16 + 224 + 2:16 + 224 + 4] = (0xFFFF).to_bytes(2, "little")  # absurd attribute type
    assert len(list(parse(bytes(bad)))) <= 1  # decoded or skipped, never an exception
    # A header that claims 16 bytes (no body) for a message type with a 224-byte body.
    short = (16).to_bytes(4, "little") + raw[4:16]
    assert list(parse(short)) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a network namespace")
def test_live_watcher_follows_a_new_namespace_and_lets_it_go() -> None:
    """Real netlink on this machine: policy changes in a namespace that appears later."""
    from xfrmtrace.context.xfrmnl.listener import XfrmWatcher

    name = f"xt-unit-{os.getpid()}"
    watcher = XfrmWatcher()
    watcher.start()
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        watcher.rescan()
        inode = os.stat(f"/run/netns/{name}").st_ino
        assert inode in [*watcher._sockets]
        subprocess.run(["ip", "-n", name, "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst",
                        "10.2.0.0/16", "dir", "out", "action", "block"], check=True)
        deadline = time.monotonic() + 5
        seen: list[XfrmChange] = []
        while not seen and time.monotonic() < deadline:
            seen = [c for c in watcher.poll() if c.netns == inode]
            time.sleep(0.05)
        assert [(c.kind, c.action, c.policy.action) for c in seen] == [
            ("policy", "added", "block")]
        assert json.loads(changes_out.format_change_json(seen[0]))["policy"]["selector"][
            "src"] == "10.1.0.0/16"
        # tc changes in the same namespace go on the same timeline.
        for verb in ("add", "del"):
            subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", verb, "dev", "lo",
                            "clsact"], check=True)
        deadline = time.monotonic() + 5
        tc: list[XfrmChange] = []
        while len(tc) < 2 and time.monotonic() < deadline:
            tc += [c for c in watcher.poll() if c.netns == inode and c.kind == "tc"]
            time.sleep(0.05)
        assert [(c.action, c.detail["object"], c.detail["kind"]) for c in tc] == [
            ("added", "qdisc", "clsact"), ("deleted", "qdisc", "clsact")]
        assert changes_out.format_change_text(tc[0]).split(": ", 1)[1].startswith(
            "ifindex=1 kind=clsact parent=ffff:fff1")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    watcher.rescan()
    assert inode not in watcher._sockets  # the namespace is not kept alive by us
    watcher.close()


def test_watcher_warns_once_about_a_name_that_is_not_a_namespace(tmp_path: Path,
                                                                 caplog) -> None:
    """A stale file in /run/netns (or one caught before `ip netns add` mounts it)."""
    from xfrmtrace.context.xfrmnl.listener import XfrmWatcher

    (tmp_path / "stale").write_text("")
    watcher = XfrmWatcher(run_netns=tmp_path)
    try:
        watcher.rescan()
        watcher.rescan()
    finally:
        watcher.close()
    assert watcher.fds() == []
    assert caplog.text.count("cannot follow XFRM changes in") == 1


def _db(*names: str) -> XfrmDatabase:
    db = XfrmDatabase()
    for name in names:
        for change in changes(name):
            db.apply(change)
    return db


def test_policy_explanations_name_the_policy() -> None:
    db = _db("policy-add", "policy-add-block", "sa-add-aead")
    blocked = XfrmErrorEvent(counter="XfrmInPolBlock", netns=NETNS, context="skb",
                             family="ipv4", src="10.9.1.7", dst="10.9.2.8", proto="udp",
                             proto_num=17, sport=5353, dport=53)
    assert explain(blocked, db).summary == (
        "blocked by in policy 10.9.1.0/24 -> 10.9.2.0/24 proto 17 ports 0->53 "
        "(index 8, priority 0)")
    blocked.dport = 54  # the selector's port no longer matches
    assert explain(blocked, db).summary.startswith("no in policy matches 10.9.1.7 -> 10.9.2.8")
    plain = XfrmErrorEvent(counter="XfrmOutNoStates", netns=NETNS, context="flow",
                           family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="icmp",
                           proto_num=1, mark=0xD00)
    exp = explain(plain, db)
    assert exp.details[0].startswith("template [esp tunnel 10.9.0.1 -> 10.9.0.2 reqid 7]: "
                                     "SAs to 10.9.0.2 do not fit: spi 0x1000: appears to fit")
    plain.mark = 0  # the policy is marked: an unmarked flow matches no policy
    assert explain(plain, db).summary.startswith("no out policy matches")


def test_sa_explanations_by_spi() -> None:
    db = _db("sa-add-aead", "sa-add-cbc-encap")
    event = XfrmErrorEvent(counter="XfrmInStateSeqError", netns=NETNS, context="skb",
                           family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="esp",
                           encap="esp", spi=0x1000, seq=7, mark=0xD00)
    assert explain(event, db).summary == (
        "SA spi 0x1000: seq 7 is a replay or older than the replay window (32 packets; "
        "highest seen 0; replays counted on this SA: 0)")
    event.counter = "XfrmInStateProtoError"
    assert "SA spi 0x1000 (aead rfc4106(gcm(aes))) could not authenticate" in \
        explain(event, db).summary
    event.counter, event.spi, event.dst = "XfrmInStateMismatch", 0x2000, "10.9.0.1"
    assert explain(event, db).summary == ("SA spi 0x2000 expects encapsulation espinudp "
                                          "4500->4500, the packet arrived as plain esp")
    event.counter = "XfrmInHdrError"
    event.packet_len = 23
    assert explain(event, db).summary.startswith(
        "the packet's ESP header could not be read: the packet (23 bytes) is too short")
    event.context = "none"
    assert "carried no packet" in explain(event, db).summary


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a network namespace")
def test_live_watcher_reports_what_it_found_as_present() -> None:
    """Real netlink: a policy that existed before the namespace was followed comes once as
    "present" (the state a log starts from), later changes as what they are."""
    from xfrmtrace.context.xfrmnl.listener import XfrmWatcher

    name = f"xt-present-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    watcher = XfrmWatcher()
    try:
        subprocess.run(["ip", "-n", name, "xfrm", "policy", "add", "src", "10.3.0.0/16", "dst",
                        "10.4.0.0/16", "dir", "in", "action", "block"], check=True)
        watcher.start()
        watcher.rescan()
        inode = os.stat(f"/run/netns/{name}").st_ino
        first = [c for c in watcher.poll() if c.netns == inode]
        assert [(c.kind, c.action, c.policy.direction) for c in first] == [
            ("policy", "present", "in")]
        assert json.loads(changes_out.format_change_json(first[0]))["action"] == "present"
        subprocess.run(["ip", "-n", name, "xfrm", "policy", "add", "src", "10.5.0.0/16", "dst",
                        "10.6.0.0/16", "dir", "out", "action", "block"], check=True)
        deadline = time.monotonic() + 5
        later: list[XfrmChange] = []
        while not later and time.monotonic() < deadline:
            later = [c for c in watcher.poll() if c.netns == inode]
            time.sleep(0.05)
        assert [(c.action, c.policy.direction) for c in later] == [("added", "out")]
        assert len(watcher.db.state(inode).policies) == 2  # present + added, nothing twice
    finally:
        watcher.close()
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_lab_requests_decode_as_the_tool_reads_the_kernel() -> None:
    """The lab's hand-built IP-TFS NEWSA/NEWPOLICY (vmlab/guest/xfrm_netlink.py, struct.pack)
    and the tool's decoder (pyroute2 classes) are two readings of include/uapi/linux/xfrm.h:
    they must agree field by field, and the explanation must use the IP-TFS queue limit."""
    db = XfrmDatabase()
    messages = [
        xfrm_netlink.new_sa_message("10.9.0.1", "10.9.0.2", 0x1000, "rfc4106(gcm(aes))",
                                    "0x" + "11" * 20, 128, 0xD00, 0xF00, "out", reqid=7,
                                    mode="iptfs", iptfs_max_qsize=1),
        xfrm_netlink.new_policy_message("10.9.0.1", "10.9.0.2", "out", 0xD00, 0xF00, reqid=7,
                                        mode="iptfs"),
    ]
    found = []
    for message in messages:
        for msg in parse(message):
            change = change_from(msg, NETNS, 0, KeyPolicy())
            assert change is not None
            db.apply(change)
            found.append(change)
    sa, policy = found[0].sa, found[1].policy
    assert (sa.src, sa.dst, sa.spi, sa.proto, sa.mode, sa.reqid, sa.direction) == (
        "10.9.0.1", "10.9.0.2", 0x1000, "esp", "iptfs", 7, "out")
    assert (sa.mark, sa.mark_mask, sa.iptfs_max_qsize) == (0xD00, 0xF00, 1)
    assert [(a.name, a.key_bits, a.icv_bits) for a in sa.algorithms] == [
        ("rfc4106(gcm(aes))", 160, 128)]
    assert (policy.direction, policy.action, policy.mark, policy.mark_mask) == (
        "out", "allow", 0xD00, 0xF00)
    assert (policy.selector.src, policy.selector.dst) == ("10.9.0.1", "10.9.0.2")
    (tmpl,) = policy.templates
    assert (tmpl.src, tmpl.dst, tmpl.proto, tmpl.mode, tmpl.reqid) == (
        "10.9.0.1", "10.9.0.2", "esp", "iptfs", 7)
    event = XfrmErrorEvent(counter="XfrmOutNoQueueSpace", netns=NETNS, context="skb",
                           family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="icmp",
                           mark=0xD00)
    assert explain(event, db).summary == (
        "SA spi 0x1000 (mode iptfs) has a full send queue (at most 1 octets, "
        "XFRMA_IPTFS_MAX_QSIZE): packets arrive faster than the SA sends them")
