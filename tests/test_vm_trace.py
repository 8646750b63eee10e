"""End to end on real kernels: xfrmtrace runs in a VM while real IPsec traffic moves counters.

One VM boot per kernel of the matrix (vmlab/host/kernels.py; ``XFRMTRACE_KERNELS`` or
``make test-kernels KERNEL=..`` picks a subset).  The guest (tests/guest/trace_run.py)
starts the tool before any IPsec module is loaded, loads and unloads a module with sites,
runs every scenario of tests/guest/scenarios.py in its own namespaces, records the tool's
JSON output and every namespace's /proc/net/xfrm_stat, and finally audits the resolver.
These tests assert on that record.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import report_line
from tests.guest import scenarios
from tests.support import distbuild
from tests.support.require import not_applicable
from vmlab.guest import healthy as guest_healthy
from vmlab.guest import ipsec
from vmlab.guest import tool as guest_tool
from vmlab.host import extramodules, kernels, vm

REPO = Path(__file__).resolve().parents[1]

PACKETS = 3
GUEST_TOOLS = ("ip", "iptables", "ip6tables", "ping")
# A kprobe at a function's entry sits at +0 or, after endbr64 (IBT kernels), at +4.
ENTRY_PROBE_OFFSET = 4

pytestmark = pytest.mark.vm


def selected_kernels() -> list[str]:
    """$XFRMTRACE_KERNELS (comma or space separated series), default the whole matrix."""
    chosen = os.environ.get("XFRMTRACE_KERNELS", "").replace(",", " ").split()
    return chosen if chosen and chosen != ["all"] else list(kernels.MATRIX)


@pytest.fixture(scope="module", params=selected_kernels())
def run(request, tmp_path_factory) -> dict:
    missing = vm.missing_requirements()
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing += [t for t in GUEST_TOOLS if shutil.which(t, path=search) is None]
    if missing:
        pytest.skip("VM lab cannot run here: missing " + "; ".join(missing))
    series = request.param
    # A failed download is an error, not a skip: CI must notice a lab without kernels.
    kernel = kernels.fetch_kernel(series)
    extra_modules = _provide_extra_modules(kernel)
    rwdir = tmp_path_factory.mktemp(f"vm-{series}")
    out = rwdir / "trace"
    command = shlex.join([vm.guest_python(kernel), "-m", "tests.guest.trace_run", "--out", str(out),
                          "--count", str(PACKETS), "--tool-arg=--output-stack",
                          # A limit no scenario reaches: the rate-limit path runs on every
                          # kernel (the verifier sees it only when it is switched on).
                          "--tool-arg=--rate-limit=100000"])
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    if kernels.debian_arch(kernel) == "arm64":
        # arm64 runs the single-file tool (x86 runs it in tests/test_vm_deploy.py): its
        # aarch64 libcapstone and BPF object are what this lab proves.
        env.update({guest_tool.PYZ_ENV: str(distbuild.build_zipapp()), "SHIV_ROOT": "/tmp/shiv"})
    result = vm.run_in_vm(kernel, command, rwdir=rwdir, cwd=REPO, timeout=1500, env=env)
    assert result.ok, result.describe()
    data = json.loads((out / "results.json").read_text())
    audit = out / "audit.json"
    data["audit_entries"] = json.loads(audit.read_text()) if audit.exists() else None
    data["extra_modules"] = extra_modules
    data["events_path"] = str(out / "events.jsonl")
    data["pcap_path"] = str(out / "events.pcapng")
    boot = "?" if result.boot_seconds is None else f"{result.boot_seconds:.0f}"
    report_line(request.config,
                f"{series:5s} {kernel.version:24s} total {result.seconds:5.0f} s"
                f"{result.boot_note}: boot {boot} s, tool ready {data.get('ready_seconds')} s, "
                f"scenarios {data.get('scenario_seconds')} s, "
                f"audit {data.get('audit', {}).get('seconds')} s, "
                f"tool peak RSS {data.get('tool_peak_rss_kib', 0) // 1024} MiB")
    present, moved = scenarios.moved_counters(data.get("scenarios", {}))
    report_line(request.config,
                f"{'':5s} counters no scenario moves: " + (", ".join(
                    f"{c} ({scenarios.UNMOVED_WHY.get(c, 'NO REASON GIVEN')})"
                    for c in sorted(present - moved)) or "none"))
    if data["audit_entries"] is not None:
        by_class = Counter(e["classification"] for e in data["audit_entries"])
        report_line(request.config,
                    f"{'':5s} resolver audit: {sum(by_class.values())} gs-relative increments: "
                    + ", ".join(f"{n} {c}" for c, n in by_class.items()))
    return data


def _provide_extra_modules(kernel: kernels.Kernel) -> dict[str, dict]:
    """Modules Debian does not build, made for this kernel (vmlab/host/extramodules.py):
    {module: {"ready": loadable in the guest, "why": why not, "error": a failed build}}.
    A failed build fails only the scenarios that need the module."""
    try:
        why = extramodules.provide_iptfs(kernel)
    except extramodules.ExtraModuleError as err:
        return {scenarios.IPTFS_MODULE: {"ready": False, "why": None, "error": str(err)}}
    return {scenarios.IPTFS_MODULE: {"ready": why is None, "why": why, "error": None}}


def _events(data: dict, counter: str, netns: int) -> list[dict]:
    return [e for e in data["events"] if e["counter"] == counter and e["netns"] == netns]


# ---- the tool as a whole ------------------------------------------------------------------------


def test_every_counter_is_moved_or_says_why(run: dict) -> None:
    """Each counter this kernel has is moved by a scenario or listed with the reason it is
    not (tests/guest/scenarios.py UNMOVED_WHY; the matrix report prints them)."""
    present, moved = scenarios.moved_counters(run["scenarios"])
    assert len(present) >= 28, present
    assert sorted(present - moved - set(scenarios.UNMOVED_WHY)) == []


def test_tool_ran_and_stopped_cleanly(run: dict) -> None:
    assert run["returncode"] == 0, run["stderr"]
    attached = run["stderr"].split("Attached ", 1)[1].split()[0]
    done, expected = (int(x) for x in attached.split("/"))
    assert done == expected > 20
    assert run["summary"] is not None, "no summary printed on SIGINT"
    assert run["summary"]["lost"] == 0


def test_argument_probes_only_where_sites_lack_registers(run: dict) -> None:
    """Functions whose sites hold every argument they report in registers get no argument
    probe (argregs.py).  The packet context those sites report is checked by every scenario
    below."""
    found = re.search(r"\(\+(\d+) recording packet context, (\d+) functions need none",
                      run["stderr"])
    assert found, run["stderr"]
    recording, unneeded = int(found.group(1)), int(found.group(2))
    assert recording > 0 and unneeded > 0


def test_transmit_path_has_no_argument_probe_at_entry(run: dict) -> None:
    """validate_xmit_xfrm runs for every packet any device sends: its argument probe must sit
    after ``if (!xo) return skb;`` (argregs.py, with the kernel's jump label table), never at
    its entry, or all traffic pays a probe hit."""
    offsets = [int(probe.split()[2].split("+")[1], 16) for probe in run["kprobes_while_tracing"]
               if probe.split()[2].startswith("validate_xmit_xfrm+")]
    assert offsets, "no probe in validate_xmit_xfrm"
    assert min(offsets) > ENTRY_PROBE_OFFSET, sorted(offsets)


def test_healthy_traffic_runs_no_probe(run: dict, request) -> None:
    """Healthy traffic pays nothing per packet (issue 13).  The kernel's own run counts of
    both BPF programs (bpf_stats_enabled), for ESP and plain traffic, IPv4 and IPv6, TCP
    and UDP on connected sockets and ping (a route lookup per packet):

    - no site probe ever fires, and on plain traffic no argument probe either;
    - on ESP traffic argument probes fire only per route lookup that finds an IPsec policy
      (xfrm_lookup_with_ifid, xfrm_resolve_and_create_bundle: the flow they report is gone
      by their sites, README "Healthy path"), never per packet of a connection.
    """
    healthy = run["healthy"]
    assert "error" not in healthy, healthy["error"]
    assert all(v is not None for v in healthy.get("attach_seconds", {}).values()), healthy
    kinds = healthy["kinds"]
    assert set(kinds) == set(guest_healthy.ROUTE_LOOKUPS)
    assert all(delta == {} for delta in healthy["xfrm_stat_delta"].values()), healthy
    assert healthy["esp_sa_packets"] > guest_healthy.PINGS  # the ESP lab's traffic was ESP
    report_line(request.config, f"{'':5s} healthy path, xt_entry+xt_site runs per packet: "
                + ", ".join(f"{kind} {rec['xt_entry']['run_cnt'] / max(rec['packets'], 1):.2f}"
                            f"+{rec['xt_site']['run_cnt'] / max(rec['packets'], 1):.2f} "
                            f"({rec['packets']} pkts)" for kind, rec in kinds.items()))
    for kind, rec in kinds.items():
        assert rec["packets"] >= guest_healthy.MIN_PACKETS[kind], (kind, rec)
        assert rec["xt_site"]["run_cnt"] == 0, (kind, rec)
        assert rec.get("xt_site_bp", {}).get("run_cnt", 0) == 0, (kind, rec)
        bound = (guest_healthy.LOOKUP_PROBES * guest_healthy.ROUTE_LOOKUPS[kind]
                 if kind.startswith("esp") else 0)
        assert rec["xt_entry"]["run_cnt"] <= bound, (kind, rec)


def test_event_counts_equal_proc_counters(run: dict) -> None:
    """For every counter in every scenario namespace: events == /proc/net/xfrm_stat, exactly.

    The tool runs for the whole life of each namespace, whose counters start at zero.
    """
    checked = 0
    for name, record in run["scenarios"].items():
        for lab in record.get("labs", []):
            for ns, totals in lab["totals"].items():
                inode = lab["netns"][ns]
                seen = Counter(e["counter"] for e in run["events"] if e["netns"] == inode)
                moved = {counter: n for counter, n in totals.items() if n}
                assert dict(seen) == moved, f"{name}, {ns}: events {dict(seen)} vs /proc {moved}"
                checked += len(moved)
    assert checked >= len(scenarios.SCENARIOS) - 3


def test_metrics_equal_proc_counters(run: dict) -> None:
    """A scrape of --metrics-addr after the scenarios: for every counter of every scenario
    namespace, xfrmtrace_xfrm_errors_total equals the /proc/net/xfrm_stat delta (the
    namespaces are newer than the tool, so their totals are the deltas)."""
    assert run["metrics"].startswith("# HELP"), run["metrics"][:500]
    metrics = guest_tool.metric_errors(run["metrics"])
    checked = 0
    for name, record in run["scenarios"].items():
        for lab in record.get("labs", []):
            for ns, totals in lab["totals"].items():
                inode = str(lab["netns"][ns])
                scraped = {c: n for (c, netns), n in metrics.items() if netns == inode}
                moved = {counter: n for counter, n in totals.items() if n}
                assert scraped == moved, f"{name}, {ns}: metrics {scraped} vs /proc {moved}"
                checked += len(moved)
    assert checked >= len(scenarios.SCENARIOS) - 3
    assert "xfrmtrace_events_lost_total 0.0" in run["metrics"]
    attached = re.search(r"^xfrmtrace_probes_attached (\S+)$", run["metrics"], re.M)
    expected = re.search(r"^xfrmtrace_probes_expected (\S+)$", run["metrics"], re.M)
    assert attached and expected and float(attached[1]) == float(expected[1]) > 20


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed (make deps)")
def test_pcap_packets_read_by_tshark(run: dict) -> None:
    """--output-pcap: one packet per event with packet bytes; the ESP SPI as Wireshark
    dissects it and the comment naming counter, site and namespace."""
    proc = subprocess.run(["tshark", "-r", run["pcap_path"], "-T", "fields", "-E",
                           "separator=|", "-E", "occurrence=f", "-e", "esp.spi",
                           "-e", "frame.comment"],
                          capture_output=True, text=True, timeout=120, check=True)
    rows = [line.split("|") for line in proc.stdout.splitlines()]
    with_bytes = [e for e in run["events"] if e["packet_len"]]
    assert len(rows) == len(with_bytes) > 0
    lab = run["scenarios"]["in-no-states"]["labs"][0]
    inode = lab["netns"][lab["config"]["ns_b"]]
    ours = [spi for spi, comment in rows
            if comment.startswith("XfrmInNoStates at xfrm_input+") and f"netns {inode} " in comment]
    assert [int(spi, 16) for spi in ours] == [lab["config"]["spi_ab"]] * PACKETS, rows


def test_summary_counts_match_events(run: dict) -> None:
    events_per_counter = Counter(e["counter"] for e in run["events"])
    moved = {counter: n for counter, n in run["summary"]["counters"].items() if n}
    assert moved == dict(events_per_counter)


def test_no_kprobe_left_after_exit(run: dict) -> None:
    ours = [line for line in run["kprobes_while_tracing"] if "[DISABLED]" not in line]
    assert len(ours) > 20, run["kprobes_while_tracing"]  # the list is readable and had ours
    assert run["kprobes_after_exit"] == [], run["kprobes_after_exit"]


# ---- one test per scenario ----------------------------------------------------------------------


def _check_event(event: dict, expect: scenarios.Expect, lab: dict) -> None:
    cfg = lab["config"]
    v6 = expect.family == "ipv6"
    src, dst = (cfg["addr6_a"], cfg["addr6_b"]) if v6 else (cfg["addr_a"], cfg["addr_b"])
    side_ns = cfg["ns_b"] if expect.side == "b" else cfg["ns_a"]
    assert event["netns_name"] == side_ns, event
    assert event["netns_verified"] is True, event
    assert event["context_note"] is None, event  # packet context complete, from wherever
    assert event["mark"] == cfg["mark"], event
    assert event["family"] == expect.family, event
    assert ipaddress.ip_address(event["src"]) == ipaddress.ip_address(src), event
    assert ipaddress.ip_address(event["dst"]) == ipaddress.ip_address(dst), event
    if expect.packet == "flow":
        assert event["context"] in ("flow", "skb"), event
        return
    assert event["context"] == "skb", event
    assert event["ifname"] == cfg["veth_b"], event
    assert event["ifindex"] == lab["ifindex"][cfg["veth_b"]], event
    if expect.packet in ("esp", "esp-in-udp"):
        if expect.packet == "esp":
            assert event["proto"] == "esp", event
        else:
            assert event["proto"] == "esp" or event["encap"] == "esp-in-udp", event
        assert event["spi"] == cfg["spi_ab"], event
        assert isinstance(event["seq"], int) and event["seq"] > 0, event
    elif expect.packet == "short":
        assert event["proto"] == "esp" and event.get("spi") is None, event
    else:
        assert event["proto"] in ("icmp", "ipv6-icmp"), event


@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_scenario(run: dict, name: str) -> None:
    scenario = scenarios.SCENARIOS[name]
    record = run["scenarios"][name]
    extra = run["extra_modules"].get(scenario.module) if scenario.module else None
    if extra is not None and extra["error"]:
        pytest.fail(f"the lab could not build {scenario.module}: {extra['error']}")
    if "skipped" in record:
        if extra is not None and extra["ready"]:
            pytest.fail(f"skipped although the lab provided {scenario.module}: "
                        f"{record['skipped']}")
        not_applicable(f"{run['kernel']}: {record['skipped']}")
    assert "error" not in record, record["error"]
    expect = scenario.expect
    for lab in record["labs"]:
        cfg = lab["config"]
        inode = lab["netns"][cfg["ns_b"] if expect.side == "b" else cfg["ns_a"]]
        events = _events(run, expect.counter, inode)
        if expect.per_packet:
            assert len(events) == lab["sent"], [e for e in run["events"] if e["netns"] == inode]
        else:
            assert events, [e for e in run["events"] if e["netns"] == inode]
        for event in events:
            _check_event(event, expect, lab)
            explained = " ".join([event["explain"]["summary"], *event["explain"]["details"]])
            assert expect.why in explained, event["explain"]


def test_in_no_states_event_in_detail(run: dict) -> None:
    """The classic case, every field: site, sequence numbers, time, and the stack."""
    lab = run["scenarios"]["in-no-states"]["labs"][0]
    events = _events(run, "XfrmInNoStates", lab["netns"][lab["config"]["ns_b"]])
    assert len(events) == PACKETS
    for e in events:
        assert e["function"] == "xfrm_input", e
        assert e["time"].endswith("Z") and "T" in e["time"]
        # --output-stack: the probed instruction is the innermost frame.
        assert e["stack"] and e["stack"][0].startswith(f"xfrm_input+{e['offset']:#x}"), e
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == PACKETS  # one event per ESP packet


def test_classic_investigation_is_explained(run: dict) -> None:
    """The SA the packets need was deleted and replaced by one with another SPI: the
    timeline shows both changes, and each error names the deleted SA and the replacement."""
    lab = run["scenarios"]["in-no-states-replaced"]["labs"][0]
    cfg = lab["config"]
    netns_b = lab["netns"][cfg["ns_b"]]
    spis = [(c["action"], c["sa"]["spi"]) for c in run["changes"]
            if c["netns"] == netns_b and c["type"] == "sa"
            and c["action"] in ("deleted", "added") and c["sa"]["dst"] == cfg["addr_b"]]
    assert ("deleted", cfg["spi_ab"]) in spis and ("added", scenarios.REPLACEMENT_SPI) in spis
    events = _events(run, "XfrmInNoStates", netns_b)
    assert len(events) == lab["sent"]
    for e in events:
        summary = e["explain"]["summary"]
        assert summary.startswith(f"SA spi {cfg['spi_ab']:#x} dst {cfg['addr_b']} was deleted"), e
        assert f"spi {scenarios.REPLACEMENT_SPI:#x} dst {cfg['addr_b']}" in \
            " ".join(e["explain"]["details"]), e["explain"]


def test_report_answers_the_classic_investigation_offline(run: dict) -> None:
    """`xfrmtrace report` on the very JSON log of the run."""
    lab = run["scenarios"]["in-no-states-replaced"]["labs"][0]
    cfg = lab["config"]
    proc = subprocess.run([sys.executable, "-m", "xfrmtrace", "report", run["events_path"],
                           "--output", "json"], capture_output=True, text=True, check=True)
    groups = [g for g in json.loads(proc.stdout)["groups"]
              if g["netns"] == lab["netns"][cfg["ns_b"]] and g["counter"] == "XfrmInNoStates"]
    assert len(groups) == 1 and groups[0]["count"] == lab["sent"], groups
    group = groups[0]
    assert group["explain"]["summary"].startswith(f"SA spi {cfg['spi_ab']:#x} dst "
                                                  f"{cfg['addr_b']} was deleted")
    history = [(c["action"], c["sa"]["spi"]) for c in group["history"] if c["type"] == "sa"]
    assert ("deleted", cfg["spi_ab"]) in history
    assert ("added", scenarios.REPLACEMENT_SPI) in history


def test_every_event_is_explained_without_keys(run: dict) -> None:
    assert run["events"] and all(e["explain"]["summary"] for e in run["events"])
    for record in [*run["events"], *run["changes"]]:
        for sa in [record.get("sa"), *record.get("explain", {}).get("sas", [])]:
            for algo in (sa or {}).get("algorithms", []):
                assert algo["key"] == "<redacted>", record
    keys = [k[2:] for k in (ipsec.KEY_AB, ipsec.KEY_BA)]
    everything = json.dumps([run["events"], run["changes"]]) + run["stderr"]
    assert not any(k in everything for k in keys)


def test_twin_namespaces_told_apart(run: dict) -> None:
    """Identical addresses, SPIs and marks in two namespace pairs: only the netns differs."""
    record = run["scenarios"]["in-no-states-twin-netns"]
    assert "error" not in record, record["error"]
    first, second = record["labs"]
    assert first["config"]["addr_b"] == second["config"]["addr_b"]
    assert first["sent"] != second["sent"]
    for lab in (first, second):
        inode = lab["netns"][lab["config"]["ns_b"]]
        assert len(_events(run, "XfrmInNoStates", inode)) == lab["sent"]


# ---- modules and the resolver -------------------------------------------------------------------


def test_late_module_attached_and_detached(run: dict) -> None:
    """Modules loaded after start get probes without a restart; unloading drops them."""
    assert run["site_modules_at_start"] == [], "modules with sites were loaded before the tool"
    late = run["late_module"]
    assert late["attach_seconds"] is not None, run["stderr"]
    assert late["probes_loaded"], "no kprobe in the module after the tool reported it"
    assert late["detach_seconds"] is not None, run["stderr"]
    assert late["probes_unloaded"] == []
    # esp4/esp6 were loaded by the scenarios' first `ip xfrm state add` (IPv4, IPv6).
    for module in ("esp4", "esp6"):
        assert module in run["site_modules_while_tracing"]
        assert f"Module {module} loaded: attached 1/1 probes" in run["stderr"], run["stderr"]
        assert guest_tool.in_module(run["kprobes_while_tracing"], module)


def test_iptfs_counter_traced_in_its_module(run: dict) -> None:
    """IP-TFS counts in its own module (built by the lab for Debian): the events name the
    module's function, and the tool attached to the module before the scenario's packets."""
    record = run["scenarios"]["out-no-queue-space"]
    if "skipped" in record:  # test_scenario fails where the skip is wrong
        not_applicable(f"{run['kernel']}: {record['skipped']}")
    assert record.get("module_attach_seconds") is not None, record
    lab = record["labs"][0]
    events = _events(run, "XfrmOutNoQueueSpace", lab["netns"][lab["config"]["ns_a"]])
    assert events, record
    assert {(e["object"], e["function"]) for e in events} == {
        (scenarios.IPTFS_MODULE, "iptfs_output_collect")}, events[0]


def test_resolver_audit_has_no_doubtful_site(run: dict) -> None:
    """Every gs-relative increment in kernel and module text is classified, none doubtful."""
    audit_run = run["audit"]
    assert audit_run["returncode"] == 0, audit_run["stderr"]
    entries = run["audit_entries"]
    by_class = Counter(e["classification"] for e in entries)
    xfrm = [e for e in entries if e["classification"] == "xfrm"]
    print(f"{run['kernel']}: {dict(by_class)}; modules {audit_run['modules']}")
    for e in xfrm:
        print(f"  {e['counter']:24s} {e['function']}+{e['offset']:#x} [{e['object']}]")
    assert set(by_class) <= {"xfrm", "other"}, [e for e in entries
                                                 if e["classification"] not in ("xfrm", "other")]
    assert all(e["counter"] for e in xfrm)
    assert {e["object"] for e in xfrm} >= {"vmlinux", *audit_run["modules"]}
