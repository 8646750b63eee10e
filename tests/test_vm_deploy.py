"""Deployment end to end on a real kernel: the chart's container and the single-file tool.

One VM boot (kernel ``XFRMTRACE_DEPLOY_KERNEL``, default 6.12).  The host renders the Helm
chart with ``ci/lab-values.yaml`` (plus a small rotation size), turns its DaemonSet into a
launch spec (tests/support/podspec.py) and builds ``dist/xfrmtrace.pyz``; the guest
(tests/guest/deploy_run.py) runs both against real IPsec traffic.  These tests assert on
what it recorded.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import report_line
from tests.support import distbuild, k8stools, podspec
from vmlab.guest import tool as guest_tool
from vmlab.host import kernels, vm

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.vm

DEPLOY_KERNEL = os.environ.get("XFRMTRACE_DEPLOY_KERNEL", "6.12")
POD_SCENARIOS = ("in-no-states", "in-no-states-replaced", "out-no-states", "in-no-states-ipv6")
PYZ_SCENARIOS = ("in-no-states",)
PACKETS = 3
ROTATE_MIB = "0.01"  # about 10 KiB: a handful of events per file, so rotation happens
ROTATE_COUNT = 50  # enough that nothing of this run is rotated away
LAB_VALUES = k8stools.CHART / "ci" / "lab-values.yaml"
# Capability bits (linux/capability.h) of the names the chart adds.
CAP_BITS = {"NET_ADMIN": 12, "SYS_RAWIO": 17, "SYS_ADMIN": 21, "SYS_RESOURCE": 24,
            "SYSLOG": 34, "PERFMON": 38, "BPF": 39}


@pytest.fixture(scope="module")
def chart_objects() -> list:
    return k8stools.render_chart([LAB_VALUES], {"output.file.maxSizeMiB": ROTATE_MIB,
                                                "output.file.count": str(ROTATE_COUNT)})


@pytest.fixture(scope="module")
def pod_spec(chart_objects: list) -> dict:
    return k8stools.daemonset_pod_spec(chart_objects)


def write_lab_rules(path: Path) -> Path:
    """The chart's PrometheusRule as a rules file, with thresholds a lab's few packets
    cross at once: any error rate, over 1m, no pending time."""
    objects = k8stools.render_chart([LAB_VALUES], {
        "metrics.prometheusRule.enabled": "true", "metrics.prometheusRule.errorsPerSecond": "0",
        "metrics.prometheusRule.window": "1m", "metrics.prometheusRule.for": "0s"})
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


@pytest.fixture(scope="module")
def deploy(request, tmp_path_factory, pod_spec: dict, chart_objects: list) -> dict:
    missing = vm.missing_requirements()
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing += [t for t in ("ip", "iptables", "ip6tables", "ping", "setpriv", "unshare",
                            "prometheus")
                if shutil.which(t, path=search) is None]
    if missing:
        pytest.skip("VM lab cannot run here: missing " + "; ".join(missing))
    kernel = kernels.fetch_kernel(DEPLOY_KERNEL)
    pyz = distbuild.build_zipapp()
    rwdir = tmp_path_factory.mktemp("vm-deploy")
    spec = podspec.launch_spec(pod_spec, {"status.podIP": "127.0.0.1", "spec.nodeName": "vm",
                                          "status.hostIP": "127.0.0.1"},
                               chart_objects, rwdir / "secrets")
    spec_path = rwdir / "pod.json"
    podspec.write_spec(spec, spec_path)
    out = rwdir / "deploy"
    argv = [sys.executable, "-m", "tests.guest.deploy_run", "--out", str(out),
            "--pod-spec", str(spec_path), "--pyz", str(pyz), "--count", str(PACKETS)]
    argv += [f"--pod-scenario={name}" for name in POD_SCENARIOS]
    argv += [f"--pyz-scenario={name}" for name in PYZ_SCENARIOS]
    argv += ["--prom-rules", str(write_lab_rules(rwdir / "rules.yaml"))]
    result = vm.run_in_vm(kernel, shlex.join(argv), rwdir=rwdir, cwd=REPO, timeout=1200,
                          env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert result.ok, result.describe()
    data = json.loads((out / "results.json").read_text())
    data["out"] = out
    data["spec"] = spec
    report_line(request.config,
                f"deploy {kernel.version:20s} total {result.seconds:4.0f} s{result.boot_note}: "
                f"pod ready "
                f"{data['pod'].get('ready_seconds')} s, scenarios "
                f"{data['pod'].get('scenario_seconds')} s; zipapp ready "
                f"{data['zipapp'].get('ready_seconds')} s")
    return data


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _pod_events(deploy: dict) -> list[dict]:
    """Every event of the pod, from its rotated files, oldest file first."""
    files = sorted(deploy["pod"]["log_files"], key=_rotation_age, reverse=True)
    lines: list[dict] = []
    for name in files:
        if name.startswith("events.log"):
            lines += _json_lines((deploy["out"] / f"pod-{name}").read_text())
    return [x for x in lines if x.get("type") == "xfrm_error"]


def _rotation_age(name: str) -> int:
    """events.log -> 0, events.log.3 -> 3 (older)."""
    suffix = name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def _totals(record: dict):
    for name, scenario in record["scenarios"].items():
        assert "error" not in scenario, scenario["error"]
        for lab in scenario["labs"]:
            for ns, totals in lab["totals"].items():
                yield name, ns, lab["netns"][ns], {c: n for c, n in totals.items() if n}


def test_pod_runs_with_only_the_charts_capabilities(deploy: dict) -> None:
    pod = deploy["pod"]
    spec = deploy["spec"]
    assert not spec.privileged
    assert pod["ready_seconds"] is not None, pod["stderr"]
    wanted = sum(1 << CAP_BITS[c.upper()] for c in spec.capabilities)
    assert int(pod["status"]["CapEff"], 16) == wanted, (pod["status"], spec.capabilities)
    assert int(pod["status"]["CapBnd"], 16) == wanted
    assert pod["status"]["NoNewPrivs"] == "1"
    assert pod["kcore_size_in_pod"] == 0  # masked: kernel text came through --host-proc
    assert "--host-proc" in spec.argv
    attached = pod["stderr"].split("Attached ", 1)[1].split()[0]
    done, expected = (int(x) for x in attached.split("/"))
    assert done == expected > 20, pod["stderr"]


def test_pod_stops_on_sigterm_and_leaves_no_probe(deploy: dict) -> None:
    pod = deploy["pod"]
    assert pod["returncode"] == 0, pod["stderr"]
    assert pod["kprobes_after_exit"] == []
    assert "Traceback" not in pod["stderr"]
    assert pod["stdout"] == ""  # with --output-file, events and summary go to the file


def test_pod_events_follow_later_namespaces_and_equal_proc(deploy: dict) -> None:
    """Namespaces created after the pod started are named and followed (their SAs explain
    the errors): /run/netns propagates into the pod, setns works with its capabilities."""
    events = _pod_events(deploy)
    assert {e["node"] for e in events} == {"vm"}  # --node-name $(NODE_NAME), downward API
    checked = 0
    for name, ns, inode, moved in _totals(deploy["pod"]):
        mine = [e for e in events if e["netns"] == inode]
        assert dict(Counter(e["counter"] for e in mine)) == moved, (name, ns)
        for e in mine:
            assert e["netns_name"] == ns
            assert "not followed" not in e["explain"]["summary"], e["explain"]
        checked += len(moved)
    assert checked >= len(POD_SCENARIOS)
    replaced = [e for e in events if e["counter"] == "XfrmInNoStates"
                and "was deleted" in e["explain"]["summary"]]
    assert replaced, "the SA deletion in a pod-era namespace was not seen"


def test_pod_metrics_equal_proc(deploy: dict) -> None:
    pod = deploy["pod"]
    metrics = guest_tool.metric_errors(pod["metrics"])
    for name, ns, inode, moved in _totals(pod):
        scraped = {c: n for (c, netns), n in metrics.items() if netns == str(inode)}
        assert scraped == moved, (name, ns, scraped, moved)
    assert f'xfrmtrace_netns_info{{name="{ns}",netns="{inode}"}}' in pod["metrics"]


def test_prometheus_scrapes_the_pod_and_the_alert_fires(deploy: dict) -> None:
    """A real Prometheus (Debian's) scraping the pod, with the chart's rules: the receiver's
    XfrmInNoStates alert fires while a lab drops packets, carries the node and counter, and
    the count Prometheus scraped equals the namespace's own /proc/net/xfrm_stat."""
    prom = deploy["pod"]["prometheus"]
    assert "error" not in prom, prom["error"] + "\n" + prom["log"]
    assert prom["firing_before"] == []  # the healthy node, before the lab drops anything
    (alert,) = prom["alerts"]
    assert alert["labels"]["counter"] == "XfrmInNoStates"
    assert alert["labels"]["node"] == "vm" and alert["labels"]["severity"] == "warning"
    assert alert["labels"]["instance"] == deploy["pod"]["metrics_address"]
    assert "no inbound SA (XfrmInNoStates" in alert["annotations"]["summary"]
    assert "on vm (" in alert["annotations"]["summary"]
    assert prom["scraped_total"] == [float(prom["proc_total"])] and prom["proc_total"] >= 2
    # Every probe attached, no event lost, no other counter moved: nothing else fires.
    assert prom["other_alerts"] == [], prom["other_alerts"]


def test_pod_output_file_rotates_without_losing_events(deploy: dict) -> None:
    files = deploy["pod"]["log_files"]
    rotated = [n for n in files if n.startswith("events.log.")]
    assert rotated, files
    limit = float(ROTATE_MIB) * (1 << 20)
    for name in rotated:
        path = deploy["out"] / f"pod-{name}"
        lines = path.read_text().splitlines()
        # A file is over the limit only when it holds one line that is.
        assert files[name] <= limit or len(lines) == 1, (name, files[name])
    summary = [x for x in _json_lines((deploy["out"] / "pod-events.log").read_text())
               if x.get("type") == "summary"]
    assert len(summary) == 1 and summary[0]["events"] == len(_pod_events(deploy))


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed (make deps)")
def test_pod_pcap_has_the_esp_packets(deploy: dict) -> None:
    pcap = deploy["out"] / "pod-events.pcapng"
    proc = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "esp.spi"],
                          capture_output=True, text=True, timeout=120, check=True)
    spis = [line for line in proc.stdout.splitlines() if line]
    with_esp = [e for e in _pod_events(deploy) if e["spi"] is not None and e["packet_len"]]
    assert len(spis) == len(with_esp) > 0


