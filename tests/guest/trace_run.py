"""Guest side of the end-to-end suite: xfrmtrace runs while every scenario moves its counter.

Runs INSIDE the VM as root, once per kernel:

1. Starts ``xfrmtrace trace --output json`` before any IPsec module is loaded.
2. Healthy path (vmlab/guest/healthy.py): ESP and plain traffic that moves no counter,
   with the kernel counting every run of the tool's BPF programs.
3. Late modules: loads xfrm_interface and waits for the tool to report its probes, then
   unloads it and waits for the tool to drop them (kprobes list snapshots either side).
   esp4 and esp6 got loaded by the healthy phase's ``ip xfrm state add``.
4. Runs every scenario (tests/guest/scenarios.py) in its own namespaces, all kept alive
   until the tool stops: namespace inodes are reused once a namespace is gone, and keeping
   them makes each inode name exactly one namespace.
5. Reads every namespace's /proc/net/xfrm_stat, stops the tool with SIGINT, checks that
   no kprobe is left behind.
6. Resolver audit: loads every module with sites and runs ``xfrmtrace sites --audit``.

Everything the host-side assertions need lands in ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from tests.guest import scenarios
from vmlab.guest import ipsec
from vmlab.guest.healthy import healthy_phase
from vmlab.guest.tool import (
    SITE_MODULES,
    Tool,
    fast_capstone_env,
    in_module,
    kprobes,
    loaded_modules,
    peak_rss_kib,
    scrape_metrics,
    wait_followed,
    xfrmtrace,
)

LATE_MODULE = "xfrm_interface"


def late_module_phase(tool: Tool) -> Dict[str, Any]:
    """Load a module with sites while tracing, then unload it."""
    record: Dict[str, Any] = {"module": LATE_MODULE}
    ipsec.run(["modprobe", LATE_MODULE])
    record["attach_seconds"] = tool.wait_for_status(f"Module {LATE_MODULE} loaded")
    record["probes_loaded"] = in_module(kprobes(), LATE_MODULE)
    ipsec.run(["rmmod", LATE_MODULE])
    record["detach_seconds"] = tool.wait_for_status(f"Module {LATE_MODULE} unloaded")
    record["probes_unloaded"] = in_module(kprobes(), LATE_MODULE)
    return record


def run_scenarios(names: List[str], count: int,
                  module_attached: Optional[Callable[[str], Optional[float]]] = None,
                  netns_followed: Optional[Callable[[Sequence[str]], None]] = None
                  ) -> tuple[Dict[str, Any], list]:
    """Every scenario in its own namespaces; the callbacks: see scenarios.Context."""
    counters = set(ipsec.parse_xfrm_stat(Path("/proc/net/xfrm_stat").read_text()))
    records: Dict[str, Any] = {}
    contexts = []
    for n, name in enumerate(names):
        ctx = scenarios.Context(f"s{n}", count, module_attached, netns_followed)
        contexts.append((name, ctx))
        records[name] = scenarios.run_one(scenarios.SCENARIOS[name], ctx, counters)
    time.sleep(1.0)
    for name, ctx in contexts:
        if "labs" in records[name]:
            ctx.totals()
    return records, [ctx for _name, ctx in contexts]


def resolver_audit(out: Path) -> Dict[str, Any]:
    """Every gs-relative increment in kernel and module text, with its classification."""
    for module in SITE_MODULES:
        ipsec.run(["modprobe", module], check=False)
    started = time.monotonic()
    audit_path = out / "audit.json"
    with open(audit_path, "w") as audit:
        proc = subprocess.run([*xfrmtrace(), "sites", "--audit", "--output", "json",
                               "--cache-dir", "/tmp/xfrmtrace-cache"],
                              stdout=audit, stderr=subprocess.PIPE, text=True,
                              env=fast_capstone_env())
    return {"returncode": proc.returncode, "stderr": proc.stderr,
            "seconds": round(time.monotonic() - started, 1),
            "modules": [m for m in SITE_MODULES if m in loaded_modules()]}


def run(out: Path, names: List[str], count: int, extra: List[str], output: str = "json",
        quick: bool = False) -> Dict[str, Any]:
    """``quick``: only the scenarios (no late-module phase, no audit), as ``make demo`` wants."""
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        "kernel": os.uname().release,
        "site_modules_at_start": [m for m in SITE_MODULES if m in loaded_modules()],
        "scenarios": {},
    }
    started = time.monotonic()
    tool = Tool(out, extra, output)
    contexts = []
    try:
        ready = tool.wait_ready()
        results["ready_seconds"] = round(time.monotonic() - started, 1)
        if ready and not quick:
            results["healthy"] = healthy_phase(tool)
            results["late_module"] = late_module_phase(tool)
        if ready:
            t0 = time.monotonic()
            results["scenarios"], contexts = run_scenarios(
                names, count, lambda module: tool.wait_for_status(f"Module {module} loaded"),
                wait_followed)
            results["scenario_seconds"] = round(time.monotonic() - t0, 1)
            results["metrics"] = scrape_metrics()
            results["kprobes_while_tracing"] = kprobes()
            results["site_modules_while_tracing"] = [m for m in SITE_MODULES
                                                     if m in loaded_modules()]
    finally:
        results["returncode"] = tool.stop()
        results["tool_peak_rss_kib"] = peak_rss_kib()
        for ctx in contexts:
            ctx.close()
    results["kprobes_after_exit"] = kprobes()
    results["stderr"] = tool.stderr_path.read_text()
    if output == "json":
        lines = [json.loads(line) for line in tool.events_path.read_text().splitlines()
                 if line.strip()]
        results["events"] = [x for x in lines if x.get("type") == "xfrm_error"]
        results["changes"] = [x for x in lines if x.get("type") in ("sa", "policy")]
        results["summary"] = next((x for x in lines if x.get("type") == "summary"), None)
    else:
        results["text"] = tool.events_path.read_text()
    if not quick:
        results["audit"] = resolver_audit(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guest.trace_run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("scenarios", nargs="*", help="default: all")
    parser.add_argument("--tool-arg", action="append", default=[],
                        help="extra xfrmtrace argument (repeatable)")
    parser.add_argument("--output", choices=("json", "text"), default="json")
    parser.add_argument("--quick", action="store_true",
                        help="scenarios only: no late-module phase, no resolver audit")
    args = parser.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in scenarios.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}")
    run(args.out, args.scenarios or list(scenarios.SCENARIOS), args.count, args.tool_arg,
        args.output, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
