"""The xfrmtrace process in a guest, and what the guest can see of the kernel's probes.

Used inside the VM by the end-to-end suite (tests/guest/) and by the benchmarks (bench/guest.py).
The text parsers (:func:`in_module`, :func:`metric_errors`) are pure and also serve the host
side, which reads what the guest saved.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

READY_TIMEOUT = 600.0
METRICS_ADDR = "127.0.0.1:9477"
MODULE_TIMEOUT = 120.0
KPROBES_LIST = Path("/sys/kernel/debug/kprobes/list")
# Modules with counter sites on Debian kernels (see `xfrmtrace sites`).
SITE_MODULES = ("esp4", "esp6", "xfrm_interface", "ip_vti", "ip6_vti", "xfrm_iptfs")


def fast_capstone_env() -> Dict[str, str]:
    """Copy libcapstone.so to tmpfs: mmap-loading 9 MB over the lab's 9p root costs ~30 s."""
    import capstone

    src = Path(capstone.__file__).parent / "lib" / "libcapstone.so"
    dst = Path("/tmp/xfrmtrace-capstone")
    dst.mkdir(exist_ok=True)
    if src.exists() and not (dst / src.name).exists():
        shutil.copy(src, dst / src.name)
    return {**os.environ, "LIBCAPSTONE_PATH": str(dst)}


#: Set by the host: run this zipapp (``make dist``) as the tool (the arm64 lab does, so the
#: single-file tool is what runs on arm64).
PYZ_ENV = "XFRMTRACE_GUEST_PYZ"


def xfrmtrace() -> List[str]:
    """The command that runs this checkout's tool: the zipapp named by $XFRMTRACE_GUEST_PYZ,
    else the venv's console script (x86 guests see the host's venv), else ``python3 -m
    xfrmtrace`` (no venv, the checkout on PYTHONPATH)."""
    pyz = os.environ.get(PYZ_ENV)
    if pyz:
        # Without the guest's PYTHONPATH (the checkout's src, wheels), which would come
        # before the zipapp's own packages.
        return ["env", "-u", "PYTHONPATH", sys.executable, pyz]
    script = Path(sys.executable).parent / "xfrmtrace"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "xfrmtrace"]


#: NETLINK_XFRM in /proc/net/netlink's Eth column.
NETLINK_XFRM = 6
FOLLOW_TIMEOUT = 20.0


def follows_xfrm(ns: str) -> bool:
    """True when namespace ``ns`` has a NETLINK_XFRM socket subscribed to a multicast group:
    the tool's listener (``ip xfrm`` and the lab open unsubscribed ones only)."""
    proc = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/netlink"],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines()[1:]:
        fields = line.split()  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        if len(fields) > 3 and fields[1] == str(NETLINK_XFRM) and int(fields[3], 16):
            return True
    return False


def wait_followed(namespaces: Sequence[str], timeout: float = FOLLOW_TIMEOUT) -> None:
    """Wait until the tool follows the SAD/SPD of every one of ``namespaces``.  It finds a
    new namespace on its next rescan of /run/netns (context/xfrmnl/listener.py RESCAN_S),
    and a lab that deletes an SA before then leaves it nothing to explain with."""
    deadline = time.monotonic() + timeout
    pending = list(namespaces)
    while pending:
        pending = [ns for ns in pending if not follows_xfrm(ns)]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"the tool never followed namespaces {', '.join(pending)}")
        if pending:
            time.sleep(0.1)


def loaded_modules() -> List[str]:
    return [line.split()[0] for line in Path("/proc/modules").read_text().splitlines()]


def kprobes() -> List[str]:
    """Every kprobe in the kernel (debugfs), one line each."""
    try:
        return KPROBES_LIST.read_text().splitlines()
    except OSError as err:
        return [f"cannot read {KPROBES_LIST}: {err}"]


def in_module(lines: List[str], module: str) -> List[str]:
    """The kprobes list lines (``ADDR  k  func+0x12  esp4 [FLAGS]``) of probes in ``module``."""
    return [line for line in lines
            if len(parts := line.split()) >= 4 and parts[3].strip("[]") == module]


class Tool:
    """The xfrmtrace process under test and its output files."""

    def __init__(self, out: Path, extra: List[str], output: str = "json",
                 command: Optional[List[str]] = None,
                 cache_dir: str = "/tmp/xfrmtrace-cache",
                 env: Optional[Dict[str, str]] = None) -> None:
        """``command`` runs another build of the tool (default: the venv's ``xfrmtrace``)."""
        self.ready_file = out / "ready"
        self.ready_file.unlink(missing_ok=True)
        self.events_path, self.stderr_path = out / "events.jsonl", out / "stderr.txt"
        self.pcap_path = out / "events.pcapng"
        self.started = time.monotonic()
        argv = [*(command or xfrmtrace()), "trace", "--output", output,
                "--ready-file", str(self.ready_file), "--cache-dir", cache_dir,
                "--metrics-addr", METRICS_ADDR, "--output-pcap", str(self.pcap_path), *extra]
        with open(self.events_path, "w") as events, open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(argv, stdout=events, stderr=stderr,
                                         env={**fast_capstone_env(), **(env or {})})

    def wait_ready(self) -> bool:
        started = time.monotonic()
        while not self.ready_file.exists() and self.proc.poll() is None:
            if time.monotonic() - started > READY_TIMEOUT:
                return False
            time.sleep(0.2)
        return self.ready_file.exists()

    def wait_for_status(self, text: str, timeout: float = MODULE_TIMEOUT,
                        times: int = 1) -> Optional[float]:
        """Seconds until ``text`` appeared ``times`` times on the tool's stderr, or None."""
        started = time.monotonic()
        while time.monotonic() - started < timeout and self.proc.poll() is None:
            if self.stderr_path.read_text().count(text) >= times:
                return round(time.monotonic() - started, 2)
            time.sleep(0.1)
        return None

    def stop(self) -> int:
        return stop_process(self.proc, signal.SIGINT)


def stop_process(proc: subprocess.Popen, sig: int) -> int:
    """Send ``sig`` (if it still runs) and wait for the exit status; SIGKILL after 120 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def scrape_metrics(address: str = METRICS_ADDR) -> str:
    """The tool's Prometheus endpoint, as text (or the error, for the host to show)."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=60) as response:
            return response.read().decode()
    except OSError as err:
        return f"# scrape failed: {err}"


def metric_errors(text: str) -> Dict[tuple, int]:
    """(counter, netns label) -> xfrmtrace_xfrm_errors_total summed over functions (host)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: Dict[tuple, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "xfrmtrace_xfrm_errors_total":
                key = (sample.labels["counter"], sample.labels["netns"])
                totals[key] = totals.get(key, 0) + int(sample.value)
    return totals


def peak_rss_kib() -> int:
    """Largest resident set of any child waited for so far: the tool, once stopped."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