def test_zipapp_traces_with_the_system_python(deploy: dict) -> None:
    run = deploy["zipapp"]
    assert run["ready_seconds"] is not None, run["stderr"]
    assert run["returncode"] == 0, run["stderr"]
    assert run["kprobes_after_exit"] == []
    events = [x for x in _json_lines(run["stdout"]) if x.get("type") == "xfrm_error"]
    moved_anywhere = 0
    for name, ns, inode, moved in _totals(run):
        mine = Counter(e["counter"] for e in events if e["netns"] == inode)
        assert dict(mine) == moved, (name, ns)
        moved_anywhere += sum(moved.values())
    assert moved_anywhere == len(events) > 0


# --- two namespaces playing two nodes: the report across nodes ------------------------------

def _cluster(deploy: dict) -> dict:
    record = deploy["cluster"]
    assert "error" not in record, record["error"]
    return record


def _cross_report(deploy: dict, *logs: str) -> dict:
    """`xfrmtrace report --output json` over the named nodes' logs, as an operator runs it."""
    paths = [str(deploy["out"] / "cluster" / log / "events.jsonl") for log in logs]
    proc = subprocess.run([sys.executable, "-m", "xfrmtrace", "report", *paths,
                           "--output", "json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _errors(report: dict, sender: str, receiver: str) -> list[dict]:
    for pair in report["cluster"]["pairs"]:
        if (pair["sender"], pair["receiver"]) == (sender, receiver):
            return pair["errors"]
    raise AssertionError(f"no {sender} -> {receiver} in {report['cluster']}")


def test_cluster_lab_moved_what_each_step_should(deploy: dict) -> None:
    record = _cluster(deploy)
    moved = {s["step"]: s["moved"] for s in record["steps"]}
    sent = {s["step"]: s["sent"] for s in record["steps"]}
    for healthy in ("healthy", "rotation-done", "replaced-learned"):
        assert moved[healthy] == {}, (healthy, moved)
    for broken in ("rotation-early-removal", "replaced-under-sender", "peer-reboot"):
        assert moved[broken] == {"XfrmInNoStates": sent[broken]}, (broken, moved)
    assert all(record[f"{n}-returncode"] == 0 for n in ("node-a", "node-b", "node-b-rebooted"))
    assert record["kprobes_after_exit"] == []


def test_cluster_logs_are_per_node_and_namespace(deploy: dict) -> None:
    """--node-name tags and --filter-netns keeps each log to its own namespace; keys show as
    fingerprints, equal for the same key on both nodes."""
    fingerprints: dict[str, set] = {}
    for log, node in (("node-a", "node-a"), ("node-b", "node-b"),
                      ("node-b-rebooted", "node-b")):
        lines = [json.loads(line) for line in
                 (deploy["out"] / "cluster" / log / "events.jsonl").read_text().splitlines()
                 if line.startswith("{")]
        assert lines and {x["node"] for x in lines} == {node}
        assert len({x["netns"] for x in lines if x["type"] in ("sa", "policy")}) == 1
        assert any(x["type"] == "sa" and x["action"] == "present" for x in lines)
        fingerprints[log] = {(x["sa"]["spi"], a["key_fingerprint"]) for x in lines
                             if x["type"] == "sa" and x["sa"] for a in x["sa"]["algorithms"]}
        assert all(fp and len(fp) == 32 for _spi, fp in fingerprints[log])
    # Both namespaces hold the lab's key for the initial SPI: one fingerprint on both sides.
    initial = _cluster(deploy)["spis"]["initial"]
    assert {fp for spi, fp in fingerprints["node-a"] if spi == initial} == {
        fp for spi, fp in fingerprints["node-b"] if spi == initial}


def test_report_across_nodes_names_the_senders_sa(deploy: dict) -> None:
    """Rotation with the old inbound SA removed too early, and an SA replaced under the
    sender: each of node-b's drops is joined with node-a's outbound SA of that SPI."""
    record = _cluster(deploy)
    spis = record["spis"]
    sent = {s["step"]: s["sent"] for s in record["steps"]}
    report = _cross_report(deploy, "node-a", "node-b")
    errors = {e["sender_sa"]["spi"]: e for e in _errors(report, "node-a", "node-b")}
    assert set(errors) == {spis["initial"], spis["replaced"]}, errors
    early = errors[spis["initial"]]
    assert early["counter"] == "XfrmInNoStates" and early["count"] == sent[
        "rotation-early-removal"]
    assert early["receiver_sa"]["status"] == "replaced", early
    assert early["receiver_sa"]["replaced_by"] == spis["rotated"]
    assert early["sender_sa"]["removed"] > early["last"]  # node-a still used it then
    replaced = errors[spis["replaced"]]
    assert replaced["count"] == sent["replaced-under-sender"]
    assert replaced["receiver_sa"]["status"] == "never", replaced
    assert replaced["sender_sa"]["installed"] < replaced["first"]
    assert "node-a sends with its outbound SA spi" in replaced["summary"]
    kinds = {f["kind"] for p in report["cluster"]["pairs"] for f in p["flags"]}
    assert "key-differs" not in kinds and "algorithms-differ" not in kinds


def test_report_across_nodes_after_a_peer_reboot(deploy: dict) -> None:
    """node-b's log after its reboot never had the SPI node-a still sends with; node-b's new
    outbound SPI has no inbound SA on node-a."""
    record = _cluster(deploy)
    report = _cross_report(deploy, "node-a", "node-b-rebooted")
    (error,) = _errors(report, "node-a", "node-b")
    assert error["count"] == {s["step"]: s["sent"] for s in record["steps"]}["peer-reboot"]
    assert error["sender_sa"]["spi"] == record["spis"]["replaced"]
    assert error["receiver_sa"]["status"] == "never"
    flags = {(p["sender"], f["kind"], f["spi"]) for p in report["cluster"]["pairs"]
             for f in p["flags"]}
    assert ("node-a", "no-inbound-sa", record["spis"]["replaced"]) in flags
    assert ("node-b", "no-inbound-sa", 0x6000) in flags
