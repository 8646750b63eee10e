"""Guest side of the end-to-end tests: run xfrmtrace while IPsec scenarios move counters.

Runs INSIDE the VM as root.  Starts ``xfrmtrace trace --output json`` once,
waits for its ready file, runs each scenario in a fresh lab, stops the tool
with SIGINT, and writes everything the host-side assertions need to
``<out>/results.json``: the tool's events and summary, and per scenario the
/proc/net/xfrm_stat delta, the namespace inodes and interface indexes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tests.vmlab import ipsec

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 600.0


def fast_capstone_env() -> Dict[str, str]:
    """Copy libcapstone.so to tmpfs: mmap-loading 9 MB over the lab's 9p root costs ~30 s."""
    import capstone

    src = Path(capstone.__file__).parent / "lib" / "libcapstone.so"
    dst = Path("/tmp/xfrmtrace-capstone")
    dst.mkdir(exist_ok=True)
    if src.exists() and not (dst / src.name).exists():
        shutil.copy(src, dst / src.name)
    return {**os.environ, "LIBCAPSTONE_PATH": str(dst)}


def tool_command(out: Path, extra: List[str], output: str = "json") -> List[str]:
    return [str(Path(sys.executable).parent / "xfrmtrace"), "trace", "--output", output,
            "--ready-file", str(out / "ready"), "--cache-dir", "/tmp/xfrmtrace-cache", *extra]


def _netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def _ifindex(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", dev], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split(":", 1)[0])


def _lab_facts(lab: ipsec.Lab) -> dict:
    c = lab.cfg
    return {
        "netns": {c.ns_a: _netns_inode(c.ns_a), c.ns_b: _netns_inode(c.ns_b)},
        "ifindex": {c.veth_a: _ifindex(c.ns_a, c.veth_a), c.veth_b: _ifindex(c.ns_b, c.veth_b)},
        "config": {k: v for k, v in vars(c).items() if not k.startswith("key")},
    }


def _measure_all(lab: ipsec.Lab, action: Callable[[], object]) -> dict:
    """xfrm_stat deltas of both namespaces around ``action``."""
    c = lab.cfg
    before = {ns: lab.xfrm_stat(ns) for ns in (c.ns_a, c.ns_b)}
    action()
    time.sleep(0.5)  # let softirq processing of the last packets finish
    after = {ns: lab.xfrm_stat(ns) for ns in (c.ns_a, c.ns_b)}
    return {ns: ipsec.counter_delta(before[ns], after[ns]) for ns in before}


def scenario_in_no_states(lab: ipsec.Lab, count: int) -> dict:
    """Classic case: the receiver's inbound SA is deleted, then traffic arrives."""
    c = lab.cfg
    lab.setup()
    facts = _lab_facts(lab)
    healthy = lab.ping(c.ns_a, c.addr_b, count=1)
    lab.delete_state(c.ns_b, c.spi_ab, c.addr_b)
    deltas = _measure_all(lab, lambda: lab.ping(c.ns_a, c.addr_b, count))
    return {**facts, "healthy_before": healthy, "sent": count, "deltas": deltas}


def scenario_out_no_states(lab: ipsec.Lab, count: int) -> dict:
    """The sender's out policy has a template no SA satisfies."""
    c = lab.cfg
    missing = lab.sa(c.ns_a, c.addr_a, c.addr_b)
    lab.setup(sas=[sa for sa in lab.sas() if sa != missing])
    facts = _lab_facts(lab)
    deltas = _measure_all(lab, lambda: lab.ping(c.ns_a, c.addr_b, count))
    return {**facts, "sent": count, "deltas": deltas}


SCENARIOS: Dict[str, Callable[[ipsec.Lab, int], dict]] = {
    "in-no-states": scenario_in_no_states,
    "out-no-states": scenario_out_no_states,
}


def run_scenarios(names: List[str], count: int, ns_prefix: str, record: dict) -> None:
    """Run each scenario in its own pair of namespaces, all kept until the end.

    Namespace inodes are reused once a namespace is gone; keeping every lab
    alive while the tool runs makes each inode name exactly one namespace.
    A new namespace's counters start at zero, so its final /proc values are
    the lifetime totals the tool's events must add up to.
    """
    labs = []
    try:
        for n, name in enumerate(names):
            lab = ipsec.Lab(ipsec.LabConfig(ns_a=f"{ns_prefix}{n}-a", ns_b=f"{ns_prefix}{n}-b"))
            labs.append((name, lab))
            try:
                record[name] = SCENARIOS[name](lab, count)
            except Exception as err:  # noqa: BLE001 - reported to the host test
                record[name] = {"error": f"{type(err).__name__}: {err}"}
        time.sleep(1.0)
        for name, lab in labs:
            if "error" not in record[name]:
                record[name]["totals"] = {ns: lab.xfrm_stat(ns)
                                          for ns in (lab.cfg.ns_a, lab.cfg.ns_b)}
    finally:
        for _name, lab in labs:
            lab.teardown()


def run(out: Path, scenarios: List[str], count: int, extra: List[str],
        ns_prefix: str = "xt", output: str = "json") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ready").unlink(missing_ok=True)
    started = time.monotonic()
    events_path, stderr_path = out / "events.jsonl", out / "stderr.txt"
    with open(events_path, "w") as events, open(stderr_path, "w") as stderr:
        tool = subprocess.Popen(tool_command(out, extra, output), stdout=events, stderr=stderr,
                                env=fast_capstone_env())
        while not (out / "ready").exists() and tool.poll() is None:
            if time.monotonic() - started > READY_TIMEOUT:
                break
            time.sleep(0.2)
        results: dict = {"ready_seconds": round(time.monotonic() - started, 1), "scenarios": {}}
        if (out / "ready").exists():
            run_scenarios(scenarios, count, ns_prefix, results["scenarios"])
        if tool.poll() is None:
            tool.send_signal(signal.SIGINT)
        try:
            tool.wait(timeout=120)
        except subprocess.TimeoutExpired:
            tool.kill()
            tool.wait()
    results["returncode"] = tool.returncode
    results["stderr"] = stderr_path.read_text()
    if output == "json":
        lines = [json.loads(line) for line in events_path.read_text().splitlines()
                 if line.strip()]
        results["events"] = [x for x in lines if x.get("type") == "xfrm_error"]
        results["summary"] = next((x for x in lines if x.get("type") == "summary"), None)
    else:
        results["text"] = events_path.read_text()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vmlab.trace_run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    parser.add_argument("--tool-arg", action="append", default=[],
                        help="extra xfrmtrace argument (repeatable)")
    parser.add_argument("--output", choices=("json", "text"), default="json")
    args = parser.parse_args(argv)
    run(args.out, args.scenarios, args.count, args.tool_arg, output=args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
