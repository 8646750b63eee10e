"""Guest side of ``make bench``: every measurement that needs kprobes (runs INSIDE the VM).

Phases, in this order (each adds its part to ``<out>/results.json`` as soon as it is done):

``warmup``    one discarded start of the tool (bytecode compiled into tmpfs, files read
              over 9p once).
``resolver``  ``xfrmtrace sites --no-cache --audit`` on the live kernel, with every module
              holding sites loaded: seconds under TCG, and the audit the broad probe set is
              taken from.
``startup``   time until the tool's ready file exists, cold (empty site cache) and warm
              (cache filled), against ``bpftrace -e 'kprobe:xfrm_input {}'`` printing its
              ``Attaching 1 probe...`` line; interleaved, after one discarded bpftrace run.
``hotpath``   iperf3 TCP throughput between two namespaces, through an ESP tunnel and over
              plain veth, in three configurations alternated round by round: no tool, the
              tool, the tool plus the broad probe set (:mod:`bench.broad`).
``storm``     ESP packets with an unknown SPI from trafgen in one namespace to another for a
              fixed time: no tool, the tool, the tool with ``--rate-limit 100``; /proc deltas
              against the tool's summary, events decoded per second, lost, peak RSS.

Scratch files (tool output, site caches, trafgen config) live in /dev/shm, which the guest
throws away; only ``--out`` (the VM's rwdir) reaches the host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from bench import stats
from vmlab.guest import ipsec, probestats
from vmlab.guest.ipsec import Lab, LabConfig
from vmlab.guest.nsutil import entered
from vmlab.guest.tool import SITE_MODULES, fast_capstone_env, kprobes, loaded_modules

WORK = Path("/dev/shm/xfrmtrace-bench")
READY_TIMEOUT = 900.0
# baseline: no tool; tool: as shipped; tool-stopped: the same process stopped (SIGSTOP), so
# only its probes cost anything; broad: the tool running again plus the broad probe set.
CONFIGS = ("baseline", "tool", "tool-stopped", "broad")
TRAFFIC = ("esp", "plain")
SETTLE_SECONDS = 2.0  # after a start: kprobe optimisation, the tool's initial netlink dumps
STORM_SPI = 0xDEAD0001
PYCACHE = "/dev/shm/xfrmtrace-bench-pycache"
SITE_CACHE = WORK / "site-cache"  # filled by the warm-up, used by the hot path and storm

ESP_LAB = LabConfig(ns_a="bh-ea", ns_b="bh-eb", veth_a="bh-ea0", veth_b="bh-eb0",
                    addr_a="10.81.0.1", addr_b="10.81.0.2", mark=0, mask=0)
PLAIN_LAB = LabConfig(ns_a="bh-pa", ns_b="bh-pb", veth_a="bh-pa0", veth_b="bh-pb0",
                      addr_a="10.82.0.1", addr_b="10.82.0.2")
STORM_LAB = LabConfig(ns_a="bs-a", ns_b="bs-b", veth_a="bs-a0", veth_b="bs-b0",
                      addr_a="10.83.0.1", addr_b="10.83.0.2")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def xfrmtrace() -> str:
    return str(Path(sys.executable).parent / "xfrmtrace")


def tool_env() -> Dict[str, str]:
    """The tool's environment: libcapstone copied to tmpfs (mapping it over the lab's 9p root
    costs ~30 s), bytecode cached in tmpfs (the repository is read-only in the guest and its
    sources have no __pycache__: without this every start would compile the tool again)."""
    return {**fast_capstone_env(), "TMPDIR": "/dev/shm", "PYTHONPYCACHEPREFIX": PYCACHE}


# --- processes -----------------------------------------------------------------------------


def vm_hwm_kib(pid: int) -> Optional[int]:
    """Peak resident set (VmHWM) of a live process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def cpu_seconds(pid: int) -> Optional[float]:
    """User plus system CPU time of a live process so far (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_seconds() -> float:
    """Idle CPU time of the whole guest so far, summed over CPUs (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


class PeakRss:
    """Samples a process's VmHWM until it exits (VmHWM is already a maximum; sampling keeps
    the last value seen before the process goes away)."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid, self.period, self.kib = pid, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            value = vm_hwm_kib(self.pid)
            if value is None:
                return
            self.kib = max(self.kib, value)
            self._stop.wait(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.kib


class ToolRun:
    """One ``xfrmtrace trace --output json`` process, output in /dev/shm."""

    def __init__(self, name: str, cache_dir: Path, extra: Optional[List[str]] = None) -> None:
        self.name = name
        self.ready_file = WORK / f"{name}.ready"
        self.ready_file.unlink(missing_ok=True)
        self.stdout_path = WORK / f"{name}.jsonl"
        self.stderr_path = WORK / f"{name}.stderr"
        argv = [xfrmtrace(), "trace", "--output", "json", "--ready-file", str(self.ready_file),
                "--cache-dir", str(cache_dir), *(extra or [])]
        self.started = time.monotonic()
        self.timeline: List[tuple] = []  # (seconds since start, stderr line)
        with open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, text=True,
                                         env=tool_env())
        self.rss = PeakRss(self.proc.pid)
        self._stderr = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr.start()

    def _read_stderr(self) -> None:
        """Copy stderr to a file, noting when each line arrived (Python's stderr is line
        buffered, so with -v this is a timeline of the tool's start)."""
        assert self.proc.stderr is not None
        with open(self.stderr_path, "w") as err:
            for line in self.proc.stderr:
                self.timeline.append((round(time.monotonic() - self.started, 3),
                                      line.rstrip("\n")))
                err.write(line)
                err.flush()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Seconds from the start until the ready file existed."""
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: tool exited {self.proc.returncode}:\n"
                                   + self.stderr_path.read_text()[-3000:])
            if time.monotonic() - self.started > timeout:
                raise RuntimeError(f"{self.name}: not ready after {timeout:.0f}s")
            time.sleep(0.05)
        return time.monotonic() - self.started

    def output_size(self) -> int:
        return self.stdout_path.stat().st_size

    def stop(self) -> Dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        peak = self.rss.stop()
        self._stderr.join(timeout=60)
        with open(self.stdout_path, "rb") as out:
            out.seek(max(0, self.output_size() - (1 << 20)))
            tail = out.read().decode(errors="replace")
        return {"returncode": code, "peak_rss_kib": peak,
                "summary": stats.last_json_line(tail, "summary"),
                "stderr": self.stderr_path.read_text(errors="replace")[-4000:],
                "output_bytes": self.output_size()}

    def discard(self) -> None:
        for path in (self.stdout_path, self.stderr_path, self.ready_file):
            path.unlink(missing_ok=True)


class BroadRun:
    """The broad probe set (bench.broad) in its own process."""

    def __init__(self, addresses: Path) -> None:
        self.ready_file, self.stats_file = WORK / "broad.ready", WORK / "broad.json"
        for path in (self.ready_file, self.stats_file):
            path.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.stderr_path = WORK / "broad.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.broad", "--addresses", str(addresses),
                 "--ready-file", str(self.ready_file), "--stats", str(self.stats_file)],
                stdout=subprocess.DEVNULL, stderr=err, env=tool_env())

    def wait_ready(self) -> float:
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError("broad probe helper exited:\n"
                                   + self.stderr_path.read_text()[-3000:])
            if time.monotonic() - self.started > READY_TIMEOUT:
                raise RuntimeError("broad probe helper not ready")
            time.sleep(0.05)
        return time.monotonic() - self.started

    def stop(self) -> Dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=600)
        try:
            return dict(json.loads(self.stats_file.read_text()))
        except (OSError, ValueError):
            return {"error": self.stderr_path.read_text()[-2000:]}


def bpftrace_start() -> Dict[str, Any]:
    """Start ``bpftrace -e 'kprobe:xfrm_input {}'``: seconds until its attach message, and
    until its kprobe shows up in the kprobes list; then stop it."""
    started = time.monotonic()
    proc = subprocess.Popen(["bpftrace", "-e", "kprobe:xfrm_input {}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None and proc.stderr is not None
    record: Dict[str, Any] = {}
    try:
        for line in proc.stdout:
            if stats.bpftrace_attach_count(line) is not None:
                record["message_seconds"] = time.monotonic() - started
                break
        while "message_seconds" in record and time.monotonic() - started < 30:
            listed = [line for line in kprobes() if "xfrm_input" in line]
            if listed:
                record["attached_seconds"] = time.monotonic() - started
                record["kprobe"] = listed[0]
                break
            time.sleep(0.02)
    finally:
        stopping = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            record["killed"] = True
        record["exit_seconds"] = round(time.monotonic() - stopping, 2)
    if "message_seconds" not in record:
        record["error"] = proc.stderr.read()[-2000:]
    return record


# --- phases --------------------------------------------------------------------------------


def phase_warmup() -> Dict[str, Any]:
    """One discarded start of the tool: compiles its bytecode into the tmpfs cache and reads
    its files over 9p once, so the measured runs that follow all start alike."""
    tool = ToolRun("warmup", SITE_CACHE)
    seconds = tool.wait_ready()
    stopped = tool.stop()
    tool.discard()
    return {"ready_seconds": round(seconds, 2), "peak_rss_kib": stopped["peak_rss_kib"]}


def phase_resolver(out: Path) -> Dict[str, Any]:
    """Live resolution from scratch, with the audit the broad probe set comes from."""
    started = time.monotonic()
    audit_path = out / "audit.json"
    with open(audit_path, "w") as audit:
        proc = subprocess.run([xfrmtrace(), "sites", "-v", "--no-cache", "--audit",
                               "--output", "json"], stdout=audit, stderr=subprocess.PIPE,
                              text=True, env=tool_env(), check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"xfrmtrace sites failed:\n{proc.stderr[-3000:]}")
    entries = json.loads(audit_path.read_text())
    by_class: Dict[str, int] = {}
    for entry in entries:
        by_class[entry["classification"]] = by_class.get(entry["classification"], 0) + 1
    return {"seconds": round(seconds, 2), "log": stats.resolver_log_times(proc.stderr),
            "classes": by_class, "modules": [m for m in SITE_MODULES if m in loaded_modules()]}


def phase_startup(repeats: int) -> Dict[str, Any]:
    result: Dict[str, Any] = {"cold": [], "warm": [], "bpftrace": [], "bpftrace_attached": []}
    warmup = bpftrace_start()
    result["bpftrace_warmup"] = warmup
    for i in range(repeats):
        cache = WORK / f"startup-cache-{i}"
        shutil.rmtree(cache, ignore_errors=True)
        for kind in ("cold", "warm"):
            tool = ToolRun(f"startup-{kind}-{i}", cache, ["-v"])
            seconds = tool.wait_ready()
            stopped = tool.stop()
            tool.discard()
            result.setdefault(f"{kind}_breakdown", []).append(
                stats.start_breakdown(tool.timeline, seconds))
            if stopped["returncode"] != 0:
                raise RuntimeError(f"startup {kind}: tool exited {stopped['returncode']}:\n"
                                   f"{stopped['stderr']}")
            result[kind].append(round(seconds, 2))
            log(f"start-up {kind} #{i}: {seconds:.1f}s")
        bt = bpftrace_start()
        if "message_seconds" not in bt:
            raise RuntimeError(f"bpftrace did not attach: {bt.get('error')}")
        result["bpftrace"].append(round(bt["message_seconds"], 2))
        if "attached_seconds" in bt:
            result["bpftrace_attached"].append(round(bt["attached_seconds"], 2))
        log(f"start-up bpftrace #{i}: {bt['message_seconds']:.1f}s")
    return result


def _flush_mangle(cfg: LabConfig) -> None:
    """The labs mark inbound packets for their marked SAs; these benchmarks use no marks."""
    for ns in (cfg.ns_a, cfg.ns_b):
        ipsec.run(ipsec.in_ns(ns, "iptables", "-t", "mangle", "-F"))


def iperf(cfg: LabConfig, seconds: int) -> float:
    proc = subprocess.run(
        ipsec.in_ns(cfg.ns_a, "iperf3", "-c", cfg.addr_b, "-t", str(seconds), "-O", "1", "-J"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=seconds + 120,
        env={**os.environ, "TMPDIR": "/dev/shm"}, check=False)
    return stats.iperf3_bits_per_second(proc.stdout)


def _stop_config(tool: Optional[ToolRun], broad: Optional[BroadRun], info: Dict[str, Any]
                 ) -> None:
    if tool is not None and tool.proc.poll() is None:
        tool.proc.send_signal(signal.SIGCONT)  # in case a failure left it stopped
    if broad is not None:
        info["broad"] = broad.stop()
    if tool is not None:
        stopped = tool.stop()
        summary = stopped["summary"] or {}
        info["tool"] = {"returncode": stopped["returncode"],
                        "peak_rss_kib": stopped["peak_rss_kib"],
                        "increments": sum(summary.get("counters", {}).values()),
                        "lost": summary.get("lost")}
        tool.discard()
    info["kprobes_after"] = len(kprobes())


def phase_hotpath(rounds: int, seconds: int, audit: List[Dict[str, Any]],
                  counters: int) -> Dict[str, Any]:
    esp, plain = Lab(ESP_LAB), Lab(PLAIN_LAB)
    esp.setup()
    plain.create_network()
    servers = []
    try:
        for lab in (esp, plain):
            _flush_mangle(lab.cfg)
            if not ipsec.ping(lab.cfg.ns_a, lab.cfg.addr_b, count=1):
                raise RuntimeError(f"lab {lab.cfg.ns_a} -> {lab.cfg.ns_b}: ping failed")
            servers.append(subprocess.Popen(
                ipsec.in_ns(lab.cfg.ns_b, "iperf3", "-s", "-B", lab.cfg.addr_b),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "TMPDIR": "/dev/shm"}))
        time.sleep(1.0)
        labs = {"esp": esp.cfg, "plain": plain.cfg}
        before = ipsec.xfrm_stat(esp.cfg.ns_b)
        addresses = stats.broad_probe_addresses(audit, 8 * counters)
        address_file = WORK / "broad-addresses.json"
        address_file.write_text(json.dumps(addresses))
        result: Dict[str, Any] = {"rounds": rounds, "seconds": seconds,
                                  "broad_addresses": len(addresses), "max_disp": 8 * counters,
                                  "runs": [], "configs": []}
        for traffic in TRAFFIC:  # warm-up, discarded: TCG translates the paths once
            iperf(labs[traffic], 2)
        cache = SITE_CACHE
        for r in range(rounds):
            # ABCD order: no tool; the tool; the tool stopped; the tool plus the broad
            # probe set.  One tool process per round, from B to D.
            tool = broad = None
            info: Dict[str, Any] = {}
            try:
                for config in CONFIGS:
                    if config == "tool":
                        tool = ToolRun(f"hot-{r}", cache)
                        info["tool_ready_seconds"] = round(tool.wait_ready(), 2)
                    elif config == "tool-stopped" and tool is not None:
                        tool.proc.send_signal(signal.SIGSTOP)
                    elif config == "broad" and tool is not None:
                        tool.proc.send_signal(signal.SIGCONT)
                        broad = BroadRun(address_file)
                        info["broad_ready_seconds"] = round(broad.wait_ready(), 2)
                    time.sleep(SETTLE_SECONDS)
                    listed = kprobes()
                    info[f"kprobes_{config}"] = len(listed)
                    if config == "tool" and r == 0:
                        result["tool_kprobes"] = listed
                    for traffic in TRAFFIC:
                        procs = {"tool": tool.proc.pid if tool else None,
                                 "broad": broad.proc.pid if broad else None}
                        cpu0 = {k: cpu_seconds(p) for k, p in procs.items() if p}
                        t0, idle0 = time.monotonic(), idle_seconds()
                        bps = iperf(labs[traffic], seconds)
                        wall, idle = time.monotonic() - t0, idle_seconds() - idle0
                        run = {"round": r, "config": config, "traffic": traffic, "bps": bps,
                               "guest_idle_share": round(idle / wall / (os.cpu_count() or 1), 4)}
                        for k, cpu_before in cpu0.items():
                            cpu_after = cpu_seconds(procs[k] or 0)
                            if cpu_before is not None and cpu_after is not None:
                                run[f"{k}_cpu_share"] = round((cpu_after - cpu_before) / wall,
                                                              4)
                        result["runs"].append(run)
                        log(f"hot path round {r} {config:8s} {traffic:5s} "
                            f"{bps / 1e6:8.1f} Mbit/s")
            finally:
                _stop_config(tool, broad, info)
            result["configs"].append({"round": r, **info})
        result["profile"] = profile_probes(labs, 3)
        result["esp_counters_moved"] = ipsec.counter_delta(before, ipsec.xfrm_stat(esp.cfg.ns_b))
        # The tunnel really carried the traffic (a policy that did not match would let it
        # through in the clear): packets counted by the receiver's SAs.
        result["esp_sa_packets"] = probestats.xfrm_state_packets(
            ipsec.run(["ip", "-n", esp.cfg.ns_b, "-s", "xfrm", "state"]).stdout)
        return result
    finally:
        for server in servers:
            server.terminate()
            server.wait()
        esp.teardown()
        plain.teardown()


def profile_probes(labs: Dict[str, LabConfig], seconds: int) -> Dict[str, Any]:
    """After the rounds: one more tool start, with BPF run-time statistics on (they cost
    time of their own, so the rounds run without): how often the tool's programs run per
    packet of each kind of traffic, and for how long."""
    tool = ToolRun("hot-profile", SITE_CACHE)
    result: Dict[str, Any] = {}
    try:
        tool.wait_ready()
        time.sleep(SETTLE_SECONDS)
        probestats.enable_bpf_stats(True)
        for traffic in TRAFFIC:
            progs0 = probestats.bpf_prog_stats()
            packets0 = probestats.veth_tx_packets(labs[traffic])
            bps = iperf(labs[traffic], seconds)
            progs1 = probestats.bpf_prog_stats()
            packets1 = probestats.veth_tx_packets(labs[traffic])
            record: Dict[str, Any] = {"packets": packets1 - packets0, "bps": bps,
                                      **probestats.program_runs(progs0, progs1)}
            result[traffic] = record
            log(f"probe profile {traffic}: {record}")
    finally:
        probestats.enable_bpf_stats(False)
        tool.stop()
        tool.discard()
    return result


def _mac(ns: str, dev: str) -> str:
    out = ipsec.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev]).stdout
    return str(json.loads(out)[0]["address"])


class ProcCounters:
    """/proc/net/xfrm_stat of one namespace, opened once inside it and re-read cheaply."""

    def __init__(self, ns: str) -> None:
        with entered(ns):
            self._file = open("/proc/thread-self/net/xfrm_stat")  # noqa: SIM115

    def read(self) -> Dict[str, int]:
        self._file.seek(0)
        return ipsec.parse_xfrm_stat(self._file.read())

    def close(self) -> None:
        self._file.close()


def _storm_once(cfg: LabConfig, conf: Path, seconds: float, cpus: int,
                proc_counters: ProcCounters, tool: Optional[ToolRun]) -> Dict[str, Any]:
    """trafgen for ``seconds``; counter samples 1 s in and 1 s before the end; the tool's
    output size every 0.25 s until it has not grown for 2 s (the tool may still be decoding
    what the storm queued)."""
    counter = "XfrmInNoStates"
    before = proc_counters.read()
    size_at: Callable[[], int] = tool.output_size if tool else (lambda: 0)
    t0 = time.monotonic()
    start_size = size_at()
    gen = subprocess.Popen(ipsec.in_ns(cfg.ns_a, "trafgen", "--dev", cfg.veth_a, "--conf",
                                       str(conf), "--cpus", str(cpus), "--no-sock-mem"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=WORK,  # trafgen writes a temporary file into its cwd
                           start_new_session=True)  # trafgen forks: signal the group
    sizes = [(0.0, start_size)]
    counts = []
    marks = [1.0, seconds - 1.0]
    while time.monotonic() - t0 < seconds:
        time.sleep(0.25)
        now = time.monotonic() - t0
        sizes.append((now, size_at()))
        if marks and now >= marks[0]:
            marks.pop(0)
            counts.append((now, proc_counters.read().get(counter, 0)))
    os.killpg(gen.pid, signal.SIGINT)
    try:
        gen_out = gen.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        os.killpg(gen.pid, signal.SIGKILL)
        gen_out = gen.communicate()[0]
    t1 = time.monotonic() - t0
    time.sleep(0.5)  # the backlog queue drains
    after = proc_counters.read()
    if tool is not None:
        # The tool may still be decoding what the storm left in the ring buffer (and may
        # write nothing until it is through): wait until its output has grown after the
        # storm and then not for 3 s, or has not grown for 20 s after it (at most 5 min).
        grew_after = False
        while time.monotonic() - t0 < t1 + 300:
            time.sleep(0.25)
            sizes.append((time.monotonic() - t0, size_at()))
            now, last = sizes[-1][0], max(_last_growth(sizes), t1)
            grew_after = grew_after or (sizes[-1][1] > sizes[-2][1])
            if now - last >= 3.0 and (grew_after or now - t1 >= 20.0):
                break
    (ta, ca), (tb, cb) = counts
    first, last = stats.output_growth(sizes)
    return {"seconds": round(t1, 3), "before": before, "after": after,
            "delta": stats.nonzero(ipsec.counter_delta(before, after)),
            "steady_rate": (cb - ca) / (tb - ta), "window": [ta, tb],
            "output_first_growth": first, "output_last_growth": last,
            "output_start": start_size,
            "output_in_storm": [s for t, s in sizes if t <= t1][-1] - start_size,
            "trafgen": gen_out[-1500:]}


def _last_growth(sizes: List[tuple]) -> float:
    for (_t0, s0), (t1, s1) in zip(reversed(sizes[:-1]), reversed(sizes)):
        if s1 > s0:
            return float(t1)
    return 0.0


def phase_storm(seconds: float, rate_limit: int, cpus: int) -> Dict[str, Any]:
    lab = Lab(STORM_LAB)
    lab.create_network()
    cfg = lab.cfg
    proc_counters = None
    try:
        _flush_mangle(cfg)
        ipsec.run(["modprobe", "esp4"])  # ESP reaches xfrm_input only with a handler
        frame = stats.esp_frame(_mac(cfg.ns_b, cfg.veth_b), _mac(cfg.ns_a, cfg.veth_a),
                                cfg.addr_a, cfg.addr_b, STORM_SPI)
        conf = WORK / "esp.trafgen"
        conf.write_text(stats.trafgen_packet(frame))
        proc_counters = ProcCounters(cfg.ns_b)
        netns = os.stat(f"/run/netns/{cfg.ns_b}").st_ino
        result: Dict[str, Any] = {"seconds": seconds, "frame_bytes": len(frame),
                                  "netns": netns, "trafgen_cpus": cpus,
                                  "rate_limit": rate_limit, "runs": {}}
        cache = SITE_CACHE
        for name, extra in (("baseline", None), ("tool", []),
                            ("tool-rate-limit", ["--rate-limit", str(rate_limit)])):
            tool = None
            record: Dict[str, Any] = {"extra": extra}
            if extra is not None:
                tool = ToolRun(f"storm-{name}", cache, extra)
                record["ready_seconds"] = round(tool.wait_ready(), 2)
                time.sleep(SETTLE_SECONDS)
            try:
                record.update(_storm_once(cfg, conf, seconds, cpus, proc_counters, tool))
            finally:
                if tool is not None:
                    stop_started = time.monotonic()
                    stopped = tool.stop()
                    record["stop_seconds"] = round(time.monotonic() - stop_started, 2)
                    record["after_stop"] = stats.nonzero(
                        ipsec.counter_delta(record.get("after", {}), proc_counters.read()))
                    summary = stopped.pop("summary") or {}
                    record["tool"] = stopped
                    record["summary"] = {k: summary.get(k) for k in
                                         ("counters", "events", "lost", "sampled", "filtered",
                                          "duration")}
                    record["tool_counts"] = stats.summary_counts_for_netns(summary, netns)
                    if "output_start" in record:
                        with open(tool.stdout_path, "rb") as out:
                            out.seek(record["output_start"])
                            record["events_written"] = stats.count_xfrm_events(out.read())
                    tool.discard()
            rate = sum(record.get("delta", {}).values()) / record.get("seconds", 1)
            log(f"storm {name}: {record.get('delta')} in {record.get('seconds')}s "
                f"({rate:,.0f}/s, steady {record.get('steady_rate', 0):,.0f}/s)"
                + (f", tool {record.get('tool_counts')}, summary {record.get('summary')}"
                   if tool else ""))
            result["runs"][name] = record
        return result
    finally:
        if proc_counters is not None:
            proc_counters.close()
        lab.teardown()


# --- driver --------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.guest")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phases", default="warmup,resolver,startup,hotpath,storm")
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5, help="per iperf3 run")
    parser.add_argument("--storm-seconds", type=float, default=10.0)
    parser.add_argument("--rate-limit", type=int, default=100)
    parser.add_argument("--storm-cpus", type=int, default=0,
                        help="trafgen processes (default: one per vCPU)")
    args = parser.parse_args(argv)
    phases = args.phases.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results: Dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count(),
                               "phases": {}, "errors": {}}
    shutil.copy("/proc/kallsyms", args.out / "kallsyms.txt")
    for module in SITE_MODULES:
        ipsec.run(["modprobe", module], check=False)
    counters = len(ipsec.parse_xfrm_stat(Path("/proc/net/xfrm_stat").read_text()))
    results["counters"] = counters
    for phase in phases:
        log(f"phase {phase}")
        started = time.monotonic()
        try:
            if phase == "warmup":
                data = phase_warmup()
            elif phase == "resolver":
                data = phase_resolver(args.out)
            elif phase == "startup":
                data = phase_startup(args.startup_repeats)
            elif phase == "hotpath":
                audit_path = args.out / "audit.json"
                if not audit_path.exists():
                    phase_resolver(args.out)
                data = phase_hotpath(args.rounds, args.seconds,
                                     json.loads(audit_path.read_text()), counters)
            elif phase == "storm":
                data = phase_storm(args.storm_seconds, args.rate_limit,
                                   args.storm_cpus or os.cpu_count() or 1)
            else:
                raise ValueError(f"unknown phase {phase}")
            data["phase_seconds"] = round(time.monotonic() - started, 1)
            results["phases"][phase] = data
        except Exception as err:  # noqa: BLE001 - report it, go on with the next phase
            import traceback

            results["errors"][phase] = traceback.format_exc()
            log(f"phase {phase} failed: {err}")
        results_path.write_text(json.dumps(results, indent=1))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
