"""Guest side of the robustness tests: the tool under abuse, on a real kernel.

Runs INSIDE the VM as root, once; each phase records what the host asserts on:

1. **Overflow.** A 16 KiB ring buffer (a few dozen events) and the tool stopped with
   SIGSTOP while a burst of ESP packets with an unknown SPI arrives: on SIGCONT the ring has
   overflowed.  The exact in-kernel counts must still equal /proc, and the loss must be
   reported (summary ``lost``, metrics ``xfrmtrace_events_lost_total``).
2. **Churn.** While the same tool runs: the lab's namespaces are deleted, esp4 is
   unloaded, and a new lab with new names is created (loading esp4 again), which may
   get the inode of a deleted namespace.  Errors in the new lab must carry the new names.
3. **SIGKILL.** The tool is killed while tracing: no kprobe, BPF program, kprobe event or
   perf event may remain, and a restart must be ready and count at once.

Everything lands in ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from vmlab.guest import ipsec, nsutil
from vmlab.guest import tool as guest_tool
from vmlab.guest.ipsec import Lab, LabConfig

UNKNOWN_SPI_ESP = bytes.fromhex("0000beef00000001") + bytes(32)  # SPI 0xbeef: no such SA
BURST = 400
RING = "16K"
TRACEFS_KPROBE_EVENTS = Path("/sys/kernel/tracing/kprobe_events")


def _lab(prefix: str) -> Lab:
    lab = Lab(LabConfig(ns_a=f"{prefix}a", ns_b=f"{prefix}b"))
    lab.setup()
    return lab


def _netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def _bpf_programs() -> List[str]:
    """Names of loaded BPF programs (bpftool), or the error."""
    proc = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return [f"bpftool failed: {proc.stderr.strip()}"]
    return [p.get("name", "?") for p in json.loads(proc.stdout or "[]")]


def _kprobe_events() -> List[str]:
    try:
        return [line for line in TRACEFS_KPROBE_EVENTS.read_text().splitlines() if line]
    except OSError as err:
        return [f"cannot read {TRACEFS_KPROBE_EVENTS}: {err}"]


def _perf_event_fds(pid: int) -> int:
    """perf event file descriptors a process holds (each kprobe is one)."""
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                    count += 1
            except OSError:
                continue
    except OSError:
        return -1
    return count


def _rmmod(module: str, timeout: float = 15.0) -> str:
    """Unload ``module``, retrying while the deleted namespaces' SAs still hold it (netns
    cleanup runs in a workqueue); "" on success, else the last error."""
    deadline = time.monotonic() + timeout
    while True:
        proc = ipsec.run(["rmmod", module], check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc.stdout.strip() if proc.returncode else ""
        time.sleep(0.5)


def _leftovers() -> Dict[str, Any]:
    return {"kprobes": guest_tool.kprobes(), "kprobe_events": _kprobe_events(),
            "bpf_programs": [p for p in _bpf_programs() if p.startswith("xt_")]}


def overflow_and_churn(out: Path) -> Dict[str, Any]:
    record: Dict[str, Any] = {}
    tool = guest_tool.Tool(out / "overflow", ["--ringbuf-size", RING])
    labs = []
    try:
        record["ready"] = tool.wait_ready()
        first = _lab("rb1-")
        labs.append(first)
        record["first"] = {"ns_b": first.cfg.ns_b, "inode_b": _netns_inode(first.cfg.ns_b)}
        # 1. Burst while the tool cannot read: the 16 KiB ring overflows.
        os.kill(tool.proc.pid, signal.SIGSTOP)
        nsutil.send_raw_esp(first.cfg.ns_a, first.cfg.addr_b, UNKNOWN_SPI_ESP, BURST)
        time.sleep(0.5)
        os.kill(tool.proc.pid, signal.SIGCONT)
        time.sleep(3.0)
        record["first"]["proc"] = first.xfrm_stat(first.cfg.ns_b)
        record["metrics_after_burst"] = guest_tool.scrape_metrics()
        # 2. Churn: namespaces deleted, modules unloaded, a new lab with new names.
        first.teardown()
        labs.remove(first)
        time.sleep(1.5)  # the watcher rescans /run/netns every second
        record["rmmod"] = _rmmod("esp4")  # the lab is IPv4 only: esp6 was never loaded
        record["unloaded_seen"] = tool.wait_for_status("Module esp4 unloaded", timeout=30)
        second = _lab("rb2-")
        labs.append(second)
        record["second"] = {"ns_b": second.cfg.ns_b, "inode_b": _netns_inode(second.cfg.ns_b)}
        record["reloaded_seen"] = tool.wait_for_status("Module esp4 loaded", timeout=60,
                                                       times=2)
        nsutil.send_raw_esp(second.cfg.ns_a, second.cfg.addr_b, UNKNOWN_SPI_ESP, 5)
        time.sleep(2.0)
        record["second"]["proc"] = second.xfrm_stat(second.cfg.ns_b)
    finally:
        record["returncode"] = tool.stop()
        for lab in labs:
            lab.teardown()
    record["stderr"] = tool.stderr_path.read_text()
    lines = [json.loads(x) for x in tool.events_path.read_text().splitlines() if x.strip()]
    record["events"] = [x for x in lines if x.get("type") == "xfrm_error"]
    record["summary"] = next((x for x in lines if x.get("type") == "summary"), None)
    record["leftovers"] = _leftovers()
    return record


def sigkill_and_restart(out: Path) -> Dict[str, Any]:
    record: Dict[str, Any] = {}
    lab = _lab("kill-")
    try:
        tool = guest_tool.Tool(out / "killed", [])
        record["ready"] = tool.wait_ready()
        record["while_tracing"] = {**_leftovers(), "perf_event_fds": _perf_event_fds(
            tool.proc.pid)}
        tool.proc.kill()
        record["kill_returncode"] = tool.proc.wait()
        time.sleep(1.0)  # the kernel frees the probes when the last reference goes
        record["after_kill"] = _leftovers()
        started = time.monotonic()
        again = guest_tool.Tool(out / "restarted", [])
        record["restart_ready"] = again.wait_ready()
        record["restart_seconds"] = round(time.monotonic() - started, 1)
        nsutil.send_raw_esp(lab.cfg.ns_a, lab.cfg.addr_b, UNKNOWN_SPI_ESP, 3)
        time.sleep(2.0)
        record["proc"] = lab.xfrm_stat(lab.cfg.ns_b)
        record["inode_b"] = _netns_inode(lab.cfg.ns_b)
        record["restart_returncode"] = again.stop()
        lines = [json.loads(x) for x in again.events_path.read_text().splitlines()
                 if x.strip()]
        record["restart_summary"] = next((x for x in lines if x.get("type") == "summary"),
                                         None)
        record["restart_events"] = [x for x in lines if x.get("type") == "xfrm_error"]
        record["restart_stderr"] = again.stderr_path.read_text()
    finally:
        lab.teardown()
    record["after_restart"] = _leftovers()
    return record


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guest.robust_run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for sub in ("overflow", "killed", "restarted"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {"kernel": os.uname().release, "burst": BURST}
    results["overflow"] = overflow_and_churn(args.out)
    results["sigkill"] = sigkill_and_restart(args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
