"""``make bench``: boot one kernel in the VM lab, run :mod:`bench.guest` in it, time the
resolver offline on the host (:mod:`bench.offline`), measure the healthy path's probe runs
on every kernel of the matrix (one short boot each, :mod:`vmlab.guest.healthy`), write
``bench/RESULTS.md`` and ``bench/results.json``.

The CPU is shared with whatever else runs on this machine, and under TCG every guest
instruction is host CPU time, so the run first waits (``--wait-idle`` seconds at most) until
no other qemu is running, and watches for others during the run; RESULTS.md says whether the
machine stayed otherwise idle.

    python -m bench.run --kernel 6.12 [--rounds 4] [--phases warmup,resolver,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench import offline, report
from bench.notes import notes_sections
from vmlab.host import kernels, vm

REPO = Path(__file__).resolve().parents[1]

GUEST_TOOLS = ("iperf3", "trafgen", "bpftrace", "zstd", "ip", "iptables")
PYCACHE = "/dev/shm/xfrmtrace-bench-pycache"
MEMORY = "4G"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def other_qemus(own: str) -> List[str]:
    """Command lines of qemu processes that are not ours (``own`` is in our command line)."""
    proc = subprocess.run(["pgrep", "-af", "qemu-system"], stdout=subprocess.PIPE, text=True,
                          check=False)
    return [line[:120] for line in proc.stdout.splitlines() if own not in line]


class IdleWatch:
    """Polls for other qemus while the benchmark runs."""

    def __init__(self, own: str, period: float = 5.0) -> None:
        self.own, self.period = own, period
        self.seen: List[str] = []
        self.samples = 0
        self.busy_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            others = other_qemus(self.own)
            self.samples += 1
            if others:
                self.busy_samples += 1
                self.seen.extend(o for o in others if o not in self.seen)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_idle(own: str, limit: float) -> float:
    """Wait until no other qemu runs (at most ``limit`` seconds); returns seconds waited."""
    started = time.monotonic()
    while True:
        others = other_qemus(own)
        if not others:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            log(f"still not idle after {limit:.0f}s, going ahead: {others[0]}")
            return time.monotonic() - started
        log(f"waiting for {len(others)} other qemu process(es) to finish: {others[0][:80]}")
        time.sleep(20)


def host_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def missing_tools() -> List[str]:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [t for t in GUEST_TOOLS if shutil.which(t, path=search) is None]


def healthy_profiles(series: List[str], workdir: Path) -> Dict[str, Any]:
    """Per kernel series: one boot running vmlab.guest.healthy (the tool attached, healthy
    ESP and plain traffic, the kernel's run counts of the tool's BPF programs)."""
    profiles: Dict[str, Any] = {}
    for name in series:
        kernel = kernels.fetch_kernel(name)
        rwdir = workdir / f"healthy-{name}"
        shutil.rmtree(rwdir, ignore_errors=True)
        rwdir.mkdir(parents=True)
        out = rwdir / "out"
        result = vm.run_in_vm(kernel, f"{sys.executable} -m vmlab.guest.healthy --out {out}",
                              rwdir=rwdir, cwd=REPO, timeout=900, memory=MEMORY, cpus=2,
                              env={"PYTHONPYCACHEPREFIX": PYCACHE})
        path = out / "healthy.json"
        profiles[name] = (json.loads(path.read_text()) if path.exists()
                          else {"error": result.describe()[-1500:]})
        profiles[name]["seconds"] = round(result.seconds, 1)
        log(f"healthy path on {kernel.version}: {profiles[name].get('kinds', profiles[name])}")
    return profiles


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--kernel", default="6.12", help="kernel series (vmlab/host/kernels.py)")
    parser.add_argument("--phases", default="warmup,resolver,startup,hotpath,storm")
    parser.add_argument("--rounds", type=int, default=4, help="hot path: ABC rounds")
    parser.add_argument("--seconds", type=int, default=5, help="hot path: seconds per iperf3 run")
    parser.add_argument("--startup-repeats", type=int, default=2)
    parser.add_argument("--storm-seconds", type=float, default=10.0)
    parser.add_argument("--rate-limit", type=int, default=100)
    parser.add_argument("--storm-cpus", type=int, default=0,
                        help="trafgen processes (default: one per guest vCPU)")
    parser.add_argument("--offline-repeats", type=int, default=5)
    parser.add_argument("--healthy-kernels", default="all",
                        help="kernel series whose healthy-path probe runs are measured, one "
                             "boot each (comma separated; all: the matrix; none)")
    parser.add_argument("--wait-idle", type=float, default=1800.0,
                        help="wait at most this long for other qemus to finish")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/xfrmtrace-bench"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--echo", action="store_true", help="copy the guest console to stderr")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite RESULTS.md from the --json file of an earlier run")
    args = parser.parse_args(argv)

    if args.render_only:
        raw = json.loads(args.json.read_text())
        meta = raw["meta"]
        meta["notes_sections"] = notes_sections(meta, raw["guest"], raw["offline"])
        args.results.write_text(report.render(meta, raw["guest"], raw["offline"]))
        log(f"wrote {args.results} from {args.json}")
        return 0
    missing = vm.missing_requirements() + [f"{t} (make bench-deps)" for t in missing_tools()]
    if missing:
        log("cannot run: missing " + "; ".join(missing))
        return 2
    started = time.monotonic()
    rwdir = args.workdir / "vm"
    shutil.rmtree(rwdir, ignore_errors=True)
    rwdir.mkdir(parents=True)
    # Every VM of ours has its rwdir under the workdir (this one, and the healthy-path boots
    # per kernel): only a qemu outside it is someone else's.
    own = str(args.workdir)
    waited = wait_idle(own, args.wait_idle)
    kernel = kernels.fetch_kernel(args.kernel)
    log(f"kernel {kernel.version}; guest phases {args.phases}")
    out = rwdir / "out"
    command = " ".join([
        sys.executable, "-m", "bench.guest", "--out", str(out), "--phases", args.phases,
        "--rounds", str(args.rounds), "--seconds", str(args.seconds),
        "--startup-repeats", str(args.startup_repeats),
        "--storm-seconds", str(args.storm_seconds), "--rate-limit", str(args.rate_limit),
        "--storm-cpus", str(args.storm_cpus)])
    watch = IdleWatch(own)
    try:
        # run_in_vm boots again if the kernel died before the command started.
        result = vm.run_in_vm(kernel, command, rwdir=rwdir, cwd=REPO, timeout=3600,
                              memory=MEMORY, cpus=2, env={"PYTHONPYCACHEPREFIX": PYCACHE},
                              echo=args.echo)
        if result.boot_failures:
            log(f"the guest died while booting {result.boot_failures} time(s); booted again")
        vm_seconds = result.seconds
        results_file = out / "results.json"
        if not results_file.exists():
            log("the guest wrote no results:\n" + result.describe())
            return 1
        guest: Dict[str, Any] = json.loads(results_file.read_text())
        log(f"guest done in {vm_seconds:.0f}s (boot {result.boot_seconds}s); offline resolver")
        offline_data = None
        kallsyms = out / "kallsyms.txt"
        if kallsyms.exists():
            try:
                offline_data = offline.run(kernel.vmlinuz, kallsyms,
                                           kernels.cache_dir() / "bench", args.offline_repeats)
            except Exception as err:  # noqa: BLE001 - report it in RESULTS.md
                guest.setdefault("errors", {})["offline resolver"] = repr(err)
        chosen = args.healthy_kernels.replace(",", " ").split()
        if chosen != ["none"]:
            guest["healthy"] = healthy_profiles(
                list(kernels.MATRIX) if chosen == ["all"] else chosen, args.workdir)
    finally:
        watch.stop()
    total = time.monotonic() - started
    idle = not watch.busy_samples and not other_qemus(own)
    meta: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel_series": args.kernel,
        "package": kernel.package_version,
        "host_cpu": host_cpu(),
        "host_cores": os.cpu_count(),
        "memory": MEMORY,
        "idle": idle,
        "idle_text": ("yes: no other qemu ran during the run" if idle else
                      f"**no**: another qemu ran during {watch.busy_samples} of "
                      f"{watch.samples} checks (every {watch.period:.0f} s)")
        + (f"; waited {waited:.0f} s for others to finish first" if waited > 1 else ""),
        "total_seconds": round(total, 1),
        "total_text": f"{total / 60:.1f} min (VM {vm_seconds / 60:.1f} min, boot "
                      f"{result.boot_seconds or 0:.0f} s)",
        "boot_seconds": result.boot_seconds,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    meta["notes_sections"] = notes_sections(meta, guest, offline_data)
    args.results.write_text(report.render(meta, guest, offline_data))
    raw = {"meta": {k: v for k, v in meta.items() if k != "notes_sections"},
           "guest": guest, "offline": offline_data}
    args.json.write_text(json.dumps(raw, indent=1) + "\n")
    log(f"wrote {args.results} and {args.json} ({total / 60:.1f} min in all)")
    return 0 if result.ok and not guest.get("errors") else 1


if __name__ == "__main__":
    raise SystemExit(main())
