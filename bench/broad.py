"""The "broad probe set" of earlier tracers, for the hot-path comparison (runs in the guest).

Earlier tracers put a kprobe on every gs-relative increment whose displacement could be an
XFRM counter, about ten times the real sites, and filtered at run time.  This helper
reproduces that on top of a running xfrmtrace: it loads its own copy of the tool's BPF
object and attaches the tool's ``xt_site`` program at every such address that the resolver
classified as *not* an XFRM site.  Those addresses are not registered in the copy's
``sites`` map, so each hit costs the kprobe plus the cheapest possible run-time filter (one
hash lookup, one per-CPU counter increment for XT_STAT_UNKNOWN_SITE) and returns.  A real
earlier tracer does at least that much per hit, so "tool + this helper" is a lower bound for
the cost of the broad approach.

``python -m bench.broad --addresses FILE --ready-file F --stats F``: attaches, writes the
ready file (``attached failed``), waits for SIGINT/SIGTERM, detaches, writes its stats as
JSON (how many probes attached, how often they fired).
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from xfrmtrace.bpf import abi
from xfrmtrace.bpf.objects import BpfObject
from xfrmtrace.trace.tracer import BPF_OBJECT, TraceConfig


def unknown_site_hits(obj: BpfObject) -> int:
    """XT_STAT_UNKNOWN_SITE summed over CPUs: hits of probes not in the sites map."""
    key = int(abi.XtStat.UNKNOWN_SITE).to_bytes(4, "little")
    values = obj.map("stats").lookup_percpu(key) or []
    return sum(int.from_bytes(v[:8], "little") for v in values)


def run(addresses: List[int], ready_file: Path, stats_file: Path) -> Dict[str, Any]:
    stopped = {"flag": False}

    def stop(_signum: int, _frame: object) -> None:
        stopped["flag"] = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    obj = BpfObject.open_file(BPF_OBJECT)
    result: Dict[str, Any] = {"wanted": len(addresses)}
    try:
        obj.set_rodata("cfg", bytes(TraceConfig().to_abi()))
        obj.map("events").set_max_entries(1 << 16)  # never used: nothing is registered
        obj.load()
        prog = obj.program("xt_site")
        links = []
        failed: Dict[str, int] = {}
        for address in addresses:
            try:
                links.append(prog.attach_kprobe(None, address))
            except OSError as err:
                why = err.strerror or str(err)
                failed[why] = failed.get(why, 0) + 1
        result.update(attached=len(links), failed=failed,
                      attach_seconds=round(time.monotonic() - started, 2))
        ready_file.write_text(f"{len(links)} {sum(failed.values())}\n")
        t0, hits0 = time.monotonic(), unknown_site_hits(obj)
        while not stopped["flag"]:
            time.sleep(0.2)
        result["hits"] = unknown_site_hits(obj) - hits0
        result["seconds"] = round(time.monotonic() - t0, 2)
        for link in links:
            link.destroy()
    finally:
        obj.close()
    stats_file.write_text(json.dumps(result) + "\n")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broad")
    parser.add_argument("--addresses", type=Path, required=True,
                        help="JSON list of kernel addresses")
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)
    run([int(a) for a in json.loads(args.addresses.read_text())], args.ready_file, args.stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
