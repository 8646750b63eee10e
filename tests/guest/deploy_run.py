"""Guest side of the deployment tests: the chart's container and the zipapp, on a real kernel.

Runs INSIDE the VM as root, once:

1. **Pod.** Runs the container the Helm chart renders (tests/guest/pod_run.py: its
   mounts, read-only root, masked /proc/kcore, exactly its capabilities, its command line).
   Waits until its metrics endpoint answers (what the chart's readinessProbe does), records
   the process's capabilities, runs scenarios in namespaces created after the start, scrapes
   the metrics, lets a real Prometheus server scrape it and evaluate the chart's alerts
   during one more scenario (tests/guest/prometheus_run.py), stops it with SIGTERM (as the
   kubelet does) and collects its stdout, stderr, rotated event files and pcapng.
2. **Zipapp.** Runs ``dist/xfrmtrace.pyz`` with the system python3 (no venv, no packages)
   while one scenario moves a counter, and stops it with SIGINT.
3. **Two nodes.** Two namespaces play two nodes, each with its own tracer and log, through
   a rotation, an SA replaced under the sender and a peer reboot (tests/guest/cluster_run.py).

Everything the host-side assertions need lands in ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

from tests.guest import cluster_run, pod_run, prometheus_run, trace_run
from tests.support import podspec
from vmlab.guest import ipsec
from vmlab.guest import tool as guest_tool

READY_TIMEOUT = 600.0
STATUS_FIELDS = ("CapEff", "CapBnd", "CapPrm", "NoNewPrivs")


def _ensure_run_netns() -> None:
    """/run/netns as `ip netns` leaves it: a shared mount, so later namespaces propagate
    into the pod's mount namespace (mountPropagation: HostToContainer)."""
    ipsec.run(["ip", "netns", "add", "xt-deploy-prep"])
    ipsec.run(["ip", "netns", "del", "xt-deploy-prep"])


def _wait_for_metrics(url: str, proc: subprocess.Popen) -> Optional[float]:
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < READY_TIMEOUT:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return round(time.monotonic() - started, 1)
        except OSError:
            time.sleep(0.5)
    return None


def option_value(argv: List[str], name: str) -> Optional[str]:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in a command line."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _process_status(pid: int) -> Dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as err:
        return {"error": str(err)}
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return {k: fields.get(k, "").strip() for k in STATUS_FIELDS}


def pod_phase(spec_path: Path, out: Path, names: List[str], count: int,
              prom_rules: Optional[Path] = None) -> Dict[str, Any]:
    spec = json.loads(spec_path.read_text())
    record: Dict[str, Any] = {}
    _ensure_run_netns()
    guest_tool.fast_capstone_env()  # makes the tmpfs copy the pod binds in
    address = option_value(spec["argv"], "--metrics-addr")
    record["metrics_address"] = address
    stdout, stderr = out / "pod-stdout.txt", out / "pod-stderr.txt"
    started = time.monotonic()
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.Popen(podspec.command(spec_path), cwd=pod_run.REPO,
                                stdout=so, stderr=se)
    contexts = []
    try:
        record["ready_seconds"] = _wait_for_metrics(f"http://{address}/metrics", proc)
        record["status"] = _process_status(proc.pid)
        record["kcore_size_in_pod"] = _kcore_size(proc.pid)
        if record["ready_seconds"] is not None:
            t0 = time.monotonic()
            record["scenarios"], contexts = trace_run.run_scenarios(names, count)
            record["scenario_seconds"] = round(time.monotonic() - t0, 1)
            record["metrics"] = guest_tool.scrape_metrics(address)
            if prom_rules is not None and address is not None:
                record["prometheus"] = prometheus_run.alert_phase(address, prom_rules, out,
                                                                  count)
    finally:
        record["returncode"] = guest_tool.stop_process(proc, signal.SIGTERM)
        record["seconds"] = round(time.monotonic() - started, 1)
        for ctx in contexts:
            ctx.close()
    record["kprobes_after_exit"] = guest_tool.kprobes()
    record["stdout"] = stdout.read_text()
    record["stderr"] = stderr.read_text()
    logs = pod_run.node_dir("/var/log/xfrmtrace")
    record["log_files"] = {}
    for path in sorted(logs.iterdir()):
        shutil.copy(path, out / f"pod-{path.name}")
        record["log_files"][path.name] = path.stat().st_size
    return record


def _kcore_size(pid: int) -> Optional[int]:
    """Size of /proc/kcore as the pod sees it: 0 when masked like a container runtime does."""
    try:
        return len(Path(f"/proc/{pid}/root/proc/kcore").read_bytes()[:16])
    except OSError:
        return None


def zipapp_phase(pyz: Path, out: Path, names: List[str], count: int) -> Dict[str, Any]:
    """The single-file build with the system python3 and its own (cold) site cache."""
    record: Dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    tool = guest_tool.Tool(out, [], command=["/usr/bin/python3", str(pyz)],
                          cache_dir="/tmp/xfrmtrace-cache-pyz", env={"SHIV_ROOT": "/tmp/shiv"})
    contexts = []
    try:
        ready = tool.wait_ready()
        record["ready_seconds"] = round(time.monotonic() - tool.started, 1) if ready else None
        if ready:
            record["scenarios"], contexts = trace_run.run_scenarios(names, count)
    finally:
        record["returncode"] = tool.stop()
        for ctx in contexts:
            ctx.close()
    record["kprobes_after_exit"] = guest_tool.kprobes()
    record["stdout"] = tool.events_path.read_text()
    record["stderr"] = tool.stderr_path.read_text()
    return record


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guest.deploy_run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pod-spec", type=Path, required=True)
    parser.add_argument("--pyz", type=Path, required=True)
    parser.add_argument("--pod-scenario", action="append", required=True)
    parser.add_argument("--pyz-scenario", action="append", required=True)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--prom-rules", type=Path,
                        help="alert rules for a Prometheus server scraping the pod")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {"kernel": os.uname().release}
    results["pod"] = pod_phase(args.pod_spec, args.out, args.pod_scenario, args.count,
                               args.prom_rules)
    results["zipapp"] = zipapp_phase(args.pyz, args.out / "zipapp", args.pyz_scenario,
                                     args.count)
    results["cluster"] = cluster_run.run(args.out / "cluster", args.count)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
